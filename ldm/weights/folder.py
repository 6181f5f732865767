"""The converted-folder format, strict loading, atomic saving, and conversion from every source family.

A converted folder (ARCHITECTURE.md "The converted-folder format"):

    DST/model.yaml                    family, scale_factor, prediction_type, image, tokenizer, and the configs of
                                      text_encoder / vae / unet / scheduler (our dataclasses' to_dict())
    DST/{text_encoder,vae,unet}.safetensors   our key names (= diffusers / transformers names)
    DST/tokenizer/vocab.json, merges.txt

`load_pipeline` builds each module from its config and loads its weights STRICTLY: every key and every shape
is checked first, and all problems of all components come back as ONE error. `save_pipeline` writes a temp
folder beside DST and renames it into place, so DST is either the old folder or the complete new one.
`convert_checkpoint` reads a diffusers folder, a CompVis single file or the MONAI CXR pair / bundle folder (+ an
SD 2.1-base folder for its text encoder) and returns a Pipeline (what convert_weights.py saves). The renaming
rules live in ldm/weights/compvis.py (diffusers family) and ldm/weights/monai.py (MONAI), a bundle's
configs/inference.json is read by ldm/weights/monai_bundle.py, safe file reading in ldm/weights/checkpoint.py and
ldm/weights/safetensors.py, foreign config files in ldm/weights/configs.py. The Pipeline itself (the model) is
ldm/pipeline.py.
"""
import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

import torch
import yaml

from ldm.weights.checkpoint import load_state_dict
from ldm.weights.compvis import (legacy_vae_to_ours, sd1_text_to_ours, split_compvis, text_config_from_state_dict,
                                 unet_config_from_state_dict, vae_config_from_state_dict)
from ldm.weights.monai import monai_unet_to_ours, monai_vae_to_ours
from ldm.weights.monai_bundle import find_inference_json, read_bundle
from ldm.weights.safetensors import current_umask, load_file, save_file
from ldm.schedulers import DDIMScheduler, SchedulerConfig
from ldm.text_encoder import TextEncoderConfig
from ldm.tokenizer import CLIPTokenizer, read_pad_token
from ldm.unet import UNetConfig
from ldm.vae import VAEConfig
from ldm.pipeline import COMPONENTS, FAMILIES, IMAGE_RANGES, PAD_TOKENS, Pipeline, SCALE_FACTORS
from ldm.weights.configs import (scheduler_config_from_diffusers, text_config_from_hf, unet_config_from_diffusers,
                                 vae_config_from_diffusers)


# ----------------------------------------------------------------------------------------------------------------
# Strict loading


class PipelineError(ValueError):
    """A converted folder or a source checkpoint does not match what the model needs."""


def _mismatches(module, state_dict):
    """(missing, unexpected, [(key, file shape, model shape)]) between a module and a state dict."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    # names with their shapes (the model's for a missing key, the file's for an unexpected one)
    missing = [f"{k} {list(expected[k])}" for k in sorted(expected.keys() - state_dict.keys())]
    unexpected = [f"{k} {list(state_dict[k].shape)}" for k in sorted(state_dict.keys() - expected.keys())]
    shapes = [(k, tuple(state_dict[k].shape), expected[k]) for k in sorted(expected.keys() & state_dict.keys())
              if tuple(state_dict[k].shape) != expected[k]]
    return missing, unexpected, shapes


def _report(name, missing, unexpected, shapes, first=5):
    """One paragraph per component: counts and the first few keys of each kind."""
    lines = []
    if missing:
        lines.append(f"  {name}: {len(missing)} missing, e.g. {missing[:first]}")
    if unexpected:
        lines.append(f"  {name}: {len(unexpected)} unexpected, e.g. {unexpected[:first]}")
    if shapes:
        lines.append(f"  {name}: {len(shapes)} mis-shaped, e.g. " +
                     ", ".join(f"{k} file {list(a)} vs model {list(b)}" for k, a, b in shapes[:first]))
    return lines


def build_modules(configs, weights, device="cpu", dtype=torch.float32, source=""):
    """Build {name: module} from {name: config} and load {name: state dict} strictly (one error for all).

    Modules are built on the meta device (no random init of ~1B parameters) and take the loaded tensors as
    their parameters (assign=True): for fp32 safetensors on CPU the parameters stay zero-copy views of the file.
    """
    modules, problems = {}, []
    for name, (_, module_cls) in COMPONENTS.items():
        with torch.device("meta"):
            modules[name] = module_cls(configs[name])
        problems += _report(name, *_mismatches(modules[name], weights[name]))
    if problems:
        raise PipelineError(f"{source}: the weights do not match the architecture in the config:\n" + "\n".join(problems))
    for name, module in modules.items():
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights[name].items()}
        module.load_state_dict(sd, strict=True, assign=True)
        modules[name] = module.to(device).eval()
    return modules


# model.yaml keys that folders converted by an earlier version of this code hold and that change nothing now; they
# are dropped when the folder is read, so those folders still load (any other unknown key is an error: a typo in
# model.yaml must not silently fall back to a default).
RETIRED_KEYS = {
    "unet": ("upcast_attention",),   # diffusers' SD2 flag: ldm/attention.py always computes attention in float32
    "vae": ("scale_factor",),        # the latent scale is the pipeline's: model.yaml's top-level scale_factor
}


def _read_yaml(path):
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise PipelineError(f"{path}: cannot read the model config ({e})") from None
    required = ["family", "scale_factor", "prediction_type", "image", "tokenizer", "scheduler", *COMPONENTS]
    missing = [k for k in required if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise PipelineError(f"{path}: missing keys {missing}; is this a folder written by convert_weights.py?")
    if cfg["family"] not in FAMILIES:
        raise PipelineError(f"{path}: family {cfg['family']!r} is not one of {FAMILIES}")
    # every field of every section: a key left out would silently take the default of another model (SD1.5's)
    sections = {**{name: cfg_cls for name, (cfg_cls, _) in COMPONENTS.items()}, "scheduler": SchedulerConfig}
    for name, cfg_cls in sections.items():
        if not isinstance(cfg[name], dict):
            raise PipelineError(f"{path}: section {name!r} must be a mapping of config keys")
        cfg[name] = {k: v for k, v in cfg[name].items() if k not in RETIRED_KEYS.get(name, ())}
        absent = [f.name for f in fields(cfg_cls) if f.name not in cfg[name]]
        if absent:
            raise PipelineError(f"{path}: section {name!r} lacks keys {absent}; re-convert the checkpoint with "
                                "convert_weights.py (model.yaml is written whole, never by hand)")
    if cfg["scheduler"]["prediction_type"] != cfg["prediction_type"]:
        raise PipelineError(f"{path}: prediction_type {cfg['prediction_type']!r} disagrees with the scheduler's "
                            f"{cfg['scheduler']['prediction_type']!r}")
    return cfg


def load_pipeline(path, device="cpu", dtype=torch.float32):
    """Load a converted folder -> Pipeline (modules in eval mode on `device`, floating weights in `dtype`)."""
    path = Path(path)
    if not (path / "model.yaml").is_file():
        raise PipelineError(f"{path}: no model.yaml; convert a checkpoint first: python convert_weights.py SRC {path}")
    cfg = _read_yaml(path / "model.yaml")
    try:
        configs = {name: cfg_cls.from_dict(cfg[name]) for name, (cfg_cls, _) in COMPONENTS.items()}
        scheduler = DDIMScheduler(SchedulerConfig.from_dict(cfg["scheduler"]))
    except (ValueError, TypeError) as e:
        raise PipelineError(f"{path / 'model.yaml'}: bad value ({type(e).__name__}: {e})") from None
    try:
        tokenizer = CLIPTokenizer.from_dir(path / "tokenizer", pad_id=cfg["tokenizer"]["pad_id"],
                                           max_length=cfg["tokenizer"].get("max_length", 77))
    except (ValueError, TypeError, KeyError, OSError) as e:  # incl. a truncated vocab.json (JSONDecodeError)
        raise PipelineError(f"{path / 'tokenizer'} (vocab.json, merges.txt; pad_id in model.yaml): cannot be read "
                            f"({type(e).__name__}: {e}); re-convert, or copy the tokenizer folder of the source "
                            "model") from None
    weights = {}
    for name in COMPONENTS:
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise PipelineError(f"{path}: {file.name} is missing")
        weights[name] = load_file(file)
    modules = build_modules(configs, weights, device, dtype, source=str(path))
    return Pipeline(tokenizer=tokenizer, scheduler=scheduler, scale_factor=cfg["scale_factor"],
                    prediction_type=cfg["prediction_type"], family=cfg["family"], image=cfg["image"], config=cfg,
                    **modules)


# ----------------------------------------------------------------------------------------------------------------
# Atomic saving


def save_pipeline(pipe, path, dtype=None):
    """Write `pipe` as a converted folder at `path` (weights cast to `dtype` if given, e.g. torch.float16).

    Everything goes to a temp folder beside `path` first; only a complete folder is renamed into place, and an
    existing converted folder is replaced only after the new one is complete. Re-running is safe.
    """
    path = Path(path).absolute()
    if path.exists() and not (path / "model.yaml").is_file() and (not path.is_dir() or any(path.iterdir())):
        raise PipelineError(f"{path} exists and is not a converted folder; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the saved folder gets the usual permissions
    try:
        config = pipe.model_config()
        with open(tmp / "model.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        pipe.tokenizer.save(tmp / "tokenizer")
        for name in COMPONENTS:
            sd = getattr(pipe, name).state_dict()
            if dtype is not None:
                sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
            save_file(sd, tmp / f"{name}.safetensors", metadata={"format": "pt", "family": pipe.family})
        old = None
        if path.exists():  # move the old folder aside, put the new one in place, then delete the old one
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pipe.config = config
    return path


# ----------------------------------------------------------------------------------------------------------------
# Conversion from source checkpoints (used by convert_weights.py)


_WEIGHT_NAMES = [f"{base}{ext}" for ext in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
                 for base in ("diffusion_pytorch_model", "model", "pytorch_model")]


def _weights_in(folder):
    """The weight file of a diffusers component folder (single, sharded index, .bin; fp16 variants last)."""
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    variants = sorted(p for p in folder.glob("*") if p.name.endswith((".safetensors", ".bin")))
    if variants:
        return variants[0]
    raise PipelineError(f"{folder}: no weights (expected one of {_WEIGHT_NAMES[:3]} ...)")


def _json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: cannot read ({e})") from None


def detect_source(src):
    """-> "diffusers" | "compvis" | "monai", from the files present."""
    src = Path(src)
    if not src.exists():
        raise PipelineError(f"{src}: no such file or folder")
    if src.is_file():
        if src.suffix in (".ckpt", ".safetensors", ".pt", ".pth", ".bin"):
            return "compvis"
    elif src.is_dir():
        if (src / "unet" / "config.json").is_file() and (src / "vae" / "config.json").is_file():
            return "diffusers"
        if _monai_files(src):
            return "monai"
    raise PipelineError(f"{src}: not a diffusers folder (unet/, vae/, text_encoder/ ...), a CompVis .ckpt / "
                        ".safetensors file, or a folder with MONAI autoencoder.pth + diffusion_model.pth")


def _monai_files(src):
    for folder in (src, src / "models"):  # the model-zoo bundle keeps them in models/
        if (folder / "autoencoder.pth").is_file() and (folder / "diffusion_model.pth").is_file():
            return folder / "autoencoder.pth", folder / "diffusion_model.pth"
    return None


def _tokenizer(folder, family):
    """A tokenizer from a folder with vocab.json + merges.txt (or a diffusers folder with tokenizer/)."""
    folder = Path(folder)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if folder.name.endswith(".gz"):  # OpenAI's bpe_simple_vocab_16e6.txt.gz
        tok = CLIPTokenizer.from_openai_bpe(folder, pad_id=0)
    else:
        tok = CLIPTokenizer.from_dir(folder, pad_id=0)
    tok.pad_id = tok.encoder[PAD_TOKENS[family]]  # the family's convention, whatever the folder says
    return tok


def _text_from_diffusers(folder):
    folder = Path(folder)
    config = text_config_from_hf(_json(folder / "text_encoder" / "config.json"))
    # drops position_ids; adds the `text_model.` level that transformers >= 5 no longer writes on save
    return config, sd1_text_to_ours(load_state_dict(_weights_in(folder / "text_encoder")))


def _image(family, unet_config, vae_config):
    f = 2 ** (len(vae_config.block_out_channels) - 1)
    return {"channels": vae_config.in_channels, "size": unet_config.sample_size * f, "range": IMAGE_RANGES[family]}


def convert_checkpoint(src, text_encoder=None, tokenizer=None, prediction_type=None, use_ema=False, log=print):
    """Read any supported source -> Pipeline (on CPU, float32). `log` gets one line per finding."""
    src = Path(src)
    kind = detect_source(src)
    log(f"source: {src} -> {kind}")
    if kind == "diffusers":
        text_cfg, text_sd = _text_from_diffusers(src)
        vae_json = _json(src / "vae" / "config.json")
        vae_cfg = vae_config_from_diffusers(vae_json)
        unet_cfg = unet_config_from_diffusers(_json(src / "unet" / "config.json"))
        sched = _json(src / "scheduler" / "scheduler_config.json")
        vae_sd = load_state_dict(_weights_in(src / "vae"))
        if any(".query." in k or ".proj_attn." in k for k in vae_sd):
            log("vae: legacy attention names (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0")
        vae_sd, unet_sd = legacy_vae_to_ours(vae_sd), load_state_dict(_weights_in(src / "unet"))
        # OpenAI CLIP (SD1, RoentGen) uses quick_gelu, OpenCLIP (SD2) exact gelu
        family = "sd1" if text_cfg.hidden_act == "quick_gelu" else "sd2"
        sched_cfg = scheduler_config_from_diffusers(sched)
        if read_pad_token(src / "tokenizer") is not None:
            tok = CLIPTokenizer.from_dir(src / "tokenizer")  # the folder's own pad token
        else:
            tok = _tokenizer(src, family)                    # the family's convention
        scale = vae_json.get("scaling_factor", SCALE_FACTORS[family])
    elif kind == "compvis":
        try:
            parts, family, dropped = split_compvis(load_state_dict(src), use_ema=use_ema)
        except ValueError as e:  # e.g. a converted folder's unet.safetensors given as a CompVis file
            raise PipelineError(f"{src}: {e}") from None
        for what, n in dropped.items():
            log(f"dropped {n} keys: {what}")
        text_sd, vae_sd, unet_sd = parts["text"], parts["vae"], parts["unet"]
        text_cfg = TextEncoderConfig.from_dict(text_config_from_state_dict(
            text_sd, "quick_gelu" if family == "sd1" else "gelu"))
        vae_cfg = VAEConfig.from_dict(vae_config_from_state_dict(vae_sd))
        if family == "sd2" and prediction_type is None:
            raise PipelineError(f"{src}: an SD 2.x single file does not record its prediction type: pass "
                                "--prediction-type v_prediction (768-v models) or epsilon (512-base models)")
        prediction_type = prediction_type or "epsilon"
        heads = {"heads": 8} if family == "sd1" else {"head_dim": 64}  # SD1: 8 heads; SD2: 64-wide heads
        unet_cfg = UNetConfig.from_dict({**unet_config_from_state_dict(unet_sd, **heads),
                                         "sample_size": 96 if prediction_type == "v_prediction" else 64})
        sched_cfg = SchedulerConfig.from_dict({**SchedulerConfig.sd15().to_dict(), "prediction_type": prediction_type})
        if tokenizer is None:
            raise PipelineError(f"{src}: a CompVis single file carries no tokenizer: pass --tokenizer DIR (a folder "
                                "with vocab.json + merges.txt, e.g. the tokenizer/ of any SD diffusers folder)")
        tok, scale = _tokenizer(tokenizer, family), SCALE_FACTORS[family]
    else:  # MONAI CXR LDM: two plain state dicts + an SD 2.1-base folder for the text side
        if text_encoder is None:
            raise PipelineError(f"{src}: the MONAI CXR LDM uses the SD 2.1-base text encoder and tokenizer: pass "
                                "--text-encoder DIR (a stable-diffusion-2-1-base diffusers folder)")
        family = "monai_cxr"
        ae_path, unet_path = _monai_files(src)
        vae_sd, unet_sd = monai_vae_to_ours(load_state_dict(ae_path)), monai_unet_to_ours(load_state_dict(unet_path))
        scale, sched_cfg = SCALE_FACTORS[family], SchedulerConfig.monai_cxr()
        bundle_json = find_inference_json(src)
        if bundle_json is not None:  # the bundle says how the networks were built: heads, groups, eps, schedule
            bundle = read_bundle(bundle_json, sched_cfg.to_dict())
            try:  # values our configs refuse (e.g. clip_sample true, widths not divisible by the groups)
                vae_cfg = VAEConfig.from_dict(bundle["vae"])
                unet_cfg = UNetConfig.from_dict(bundle["unet"])
                if bundle["scheduler"] is not None:
                    sched_cfg = SchedulerConfig.from_dict(bundle["scheduler"])
            except ValueError as e:
                raise PipelineError(f"{bundle_json}: {e}") from None
            log(f"configs: {bundle_json} (autoencoder_def, diffusion_def, "
                f"{'scheduler' if bundle['scheduler'] else 'no scheduler object: the CXR schedule'}); UNet heads "
                f"{list(unet_cfg.num_attention_heads)}, groups {unet_cfg.norm_num_groups}/{vae_cfg.norm_num_groups} "
                f"(UNet/VAE), eps {unet_cfg.norm_eps:g}/{vae_cfg.norm_eps:g}")
            source = f"{src}: {bundle_json.name} (autoencoder_def -> vae, diffusion_def -> unet) vs the .pth weights"
        else:
            # MONAI conventions not visible in the shapes: GroupNorm -> conv_out without SiLU, eps 1e-6, one head
            log(f"configs: no configs/inference.json in {src}: the CXR bundle's values for what the weights do not "
                "show (32 groups, eps 1e-6, one head per attention layer, scaled_linear 0.0015-0.0205 v-prediction)")
            vae_cfg = VAEConfig.from_dict({**vae_config_from_state_dict(vae_sd), "silu_before_conv_out": False,
                                           "mid_block": any(k.startswith("encoder.mid_block.") for k in vae_sd),
                                           "quant": "split" if "quant_conv_mu.weight" in vae_sd else "joint"})
            unet_cfg = UNetConfig.from_dict({**unet_config_from_state_dict(unet_sd, heads=1), "norm_eps": 1e-6})
            source = str(src)
        text_cfg, text_sd = _text_from_diffusers(text_encoder)
        tok = _tokenizer(text_encoder, family)
    log(f"family: {family}; text encoder {text_cfg.num_hidden_layers} layers x {text_cfg.hidden_size}; "
        f"VAE levels {vae_cfg.block_out_channels}; UNet levels {list(unet_cfg.block_out_channels)}; "
        f"prediction {sched_cfg.prediction_type}; scale factor {scale}; pad id {tok.pad_id}")
    configs = {"text_encoder": text_cfg, "vae": vae_cfg, "unet": unet_cfg}
    modules = build_modules(configs, {"text_encoder": text_sd, "vae": vae_sd, "unet": unet_sd},
                            source=source if kind == "monai" else str(src))
    return Pipeline(tokenizer=tok, scheduler=DDIMScheduler(sched_cfg), scale_factor=scale,
                    prediction_type=sched_cfg.prediction_type, family=family,
                    image=_image(family, unet_cfg, vae_cfg), **modules)
