"""A MONAI bundle folder (models/*.pth + configs/inference.json) through convert_weights.py, against MONAI itself.

The bundle is written in the real model-zoo layout with a tiny RANDOM AutoencoderKL and DiffusionModelUNet whose
group counts, epsilons and head counts are NOT the CXR bundle's (16 / 8 groups, eps 1e-5, 4 heads), in both key
namings (MONAI GenerativeModels, MONAI core >= 1.4) and both json spellings (`num_channels` + `beta_schedule`,
`channels` + `schedule`). Converted outputs must match MONAI's; the same weights without the json must NOT (the
json is what carries heads and groups); a json that disagrees with the weights is refused naming the keys.
"""
import json
import shutil

import pytest
import torch
from test_convert import convert_ok, run_cli, tiny_sd, write_diffusers

from conftest import cmp, need

TOL = 1e-5
# non-CXR values everywhere the weights cannot show them
AE_ARGS = dict(spatial_dims=2, in_channels=1, out_channels=1, channels=[32, 64], latent_channels=3, num_res_blocks=1,
               norm_num_groups=8, norm_eps=1e-5, attention_levels=[False, False], with_encoder_nonlocal_attn=True,
               with_decoder_nonlocal_attn=True)
UNET_ARGS = dict(spatial_dims=2, in_channels=3, out_channels=3, channels=[32, 64], num_res_blocks=1,
                 attention_levels=[False, True], norm_num_groups=16, norm_eps=1e-5, resblock_updown=False,
                 num_head_channels=[0, 16], with_conditioning=True, transformer_num_layers=1, cross_attention_dim=64)
SCHED_ARGS = dict(beta_start=0.001, beta_end=0.02, num_train_timesteps=1000, prediction_type="v_prediction",
                  clip_sample=False)


def monai_models():
    need("monai")
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    torch.manual_seed(3)
    ae, unet = AutoencoderKL(**AE_ARGS).eval(), DiffusionModelUNet(**UNET_ARGS).eval()
    for module in (ae, unet):  # random (not zero-initialised) weights everywhere, so every key matters
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return ae, unet


def inference_json(naming, ae_args=AE_ARGS, unet_args=UNET_ARGS):
    """configs/inference.json as the model zoo writes it: imports, "$" expressions we must never need, "@" refs."""
    gen = naming == "generative"
    ae, unet = dict(ae_args), dict(unet_args)
    if gen:  # MONAI GenerativeModels spelling
        ae["num_channels"], unet["num_channels"] = ae.pop("channels"), unet.pop("channels")
    unet["norm_num_groups"] = "@unet_groups"  # a plain reference: resolved
    sched = dict(SCHED_ARGS, **({"beta_schedule": "scaled_linear"} if gen else {"schedule": "scaled_linear_beta"}))
    pkg = "generative.networks" if gen else "monai.networks"
    return {
        "imports": ["$import torch", "$from transformers import CLIPTextModel"],
        "bundle_root": ".", "load_old": int(gen), "unet_groups": UNET_ARGS["norm_num_groups"],
        "model_dir": "$@bundle_root + '/models'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "autoencoder_def": {"_target_": f"{pkg}.nets.AutoencoderKL", **ae},
        "load_autoencoder": "$@autoencoder_def.load_old_state_dict(torch.load(@model_dir + '/autoencoder.pth'))",
        "diffusion_def": {"_target_": f"{pkg}.nets.DiffusionModelUNet", **unet},
        "scheduler": {"_target_": f"{pkg}.schedulers.DDIMScheduler", "_requires_": ["@load_autoencoder"], **sched},
        "noise": "$torch.randn((1, 3, 64, 64)).to(@device)",
    }


def generative_models_names(sd):
    """MONAI core >= 1.4 names -> MONAI GenerativeModels names (the real bundle's, reference key lists):
    UNet attention `out_proj` was `to_out.0`; VAE attention q/k/v sat on the block and `out_proj` was `proj_attn`;
    VAE upsampler `postconv` was `conv`. (The UNet's `ff.linear1/2` did not change.)"""
    out = {}
    for k, v in sd.items():
        for new, old in [(".attn.to_q.", ".to_q."), (".attn.to_k.", ".to_k."), (".attn.to_v.", ".to_v."),
                         (".attn.out_proj.", ".proj_attn."), (".out_proj.", ".to_out.0."), (".postconv.", ".conv.")]:
            k = k.replace(new, old)
        out[k] = v
    return out


def write_bundle(root, ae, unet, naming, config):
    """root/models/{autoencoder,diffusion_model}.pth in `naming` + root/configs/inference.json (if config)."""
    (root / "models").mkdir(parents=True)
    ae_sd, unet_sd = ae.state_dict(), unet.state_dict()
    if naming == "generative":
        ae_sd, unet_sd = generative_models_names(ae_sd), generative_models_names(unet_sd)
        # the old-named files really are what MONAI's own loader for old checkpoints accepts
        for net, sd in ((ae, ae_sd), (unet, unet_sd)):
            fresh = type(net)(**(AE_ARGS if net is ae else UNET_ARGS))
            fresh.load_old_state_dict(dict(sd))  # (it pops keys from the dict it is given)
            assert all(torch.equal(v, net.state_dict()[k]) for k, v in fresh.state_dict().items())
    torch.save(ae_sd, root / "models" / "autoencoder.pth")
    torch.save(unet_sd, root / "models" / "diffusion_model.pth")
    if config is not None:
        (root / "configs").mkdir()
        (root / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    return root


@pytest.fixture(scope="module")
def sd21(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd21") / "sd21base"
    write_diffusers(folder, tiny_sd("sd2"), pad="!")
    return folder


def outputs(vae, unet, monai=False):
    g = torch.Generator().manual_seed(4)
    x, z = torch.rand(1, 1, 16, 16, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    ctx, t = torch.randn(2, 77, 64, generator=g), torch.tensor([3, 700])
    with torch.no_grad():
        if monai:
            return vae.encode(x)[0], vae.decode(z), unet(z, timesteps=t, context=ctx)
        return vae.encode(x), vae.decode(z), unet(z, t, ctx)


@pytest.mark.parametrize("naming", ["monai14", "generative"])
def test_bundle_folder_matches_monai(tmp_path, sd21, naming):
    from ldm.weights import folder as P
    from monai.networks.schedulers import DDIMScheduler
    ae, unet = monai_models()
    bundle = write_bundle(tmp_path / "bundle", ae, unet, naming, inference_json(naming))
    out = convert_ok(bundle, tmp_path / "dst", "--text-encoder", sd21)
    assert "configs/inference.json" in out and "UNet heads [1, 4], groups 16/8" in out
    pipe = P.load_pipeline(tmp_path / "dst")
    assert pipe.unet.config.num_attention_heads == (1, 4) and pipe.vae.config.mid_block_attention
    assert (pipe.unet.config.norm_eps, pipe.vae.config.norm_eps) == (1e-5, 1e-5)
    ref = outputs(ae, unet, monai=True)
    diffs = [cmp(f"bundle {naming} {name}", ours, want)
             for name, ours, want in zip(["vae encode", "vae decode", "unet"], outputs(pipe.vae, pipe.unet), ref)]
    assert max(diffs) < TOL
    # the schedule is the bundle's (0.001 -> 0.02), not the CXR preset's (0.0015 -> 0.0205)
    monai_sched = DDIMScheduler(schedule="scaled_linear_beta", **SCHED_ARGS)
    assert cmp("alphas_cumprod", pipe.scheduler.alphas_cumprod, monai_sched.alphas_cumprod, atol=1e-6) < 1e-6
    if naming == "generative":
        return
    # the models/ folder of the same bundle finds ../configs/inference.json too
    lines = []
    P.convert_checkpoint(bundle / "models", text_encoder=sd21, log=lines.append)
    assert any("UNet heads [1, 4]" in line for line in lines)

    # the same weights without the json (today's input: a bare folder with the two .pth files): the CXR defaults
    # (32 groups, one head) build a network that loads (the shapes agree) but computes something else -- which
    # is why the json must be read when it is there; and the fallback is said in ONE line
    bare = tmp_path / "bare"
    shutil.copytree(bundle / "models", bare)
    lines = []
    wrong = P.convert_checkpoint(bare, text_encoder=sd21, log=lines.append)
    notices = [line for line in lines if "configs" in line]
    print(notices)
    assert len(notices) == 1 and "no configs/inference.json" in notices[0]
    assert "32 groups" in notices[0] and "one head" in notices[0]
    assert cmp("unet without the json (must differ)", outputs(wrong.vae, wrong.unet)[2], ref[2]) > 1e-3


def test_bundle_that_disagrees_with_its_weights_is_refused(tmp_path, sd21):
    ae, unet = monai_models()
    # the json's cross-attention width and VAE mid blocks disagree with the weights
    wrong = inference_json("monai14", unet_args={**UNET_ARGS, "cross_attention_dim": 32},
                           ae_args={**AE_ARGS, "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False})
    bundle = write_bundle(tmp_path / "bundle", ae, unet, "monai14", wrong)
    r = run_cli(bundle, tmp_path / "dst", "--text-encoder", sd21)
    assert r.returncode != 0 and "Traceback" not in r.stderr and not (tmp_path / "dst").exists()
    msg = r.stderr
    assert "inference.json (autoencoder_def -> vae, diffusion_def -> unet)" in msg
    # names + shapes: the file's shape vs the shape the json's architecture needs
    assert "unet: 8 mis-shaped" in msg  # to_k and to_v of the 4 cross-attention layers (1 down, 1 mid, 2 up)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight file [64, 64] vs model [64, 32]" in msg
    assert "vae: 52 unexpected" in msg and "decoder.mid_block.attentions.0.to_k.weight [64, 64]" in msg


@pytest.mark.parametrize("where, value, message", [
    ("diffusion_def.norm_num_groups", "$8 * 2", "diffusion_def.norm_num_groups is the expression '$8 * 2'"),
    ("diffusion_def.norm_num_groups", "@nowhere", "no entry 'nowhere'"),
    ("autoencoder_def.attention_levels", [False, True], "attention inside the VAE levels is not supported"),
    ("diffusion_def.num_head_channels", [0, 24], "num_head_channels[1]=24 must divide the level's width 64"),
    ("scheduler.clip_sample", True, "clip_sample=True is not supported"),
    ("scheduler.schedule", "cosine", "scheduler.schedule='cosine' is not supported"),
])
def test_bundle_values_we_cannot_use_are_clear_errors(tmp_path, where, value, message):
    from ldm.weights import folder as P
    ae, unet = monai_models()
    config = inference_json("monai14")
    section, key = where.split(".")
    config[section][key] = value
    bundle = write_bundle(tmp_path / "bundle", ae, unet, "monai14", config)
    with pytest.raises(ValueError) as err:
        P.convert_checkpoint(bundle, text_encoder=tmp_path, log=lambda s: None)
    print(err.value)
    assert "inference.json" in str(err.value) and message in str(err.value)


def test_reading_the_real_cxr_file_layout(tmp_path):
    """The CXR bundle's own inference.json (values from the model zoo) -> the CXR presets of ldm/."""
    from ldm.weights.monai_bundle import read_bundle
    from ldm.schedulers import SchedulerConfig
    from ldm.unet import UNetConfig
    from ldm.vae import VAEConfig
    cxr = inference_json("monai14",
                         ae_args=dict(spatial_dims=2, in_channels=1, out_channels=1, latent_channels=3,
                                      channels=[64, 128, 128, 128], num_res_blocks=2, norm_num_groups=32,
                                      norm_eps=1e-6, attention_levels=[False] * 4, with_encoder_nonlocal_attn=False,
                                      with_decoder_nonlocal_attn=False),
                         unet_args=dict(spatial_dims=2, in_channels=3, out_channels=3, channels=[256, 512, 768],
                                        num_res_blocks=2, attention_levels=[False, True, True], norm_num_groups=32,
                                        norm_eps=1e-6, resblock_updown=False, num_head_channels=[0, 512, 768],
                                        with_conditioning=True, transformer_num_layers=1, cross_attention_dim=1024))
    cxr["unet_groups"] = 32
    cxr["scheduler"].update(beta_start=0.0015, beta_end=0.0205)
    (tmp_path / "inference.json").write_text(json.dumps(cxr))
    got = read_bundle(tmp_path / "inference.json", SchedulerConfig.monai_cxr().to_dict())
    assert UNetConfig.from_dict(got["unet"]) == UNetConfig.monai_cxr()
    assert VAEConfig.from_dict(got["vae"]) == VAEConfig.monai_cxr()
    assert SchedulerConfig.from_dict(got["scheduler"]) == SchedulerConfig.monai_cxr()
