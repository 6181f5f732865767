"""Foreign config files (diffusers unet/vae config.json and scheduler_config.json, transformers text_encoder
config.json) -> our config dataclasses. (A MONAI bundle's inference.json: ldm/weights/monai_bundle.py.)"""
from dataclasses import fields

from ldm.unet import UNetConfig
from ldm.vae import VAEConfig
from ldm.text_encoder import TextEncoderConfig
from ldm.schedulers import SchedulerConfig


def unet_config_from_diffusers(d):
    """From diffusers' unet/config.json (a dict). Rejects features this UNet does not implement."""
    down, up = list(d.get("down_block_types", [])), list(d.get("up_block_types", []))
    levels = [{"CrossAttnDownBlock2D": True, "DownBlock2D": False}.get(t) for t in down]
    up_levels = [{"CrossAttnUpBlock2D": True, "UpBlock2D": False}.get(t) for t in up]
    if None in levels or None in up_levels or up_levels != levels[::-1]:
        raise ValueError(f"unet config: unsupported block types down={down} up={up} (need mirrored "
                         "CrossAttnDownBlock2D/DownBlock2D and CrossAttnUpBlock2D/UpBlock2D)")
    # Settings we do not implement must have their default value. (`upcast_attention` needs no check: our
    # attention always computes in float32.)
    defaults = {"mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": 1,
                "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
                "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
                "only_cross_attention": False, "dual_cross_attention": False, "conv_in_kernel": 3,
                "conv_out_kernel": 3, "center_input_sample": False, "act_fn": "silu", "downsample_padding": 1,
                "mid_block_scale_factor": 1, "encoder_hid_dim": None, "time_cond_proj_dim": None,
                "attention_type": "default", "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
                "time_embedding_dim": None, "timestep_post_act": None, "cross_attention_norm": None,
                "reverse_transformer_layers_per_block": None}
    for key, want in defaults.items():
        got = d.get(key, want)
        if got != want and not (isinstance(got, list) and all(g == want for g in got)):
            raise ValueError(f"unet config: {key}={got!r} is not supported (only {want!r})")
    lpb = d.get("layers_per_block", 2)
    if isinstance(lpb, list):
        if len(set(lpb)) != 1:
            raise ValueError(f"unet config: per-level layers_per_block {lpb} is not supported")
        lpb = lpb[0]
    # The diffusers quirk: `attention_head_dim` is really the head COUNT when num_attention_heads is absent.
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    cross = d.get("cross_attention_dim", 1280)
    if isinstance(cross, list):
        raise ValueError(f"unet config: per-level cross_attention_dim {cross} is not supported")
    return UNetConfig(in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
               sample_size=d.get("sample_size") or 64, block_out_channels=tuple(d.get("block_out_channels", UNetConfig.block_out_channels)),
               layers_per_block=lpb, attention_levels=tuple(levels), num_attention_heads=heads,
               cross_attention_dim=cross, use_linear_projection=d.get("use_linear_projection", False),
               norm_num_groups=d.get("norm_num_groups", 32), norm_eps=d.get("norm_eps", 1e-5),
               flip_sin_to_cos=d.get("flip_sin_to_cos", True), freq_shift=d.get("freq_shift", 0))


def vae_config_from_diffusers(d):
    """Build from a diffusers `vae/config.json` dict (AutoencoderKL); rejects layouts this module lacks."""
    unsupported = []
    if any(t != "DownEncoderBlock2D" for t in d.get("down_block_types", ["DownEncoderBlock2D"])):
        unsupported.append(f"down_block_types={d['down_block_types']}")
    if any(t != "UpDecoderBlock2D" for t in d.get("up_block_types", ["UpDecoderBlock2D"])):
        unsupported.append(f"up_block_types={d['up_block_types']}")
    if d.get("act_fn", "silu") != "silu":
        unsupported.append(f"act_fn={d['act_fn']!r}")
    for key in ("use_quant_conv", "use_post_quant_conv"):
        if d.get(key, True) is not True:
            unsupported.append(f"{key}={d[key]}")
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if d.get(key) is not None:
            unsupported.append(f"{key}={d[key]}")
    # scaling_factor is the pipeline's latent scale: ldm/weights/folder.py reads it
    ignored = {"sample_size", "force_upcast", "scaling_factor", "mid_block_add_attention", "down_block_types",
               "up_block_types", "act_fn", "use_quant_conv", "use_post_quant_conv", "shift_factor",
               "latents_mean", "latents_std"}
    mapped = {"in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
              "norm_num_groups"}
    unknown = sorted(k for k in d if not k.startswith("_") and k not in ignored | mapped)
    if unsupported or unknown:
        raise ValueError(f"diffusers VAE config not supported by ldm/vae.py: unsupported {unsupported}, "
                         f"unknown keys {unknown}. Only the SD-style AutoencoderKL is implemented.")
    layers = d.get("layers_per_block", 1)
    attention = d.get("mid_block_add_attention", True)
    # diffusers defaults (AutoencoderKL.__init__) for keys a minimal config.json may omit
    return VAEConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
               latent_channels=d.get("latent_channels", 4), block_out_channels=list(d.get("block_out_channels", [64])),
               layers_per_block=layers, decoder_layers_per_block=layers + 1,
               norm_num_groups=d.get("norm_num_groups", 32), norm_eps=1e-6, mid_block=True,
               mid_block_attention=attention, quant="joint", silu_before_conv_out=True)


def text_config_from_hf(d):
    """From a transformers text_encoder/config.json dict (CLIPTextConfig, or a CLIPConfig's text_config).

    Every field we use must be present: transformers' defaults are the tiny ViT-B/32 text tower, so a
    silent default here would build the wrong model.
    """
    if "text_config" in d and "hidden_size" not in d:
        d = d["text_config"]
    names = [f.name for f in fields(TextEncoderConfig)]
    missing = [n for n in names if n not in d and n not in ("max_position_embeddings", "layer_norm_eps")]
    if missing:
        raise ValueError(f"text encoder config.json lacks {missing}; is this a CLIPTextModel config?")
    return TextEncoderConfig(**{n: d[n] for n in names if n in d})


# diffusers scheduler keys we do not implement: accepted only at the value that means "off" (anything else would
# change the numbers, so it is an error rather than a silent difference).
_MUST_BE = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False}


def scheduler_config_from_diffusers(d):
    """From a diffusers scheduler_config.json of any scheduler class (a dict).

    Keys we do not use (`_class_name`, `_diffusers_version`, `skip_prk_steps`, ...) are ignored; keys that would
    change the numbers are accepted only at their "off" value; values we do not support are errors.
    """
    for key, off in _MUST_BE.items():
        if d.get(key, off) != off:
            raise ValueError(f"scheduler config: {key}={d[key]!r} is not supported (only {off!r})")
    names = {f.name for f in fields(SchedulerConfig)}
    return SchedulerConfig(**{k: v for k, v in d.items() if k in names})
