"""convert_weights.py end to end against the reference libraries (test-only), plus strict loading and atomic saving.

Tiny random models from diffusers / transformers / MONAI are written in every supported source layout (diffusers
folders with .bin, .safetensors, sharded, legacy VAE names; CompVis single files built with the INVERSE rules
written out below from docs/formats.md, with a pickled foreign object; MONAI .pth in both namings), converted with the
CLI in a subprocess, loaded with load_pipeline, and compared output by output with the reference models.
"""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import cmp, need

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT / "tests" / "data" / "keys"   # reference key lists (tests/data/keys/README.md)
TEXTS = ["left lower lobe atelectasis", "small right pleural effusion", "cardiomegaly with mild edema",
         "no pneumothorax", "patchy opacity in the right upper lung zone", "bibasal consolidation"]
TOL = 1e-5


class ModelCheckpoint:
    """Stands in for the pytorch_lightning callback pickled into real SD .ckpt files."""

    def __init__(self):
        self.monitor = "val/loss_simple_ema"


def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    print(r.stdout, r.stderr)
    return r


def convert_ok(*args):
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


# ----------------------------------------------------------------------------------------------------------------
# Tiny reference models

def tiny_tokenizer(folder, pad):
    """A trained tiny CLIP vocabulary saved as HF tokenizer files; pad "eos" (SD1) or "!" (SD2)."""
    from ldm.tokenizer import train_bpe
    tok = train_bpe(TEXTS * 3, vocab_size=600)
    tok.pad_id = tok.eos_id if pad == "eos" else tok.encoder["!"]
    tok.save(folder)
    return tok


def tiny_sd(flavour):
    """(text encoder, vae, unet, scheduler) with random weights, SD1 or SD2 layout, tiny but CompVis-derivable
    (SD1: 8 heads per level; SD2: 64-wide heads; CLIP: 64-wide heads)."""
    diffusers, transformers = need("diffusers"), need("transformers")
    torch.manual_seed(0 if flavour == "sd1" else 1)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="quick_gelu" if flavour == "sd1" else "gelu",
        bos_token_id=598, eos_token_id=599, pad_token_id=599 if flavour == "sd1" else 0)).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=32).eval()
    sd2 = flavour == "sd2"
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128) if sd2 else (32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=(1, 2) if sd2 else 8, use_linear_projection=sd2, norm_num_groups=32).eval()
    for module in (text, vae, unet):  # random (not zero-initialised) weights everywhere, so every key matters
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                    prediction_type="v_prediction" if sd2 else "epsilon")
    return text, vae, unet, sched


def write_diffusers(folder, models, pad, safe=True, shard_unet=False, legacy_vae=False):
    text, vae, unet, sched = models
    folder.mkdir(parents=True)
    text.save_pretrained(folder / "text_encoder", safe_serialization=safe)
    unet.save_pretrained(folder / "unet", safe_serialization=safe, max_shard_size="100KB" if shard_unet else "10GB")
    vae.save_pretrained(folder / "vae", safe_serialization=safe)
    if legacy_vae:  # pre-0.14 diffusers names of the mid attention, as in RoentGen-era folders
        sd = vae.state_dict()
        for old, new in [("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")]:
            sd = {k.replace(f"attentions.0.{old}.", f"attentions.0.{new}."): v for k, v in sd.items()}
        for f in (folder / "vae").glob("diffusion_pytorch_model*"):
            f.unlink()
        torch.save(sd, folder / "vae" / "diffusion_pytorch_model.bin")
    sched.save_pretrained(folder / "scheduler")
    tok = tiny_tokenizer(folder / "tokenizer", pad)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    return tok


# ----------------------------------------------------------------------------------------------------------------
# Inverse rules: diffusers names -> CompVis names (written from docs/formats.md, independently of ldm/weights/compvis.py)

_RESNET_INV = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
               ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]


def unet_to_compvis(sd, L=1, levels=2, attn_levels=(True, False)):
    prefixes = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
                "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
                "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.1.": "middle_block.2."}
    for i in range(levels):
        for j in range(L):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{i * (L + 1) + j + 1}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{i * (L + 1) + j + 1}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (L + 1)}.0.op."
        for j in range(L + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (L + 1) + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (L + 1) + j}.1."
        has_attn = attn_levels[levels - 1 - i]  # up level i mirrors down level levels-1-i
        prefixes[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{i * (L + 1) + L}.{2 if has_attn else 1}.conv."
    out = {}
    for key, v in sd.items():
        p = max((p for p in prefixes if key.startswith(p)), key=len)
        rest = key[len(p):]
        if ".resnets." in p or p.startswith("mid_block.resnets"):
            rest = next((new + rest[len(old):] for old, new in _RESNET_INV if rest.startswith(old)), rest)
        out["model.diffusion_model." + prefixes[p] + rest] = v
    return out


def vae_to_compvis(sd, levels=2):
    out = {}
    for key, v in sd.items():
        k = key
        for i in range(levels):
            k = k.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            k = k.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.")
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        for new, old in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
            if f"mid_block.attentions.0.{new}." in k:
                k = k.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
                if k.endswith("weight") and old != "norm":
                    v = v[:, :, None, None]  # CompVis uses 1x1 convs
        k = k.replace("conv_shortcut.", "nin_shortcut.").replace("conv_norm_out.", "norm_out.")
        out["first_stage_model." + k] = v
    return out


def text_to_openclip(sd, hidden, rng):
    """HF CLIPTextModel (23 of 24 OpenCLIP blocks) -> OpenCLIP names, adding the dropped last block and the heads."""
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}  # transformers 5 drops it
    out = {"cond_stage_model.model.token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "cond_stage_model.model.positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "cond_stage_model.model.ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "cond_stage_model.model.ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "cond_stage_model.model.text_projection": torch.randn(hidden, hidden, generator=rng),
           "cond_stage_model.model.logit_scale": torch.tensor(4.6)}
    n = len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in range(n + 1):
        src, dst = f"text_model.encoder.layers.{min(i, n - 1)}.", f"cond_stage_model.model.transformer.resblocks.{i}."
        noise = (lambda t: torch.randn(t.shape, generator=rng)) if i == n else (lambda t: t)  # the extra block
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = noise(torch.cat([sd[src + f"self_attn.{q}_proj.{kind}"]
                                                                 for q in "qkv"]))
            for hf, oc in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                           ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
                out[dst + f"{oc}.{kind}"] = noise(sd[src + f"{hf}.{kind}"])
    return out


def write_compvis(path, models, flavour):
    text, vae, unet, _ = models
    rng = torch.Generator().manual_seed(3)
    sd = {**unet_to_compvis(unet.state_dict()), **vae_to_compvis(vae.state_dict())}
    if flavour == "sd1":
        sd.update({"cond_stage_model.transformer." + k: v for k, v in text.state_dict().items()})
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        sd.update(text_to_openclip(text.state_dict(), 64, rng))
    # what real files carry besides the weights: schedule buffers, an EMA copy (flattened names), VAE loss weights
    sd["betas"] = torch.linspace(0.00085, 0.012, 1000)
    sd["alphas_cumprod"] = torch.cumprod(1 - sd["betas"], 0)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelconv_inweight"] = torch.randn(3)
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    sd = {k: v.contiguous() for k, v in sd.items()}
    if path.suffix == ".ckpt":
        torch.save({"epoch": 5, "global_step": 1234, "state_dict": sd,
                    "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)}},
                    "hparams": ModelCheckpoint()}, path)
    else:
        from ldm.weights.safetensors import save_file
        save_file(sd, path)


# ----------------------------------------------------------------------------------------------------------------
# Comparison of a loaded pipeline with the reference models

def compare_sd(pipe, models, tok_dir, name):
    transformers = need("transformers")
    text, vae, unet, _ = models
    g = torch.Generator().manual_seed(5)
    hf_tok = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    prompts = ["left lower lobe atelectasis", "no pneumothorax."]  # not "!": HF splits out a "!" pad token
    ref_ids = hf_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = pipe.tokenizer(prompts)
    assert torch.equal(ids, ref_ids), f"{name}: tokenizer ids differ"
    x = torch.randn(2, 3, 32, 32, generator=g)
    z = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ctx_ref = text(ref_ids).last_hidden_state
        ctx = pipe.text_encoder(ids)
        diffs = [cmp(f"{name} text encoder", ctx, ctx_ref),
                 cmp(f"{name} vae encode (mean)", pipe.vae.encode(x), vae.encode(x).latent_dist.mean),
                 cmp(f"{name} vae decode", pipe.vae.decode(z[:, :, :4, :4]), vae.decode(z[:, :, :4, :4]).sample),
                 cmp(f"{name} unet", pipe.unet(z, t, ctx_ref), unet(z, t, ctx_ref).sample)]
    assert max(diffs) < TOL


@pytest.mark.parametrize("layout", ["sd1-bin", "sd1-safetensors", "sd2-sharded", "sd1-legacy-vae"])
def test_diffusers_folder_round_trip(tmp_path, layout):
    from ldm.weights import folder as P
    flavour = layout.split("-")[0]
    models = tiny_sd(flavour)
    src = tmp_path / "src"
    tok = write_diffusers(src, models, pad="eos" if flavour == "sd1" else "!", safe=layout != "sd1-bin",
                          shard_unet=layout == "sd2-sharded", legacy_vae=layout == "sd1-legacy-vae")
    scale = 0.18215
    if layout == "sd2-sharded":
        assert (src / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
        # the folder's own latent scale (vae/config.json scaling_factor) becomes the pipeline's
        vae_json = src / "vae" / "config.json"
        scale = 0.13025
        vae_json.write_text(json.dumps({**json.loads(vae_json.read_text()), "scaling_factor": scale}))
    out = convert_ok(src, tmp_path / "dst")
    assert f"family: {flavour}" in out
    if layout == "sd1-legacy-vae":
        assert "legacy attention names" in out
    pipe = P.load_pipeline(tmp_path / "dst")
    assert pipe.family == flavour and pipe.tokenizer.pad_id == tok.pad_id
    assert pipe.prediction_type == ("epsilon" if flavour == "sd1" else "v_prediction")
    assert pipe.scale_factor == pytest.approx(scale) and pipe.image["range"] == [-1.0, 1.0]
    compare_sd(pipe, models, src / "tokenizer", layout)
    if layout != "sd1-safetensors":
        return
    # re-running over an existing conversion is safe and leaves no temp folders behind
    convert_ok(src, tmp_path / "dst", "--dtype", "fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]
    assert P.load_pipeline(tmp_path / "dst").unet.conv_in.weight.dtype == torch.float32  # loads in the asked dtype
    from ldm.weights.safetensors import read_header
    assert read_header(tmp_path / "dst" / "unet.safetensors")["conv_in.weight"]["dtype"] == "F16"


@pytest.mark.parametrize("flavour, suffix", [("sd1", ".ckpt"), ("sd2", ".safetensors")])
def test_compvis_single_file_round_trip(tmp_path, flavour, suffix):
    from ldm.weights import folder as P
    models = tiny_sd(flavour)
    src = tmp_path / f"model{suffix}"
    write_compvis(src, models, flavour)
    if suffix == ".ckpt":  # the premise: torch's allow-list refuses the pickled foreign object
        with pytest.raises(pickle.UnpicklingError):
            torch.load(src, weights_only=True)
    tok = tiny_tokenizer(tmp_path / "tok", pad="eos" if flavour == "sd1" else "!")
    if flavour == "sd1":
        r = run_cli(src, tmp_path / "dst")  # no tokenizer: a clear error, nothing written
        assert r.returncode != 0 and "--tokenizer" in r.stderr and not (tmp_path / "dst").exists()
    else:
        with pytest.raises(P.PipelineError, match="--prediction-type"):  # SD2 files do not record it
            P.convert_checkpoint(src, tokenizer=tmp_path / "tok", log=lambda s: None)
    extra = ["--prediction-type", "v_prediction"] if flavour == "sd2" else []
    out = convert_ok(src, tmp_path / "dst", "--tokenizer", tmp_path / "tok", *extra)
    assert f"family: {flavour}" in out and "EMA copies" in out and "schedule buffers" in out
    pipe = P.load_pipeline(tmp_path / "dst")
    assert pipe.tokenizer.pad_id == tok.pad_id and pipe.family == flavour
    compare_sd(pipe, models, tmp_path / "tok", f"compvis {flavour}")


# ----------------------------------------------------------------------------------------------------------------
# MONAI CXR LDM

def tiny_monai():
    need("monai")
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    torch.manual_seed(2)
    ae = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(32, 64), latent_channels=3,
                       num_res_blocks=1, attention_levels=(False, False), with_encoder_nonlocal_attn=False,
                       with_decoder_nonlocal_attn=False, norm_num_groups=32).eval()
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=3, channels=(32, 64),
                              attention_levels=(False, True), num_res_blocks=1, num_head_channels=(0, 64),
                              with_conditioning=True, cross_attention_dim=64, norm_num_groups=32).eval()
    for module in (ae, unet):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return ae, unet


def to_generative_models_names(sd):
    """MONAI core >= 1.4 names -> the older MONAI GenerativeModels names the bundle was saved with."""
    out = {}
    for k, v in sd.items():
        for new, old in [(".out_proj.", ".to_out.0."), (".ff.linear1.", ".ff.net.0.proj."), (".ff.linear2.", ".ff.net.2."),
                         (".postconv.", ".conv.")]:
            k = k.replace(new, old)
        out[k] = v
    return out


@pytest.mark.parametrize("naming", ["monai14", "generative"])
def test_monai_pair_round_trip(tmp_path, naming):
    from ldm.weights import folder as P
    ae, unet = tiny_monai()
    sd2 = tiny_sd("sd2")
    write_diffusers(tmp_path / "sd21base", sd2, pad="!")
    bundle = tmp_path / "bundle" / "models"
    bundle.mkdir(parents=True)
    ae_sd, unet_sd = ae.state_dict(), unet.state_dict()
    if naming == "generative":
        ae_sd, unet_sd = to_generative_models_names(ae_sd), to_generative_models_names(unet_sd)
        # the old-named files really are what MONAI's own loader for old checkpoints accepts
        ae.load_old_state_dict(dict(ae_sd))  # (it pops keys from the dict it is given)
        unet.load_old_state_dict(dict(unet_sd))
    torch.save(ae_sd, bundle / "autoencoder.pth")
    torch.save(unet_sd, bundle / "diffusion_model.pth")
    with pytest.raises(P.PipelineError, match="--text-encoder"):
        P.convert_checkpoint(tmp_path / "bundle", log=lambda s: None)
    out = convert_ok(tmp_path / "bundle", tmp_path / "dst", "--text-encoder", tmp_path / "sd21base")
    assert "family: monai_cxr" in out
    pipe = P.load_pipeline(tmp_path / "dst")
    assert (pipe.family, pipe.prediction_type, pipe.scale_factor) == ("monai_cxr", "v_prediction", 0.3)
    assert pipe.image["channels"] == 1 and pipe.image["range"] == [0.0, 1.0]
    assert pipe.tokenizer.pad_id == pipe.tokenizer.encoder["!"]
    g = torch.Generator().manual_seed(4)
    x, z = torch.rand(1, 1, 16, 16, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    ctx, t = torch.randn(2, 77, 64, generator=g), torch.tensor([3, 700])
    ids = pipe.tokenizer(["small right pleural effusion"])
    with torch.no_grad():
        diffs = [cmp(f"monai {naming} vae encode", pipe.vae.encode(x), ae.encode(x)[0]),
                 cmp(f"monai {naming} vae decode", pipe.vae.decode(z), ae.decode(z)),
                 cmp(f"monai {naming} unet", pipe.unet(z, t, ctx), unet(z, timesteps=t, context=ctx)),
                 cmp("monai text encoder (sd21-base)", pipe.text_encoder(ids), sd2[0](ids).last_hidden_state)]
    assert max(diffs) < TOL


# ----------------------------------------------------------------------------------------------------------------
# Strict loading, atomic saving, rule checks against the real key lists

def test_strict_loading_lists_every_problem_once(tmp_path):
    from ldm.weights import folder as P
    from ldm.weights.safetensors import load_file, save_file
    models = tiny_sd("sd1")
    write_diffusers(tmp_path / "src", models, pad="eos")
    P.save_pipeline(P.convert_checkpoint(tmp_path / "src", log=lambda s: None), tmp_path / "dst")
    unet_file, vae_file = tmp_path / "dst" / "unet.safetensors", tmp_path / "dst" / "vae.safetensors"
    sd = load_file(unet_file, copy=True)
    del sd["conv_in.weight"], sd["conv_in.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    save_file(sd, unet_file)
    vae = load_file(vae_file, copy=True)
    del vae["quant_conv.bias"]
    save_file(vae, vae_file)
    with pytest.raises(P.PipelineError) as err:
        P.load_pipeline(tmp_path / "dst")
    msg = str(err.value)
    print(msg)
    for piece in ["unet: 2 missing", "conv_in.bias", "unet: 1 unexpected", "extra.weight", "unet: 1 mis-shaped",
                  "conv_out.weight file [4, 32, 1, 1] vs model [4, 32, 3, 3]", "vae: 1 missing", "quant_conv.bias"]:
        assert piece in msg, piece


def test_folders_of_earlier_versions_load_and_unknown_keys_stay_errors(tmp_path):
    """model.yaml of an earlier version held unet.upcast_attention and vae.scale_factor (they change nothing now):
    such a folder loads as if they were absent; any other unknown key is an error naming it."""
    from ldm.weights import folder as P
    write_diffusers(tmp_path / "src", tiny_sd("sd1"), pad="eos")
    P.save_pipeline(P.convert_checkpoint(tmp_path / "src", log=lambda s: None), tmp_path / "dst")
    path = tmp_path / "dst" / "model.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["unet"]["upcast_attention"], cfg["vae"]["scale_factor"] = True, 0.5
    path.write_text(yaml.safe_dump(cfg))
    pipe = P.load_pipeline(tmp_path / "dst")
    assert pipe.vae.config.to_dict() == {k: v for k, v in cfg["vae"].items() if k != "scale_factor"}
    assert pipe.scale_factor == cfg["scale_factor"] != 0.5
    cfg["unet"]["upcast_attn"] = True                                   # a typo is not a retired key
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(P.PipelineError, match="unknown keys.*'upcast_attn'"):
        P.load_pipeline(tmp_path / "dst")


def test_save_is_atomic_and_never_clobbers_other_folders(tmp_path, monkeypatch):
    from ldm.weights import folder as P
    models = tiny_sd("sd1")
    write_diffusers(tmp_path / "src", models, pad="eos")
    pipe = P.convert_checkpoint(tmp_path / "src", log=lambda s: None)
    P.save_pipeline(pipe, tmp_path / "dst")
    before = (tmp_path / "dst" / "unet.safetensors").read_bytes()

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(P, "save_file", fail)  # a failure half-way through writing
    with pytest.raises(OSError):
        P.save_pipeline(pipe, tmp_path / "dst")
    assert (tmp_path / "dst" / "unet.safetensors").read_bytes() == before  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no temp folder left
    with pytest.raises(P.PipelineError, match="not a converted folder"):
        P.save_pipeline(pipe, tmp_path / "src")


def test_bad_sources_are_clear_errors(tmp_path):
    r = run_cli(tmp_path / "nothing-here", tmp_path / "dst")
    assert r.returncode != 0 and "nothing-here: no such file or folder" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli(tmp_path / "empty", tmp_path / "dst")
    assert r.returncode != 0 and "not a diffusers folder" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "evil.ckpt").write_bytes(b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    r = run_cli(tmp_path / "evil.ckpt", tmp_path / "dst")
    assert r.returncode != 0 and "refusing to load" in r.stderr and not (tmp_path / "dst").exists()


@pytest.mark.parametrize("fname, func", [("unet_ldm_map.txt", "compvis_unet_to_ours"),
                                         ("vae_ldm_map.txt", "compvis_vae_to_ours")])
def test_compvis_rules_reproduce_the_real_sd15_key_map(fname, func):
    """Every CompVis key of real SD 1.5 maps to the diffusers key and shape listed by the real libraries."""
    from ldm.weights import compvis as convert
    prefix = "model.diffusion_model." if "unet" in fname else "first_stage_model."
    src, want = {}, {}
    for line in (KEYS / fname).read_text().splitlines():
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        ldm_shape = json.loads(cols[3].split("=")[1]) if len(cols) > 3 else json.loads(cols[2])
        src[cols[0][len(prefix):]] = torch.empty(ldm_shape, device="meta")
        want[cols[1]] = json.loads(cols[2])
    got = {k: list(v.shape) for k, v in getattr(convert, func)(src).items()}
    assert got == want
    print(f"{fname}: all {len(want)} keys and shapes match")


def test_sd1_text_keys_without_text_model_level():
    from ldm.weights.compvis import sd1_text_to_ours
    w = torch.zeros(1)
    out = sd1_text_to_ours({"embeddings.position_ids": w, "encoder.layers.0.mlp.fc1.weight": w,
                            "text_model.final_layer_norm.weight": w})
    assert sorted(out) == ["text_model.encoder.layers.0.mlp.fc1.weight", "text_model.final_layer_norm.weight"]


# ----------------------------------------------------------------------------------------------------------------
# Real weights (only when pointed to by environment variables)

@pytest.mark.realweights
@pytest.mark.parametrize("var", ["LDM_REAL_SD15", "LDM_REAL_ROENTGEN", "LDM_REAL_MONAI_CXR"])
def test_real_weights(tmp_path, var):
    src = os.environ.get(var)
    if not src:
        pytest.skip(f"set {var} to a real checkpoint folder to run this test")
    from ldm.weights import folder as P
    g = torch.Generator().manual_seed(0)
    if var == "LDM_REAL_MONAI_CXR":
        sd21 = os.environ.get("LDM_REAL_SD21_BASE") or pytest.skip("LDM_REAL_SD21_BASE (SD 2.1-base folder) not set")
        need("monai")
        from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
        convert_ok(src, tmp_path / "dst", "--text-encoder", sd21)
        files = P._monai_files(Path(src))
        ae = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(64, 128, 128, 128),
                           latent_channels=3, num_res_blocks=2, attention_levels=(False,) * 4,
                           with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False).eval()
        unet = DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=3, channels=(256, 512, 768),
                                  num_res_blocks=2, attention_levels=(False, True, True),
                                  num_head_channels=(0, 512, 768), with_conditioning=True,
                                  cross_attention_dim=1024).eval()
        for net, f in [(ae, files[0]), (unet, files[1])]:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            try:
                net.load_state_dict(sd)
            except RuntimeError:
                net.load_old_state_dict(sd)
        x, z = torch.rand(1, 1, 256, 256, generator=g), torch.randn(1, 3, 32, 32, generator=g)
        ref_enc, ref_unet = (lambda x: ae.encode(x)[0]), (lambda z, t, c: unet(z, timesteps=t, context=c))
        ref_dec, ctx = ae.decode, torch.randn(1, 77, 1024, generator=g)
    else:
        diffusers = need("diffusers")
        convert_ok(src, tmp_path / "dst")
        vae = diffusers.AutoencoderKL.from_pretrained(src, subfolder="vae").eval()
        unet = diffusers.UNet2DConditionModel.from_pretrained(src, subfolder="unet").eval()
        x, z = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1, torch.randn(1, 4, 32, 32, generator=g)
        ref_enc, ref_dec = (lambda x: vae.encode(x).latent_dist.mean), (lambda z: vae.decode(z).sample)
        ref_unet, ctx = (lambda z, t, c: unet(z, t, c).sample), torch.randn(1, 77, unet.config.cross_attention_dim,
                                                                             generator=g)
    pipe = P.load_pipeline(tmp_path / "dst")
    t = torch.tensor([500])
    with torch.no_grad():
        zx = ref_enc(x)
        diffs = [cmp(f"{var} vae encode", pipe.vae.encode(x), zx), cmp(f"{var} vae decode", pipe.vae.decode(zx), ref_dec(zx)),
                 cmp(f"{var} unet", pipe.unet(z, t, ctx), ref_unet(z, t, ctx))]
    assert max(diffs) < 1e-4
