"""Our model configs from a MONAI bundle's configs/inference.json (the paper's CXR LDM comes as such a bundle).

A MONAI model-zoo bundle (e.g. cxr_image_synthesis_latent_diffusion_model) is a folder

    BUNDLE/models/autoencoder.pth, BUNDLE/models/diffusion_model.pth     plain state dicts (ldm/weights/monai.py)
    BUNDLE/configs/inference.json                                        how the networks were built

whose `autoencoder_def` and `diffusion_def` objects hold the constructor arguments of MONAI's AutoencoderKL and
DiffusionModelUNet, and whose `scheduler` object holds the noise schedule. Head counts, GroupNorm group counts
and epsilons are NOT visible in the weights' shapes, which is why this file matters: without it the converter
falls back to the CXR bundle's values (32 groups, eps 1e-6, one head per attention layer).

Both generations of the file are read: MONAI GenerativeModels (`num_channels`, `beta_schedule: scaled_linear`,
`_target_: generative.networks.nets...`) and MONAI core >= 1.4 (`channels`, `schedule: scaled_linear_beta`).
Bundle values may be references to other entries ("@key", nested "@a::b" or "@a#b"); those are resolved. Python
expressions ("$...") and file macros ("%...") are never evaluated: a value we need that is one is an error naming
its key. Entries we do not need (imports, devices, "$torch.load(...)" lines) are never looked at.
"""
import json
from pathlib import Path

# MONAI constructor defaults (monai.networks.nets.AutoencoderKL / DiffusionModelUNet, schedulers.DDIMScheduler):
# a key the file leaves out means what it means to MONAI.
_AE_DEFAULTS = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "num_res_blocks": 2,
                "channels": [32, 64, 64, 64], "attention_levels": [False, False, True, True], "latent_channels": 3,
                "norm_num_groups": 32, "norm_eps": 1e-6, "with_encoder_nonlocal_attn": True,
                "with_decoder_nonlocal_attn": True, "use_convtranspose": False, "include_fc": True,
                "use_combined_linear": False}
_UNET_DEFAULTS = {"spatial_dims": 2, "num_res_blocks": 2, "channels": [32, 64, 64, 64],
                  "attention_levels": [False, False, True, True], "norm_num_groups": 32, "norm_eps": 1e-6,
                  "resblock_updown": False, "num_head_channels": 8, "with_conditioning": False,
                  "transformer_num_layers": 1, "cross_attention_dim": None, "num_class_embeds": None,
                  "include_fc": True, "use_combined_linear": False}
_SCHED_DEFAULTS = {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 2e-2,
                   "prediction_type": "epsilon", "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0}
# MONAI schedule names (and the GenerativeModels / diffusers spellings) -> ours
_SCHEDULES = {"linear_beta": "linear", "linear": "linear", "scaled_linear_beta": "scaled_linear",
              "scaled_linear": "scaled_linear"}
# arguments that only change speed or memory, never the numbers or the keys
_IGNORED = {"_target_", "_requires_", "_disabled_", "_desc_", "_mode_", "use_checkpoint", "use_flash_attention",
            "upcast_attention", "dropout_cattn"}


class BundleError(ValueError):
    """configs/inference.json cannot be turned into our configs (names the file and the key)."""


def find_inference_json(src):
    """configs/inference.json of the bundle that `src` is (the bundle folder or its models/ folder), or None."""
    src = Path(src)
    for root in (src, src.parent if src.name == "models" else None):
        if root is not None and (root / "configs" / "inference.json").is_file():
            return root / "configs" / "inference.json"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Reading: references are resolved, expressions refused

def _lookup(config, ref, path, where):
    """The entry "@a::b" (or "@a#b") names, resolved in its turn."""
    node, keys = config, ref[1:].replace("#", "::").split("::")
    for k in keys:
        if isinstance(node, list) and k.isdigit() and int(k) < len(node):
            node = node[int(k)]
        elif isinstance(node, dict) and k in node:
            node = node[k]
        else:
            raise BundleError(f"{path}: {where} is the reference {ref!r}, but the file has no entry {ref[1:]!r}")
    return node


def _resolve(config, value, path, where, seen=()):
    """A plain JSON value with every "@..." reference replaced by what it names; "$..." / "%..." are errors."""
    if isinstance(value, str) and value.startswith("@"):
        if value in seen:
            raise BundleError(f"{path}: {where}: circular reference {' -> '.join(seen + (value,))}")
        return _resolve(config, _lookup(config, value, path, where), path, where, seen + (value,))
    if isinstance(value, str) and value.startswith(("$", "%")):
        raise BundleError(f"{path}: {where} is the expression {value!r}; expressions are never evaluated here. "
                          "Write the plain value into the file (or into a copy of it) and convert again")
    if isinstance(value, list):
        return [_resolve(config, v, path, f"{where}[{i}]", seen) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _resolve(config, v, path, f"{where}.{k}", seen) for k, v in value.items()}
    return value


def _section(config, name, known, path):
    """One constructor object (`autoencoder_def`, ...) -> plain dict of the MONAI arguments it sets."""
    raw = config.get(name)
    if isinstance(raw, str) and raw.startswith("@"):
        raw = _lookup(config, raw, path, name)
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: no `{name}` object (MONAI constructor arguments); is this a MONAI LDM bundle?")
    args = {k: _resolve(config, v, path, f"{name}.{k}") for k, v in raw.items() if k not in _IGNORED}
    if "num_channels" in args:  # MONAI GenerativeModels spelling of `channels`
        args["channels"] = args.pop("num_channels")
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise BundleError(f"{path}: {name} has arguments this converter does not know: {unknown}")
    return args


def _per_level(value, n, path, key):
    """An int or a per-level list -> list of n values."""
    values = [value] * n if isinstance(value, (int, float)) else list(value)
    if len(values) != n:
        raise BundleError(f"{path}: {key}={value} must have one entry per level ({n})")
    return values


def _require(args, name, path, wants):
    """Arguments whose other values would need code we do not have: refuse with the key."""
    for key, want in wants.items():
        if args[key] != want:
            raise BundleError(f"{path}: {name}.{key}={args[key]!r} is not supported by ldm/ (only {want!r})")


# ----------------------------------------------------------------------------------------------------------------
# MONAI arguments -> our config dicts

def vae_config(ae, path):
    """autoencoder_def -> dict for VAEConfig.from_dict (MONAI layout: no SiLU before conv_out, split quant convs)."""
    _require(ae, "autoencoder_def", path, {"spatial_dims": 2, "use_convtranspose": False, "include_fc": True,
                                           "use_combined_linear": False})
    levels = len(ae["channels"])
    if any(_per_level(ae["attention_levels"], levels, path, "autoencoder_def.attention_levels")):
        raise BundleError(f"{path}: autoencoder_def.attention_levels={ae['attention_levels']}: attention inside "
                          "the VAE levels is not supported by ldm/vae.py (only the non-local mid block)")
    blocks = set(_per_level(ae["num_res_blocks"], levels, path, "autoencoder_def.num_res_blocks"))
    if len(blocks) != 1:
        raise BundleError(f"{path}: autoencoder_def.num_res_blocks={ae['num_res_blocks']}: per-level counts are "
                          "not supported by ldm/vae.py")
    if ae["with_encoder_nonlocal_attn"] != ae["with_decoder_nonlocal_attn"]:
        raise BundleError(f"{path}: with_encoder_nonlocal_attn={ae['with_encoder_nonlocal_attn']} and "
                          f"with_decoder_nonlocal_attn={ae['with_decoder_nonlocal_attn']} differ; ldm/vae.py has "
                          "one mid-block setting for both")
    mid = bool(ae["with_encoder_nonlocal_attn"])  # MONAI's mid block is resnet-attention-resnet or nothing at all
    n = blocks.pop()
    return {"in_channels": ae["in_channels"], "out_channels": ae["out_channels"],
            "latent_channels": ae["latent_channels"], "block_out_channels": list(ae["channels"]),
            "layers_per_block": n, "decoder_layers_per_block": n, "norm_num_groups": ae["norm_num_groups"],
            "norm_eps": float(ae["norm_eps"]), "mid_block": mid, "mid_block_attention": mid, "quant": "split",
            "silu_before_conv_out": False}


def unet_config(d, path):
    """diffusion_def -> dict for UNetConfig.from_dict. MONAI gives head WIDTHS; we keep head COUNTS."""
    _require(d, "diffusion_def", path, {"spatial_dims": 2, "resblock_updown": False, "with_conditioning": True,
                                        "transformer_num_layers": 1, "num_class_embeds": None, "include_fc": True,
                                        "use_combined_linear": False})
    channels = list(d["channels"])
    levels = len(channels)
    blocks = set(_per_level(d["num_res_blocks"], levels, path, "diffusion_def.num_res_blocks"))
    if len(blocks) != 1:
        raise BundleError(f"{path}: diffusion_def.num_res_blocks={d['num_res_blocks']}: per-level counts are not "
                          "supported by ldm/unet.py")
    attention = [bool(a) for a in _per_level(d["attention_levels"], levels, path, "diffusion_def.attention_levels")]
    widths = _per_level(d["num_head_channels"], levels, path, "diffusion_def.num_head_channels")
    heads = []
    for i, (c, w) in enumerate(zip(channels, widths)):
        # MONAI ignores the width of a level without attention, except the deepest (the mid block uses it)
        if not (attention[i] or i == levels - 1):
            heads.append(1)
        elif not w or c % w:
            raise BundleError(f"{path}: diffusion_def.num_head_channels[{i}]={w} must divide the level's width {c}")
        else:
            heads.append(c // w)
    eps = float(d["norm_eps"])
    return {"in_channels": d["in_channels"], "out_channels": d["out_channels"], "block_out_channels": channels,
            "layers_per_block": blocks.pop(), "attention_levels": attention, "num_attention_heads": heads,
            "cross_attention_dim": d["cross_attention_dim"], "norm_num_groups": d["norm_num_groups"],
            "norm_eps": eps, "transformer_norm_eps": eps}  # MONAI's spatial transformer GroupNorm takes norm_eps


def scheduler_config(s, base, path):
    """scheduler -> dict for SchedulerConfig.from_dict, over `base` (the CXR preset: spacing, offsets)."""
    if "beta_schedule" in s:  # MONAI GenerativeModels spelling
        s = {"schedule": s["beta_schedule"], **{k: v for k, v in s.items() if k != "beta_schedule"}}
    s = {**_SCHED_DEFAULTS, **s}
    if s["schedule"] not in _SCHEDULES:
        raise BundleError(f"{path}: scheduler.schedule={s['schedule']!r} is not supported "
                          f"(one of {sorted(_SCHEDULES)})")
    return {**base, "num_train_timesteps": s["num_train_timesteps"], "beta_start": float(s["beta_start"]),
            "beta_end": float(s["beta_end"]), "beta_schedule": _SCHEDULES[s["schedule"]],
            "prediction_type": s["prediction_type"], "clip_sample": bool(s["clip_sample"]),
            "set_alpha_to_one": bool(s["set_alpha_to_one"]), "steps_offset": int(s["steps_offset"])}


def read_bundle(path, scheduler_base):
    """inference.json -> {"vae": dict, "unet": dict, "scheduler": dict or None} for our configs' from_dict.

    scheduler_base: our scheduler preset (a dict: spacing, offsets) that the bundle's `scheduler` object is laid
    over; "scheduler" comes back None when the file has no `scheduler` object.
    """
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: cannot read ({e})") from None
    if not isinstance(config, dict):
        raise BundleError(f"{path}: not a JSON object")
    ae = {**_AE_DEFAULTS, **_section(config, "autoencoder_def", [*_AE_DEFAULTS, "spatial_dims"], path)}
    unet = {**_UNET_DEFAULTS, **_section(config, "diffusion_def", [*_UNET_DEFAULTS, "in_channels", "out_channels"],
                                         path)}
    missing = [k for k in ("in_channels", "out_channels", "cross_attention_dim") if unet.get(k) is None]
    if missing:
        raise BundleError(f"{path}: diffusion_def lacks {missing} (MONAI has no default for them)")
    out = {"vae": vae_config(ae, path), "unet": unet_config(unet, path), "scheduler": None}
    if "scheduler" in config:
        known = [*_SCHED_DEFAULTS, "beta_schedule", "clip_sample_min", "clip_sample_max"]
        out["scheduler"] = scheduler_config(_section(config, "scheduler", known, path), scheduler_base, path)
    return out
