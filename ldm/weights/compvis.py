"""Key-renaming rules for the diffusers family: checkpoint layouts -> our module names (= diffusers keys).

All renaming rules live in ldm/, built by loops with a comment per rule (the diffusers convert scripts are the
model; no hand-written tables of 1,000 keys). This file: CompVis / LDM single files (SD 1.x with HF CLIP text
keys, SD 2.x with OpenCLIP text keys), mirroring diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py
(tests/data/keys/*_ldm_map.txt); legacy diffusers VAE attention names; architecture configs derived from shapes
where a source has no config files. The MONAI rules (DiffusionModelUNet, AutoencoderKL) are in ldm/weights/monai.py.
Each function takes a flat state dict and returns a new one; nothing is copied (tensors are shared).
"""
import collections
import re

# ================================================================================================================
# CompVis / LDM single files (.ckpt / .safetensors: SD 1.x, SD 2.x) and legacy diffusers names
# ================================================================================================================
# One file holds everything under four prefixes (docs/formats.md "CompVis / LDM single file"):
#   model.diffusion_model.   UNet             first_stage_model.   VAE
#   cond_stage_model.transformer.   SD1 text (HF CLIPTextModel names)   cond_stage_model.model.   SD2 text (OpenCLIP)
# plus things we drop: EMA copies (model_ema.), the DDPM schedule buffers, the VAE's training loss, CLIP's
# projection / logit scale / vision tower.
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SD1_TEXT_PREFIX, SD2_TEXT_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."
_SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
}


def _apply_prefix_rules(state_dict, rules, what):
    """Rename by the LONGEST matching (old prefix, new prefix) rule; a key no rule matches is an error."""
    rules = sorted(rules, key=lambda r: -len(r[0]))
    out = {}
    for key, tensor in state_dict.items():
        rule = next((r for r in rules if key.startswith(r[0])), None)
        if rule is None:
            raise ValueError(f"{what}: key {key!r} matches no conversion rule (an unsupported architecture?)")
        out[rule[1] + key[len(rule[0]):]] = tensor
    return out


def _block_indices(state_dict, name):
    """Sorted distinct N of keys `name.N....`."""
    pat = re.compile(re.escape(name) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state_dict for m in [pat.match(k)] if m})


# ----------------------------------------------------------------------------------------------------------------
# UNet: input_blocks / middle_block / output_blocks -> down_blocks / mid_block / up_blocks

# inside a CompVis ResBlock: Sequential(GroupNorm, SiLU, conv) twice, emb Sequential(SiLU, Linear)
_LDM_RESNET_PARTS = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                     ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]


def compvis_unet_to_ours(state_dict):
    """CompVis UNetModel keys (prefix `model.diffusion_model.` already stripped) -> diffusers names."""
    ops = [k for k in _block_indices(state_dict, "input_blocks") if f"input_blocks.{k}.0.op.weight" in state_dict]
    inputs = _block_indices(state_dict, "input_blocks")
    # input_blocks.0 is conv_in; then each level has L (resnet, attention) blocks and a downsampler (not the last)
    L = ops[0] - 1 if ops else max(inputs)
    levels = len(ops) + 1
    rules = [("input_blocks.0.0.", "conv_in."), ("time_embed.0.", "time_embedding.linear_1."),
             ("time_embed.2.", "time_embedding.linear_2."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             # the middle block is a Sequential(resnet, transformer, resnet)
             ("middle_block.0.", "mid_block.resnets.0."), ("middle_block.1.", "mid_block.attentions.0."),
             ("middle_block.2.", "mid_block.resnets.1.")]
    for i in range(levels):
        for j in range(L):
            k = i * (L + 1) + j + 1
            rules += [(f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}."),
                      (f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}.")]
        if i < levels - 1:
            rules.append((f"input_blocks.{(i + 1) * (L + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
    # up blocks run deepest first in both namings; each level has L + 1 resnets (they also eat the skip from
    # the downsampler), and the level's last block ends with the upsampler: at `.2` after an attention, else `.1`
    for i in range(levels):
        for j in range(L + 1):
            k = i * (L + 1) + j
            rules += [(f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}."),
                      (f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}.")]
        if i < levels - 1:
            k = i * (L + 1) + L
            n = 2 if any(key.startswith(f"output_blocks.{k}.2.") for key in state_dict) else 1
            rules.append((f"output_blocks.{k}.{n}.conv.", f"up_blocks.{i}.upsamplers.0.conv."))
    out = _apply_prefix_rules(state_dict, rules, "CompVis UNet")
    # resnet internals (transformer internals already carry the diffusers names)
    renamed = {}
    for key, tensor in out.items():
        if ".resnets." in key:
            for old, new in _LDM_RESNET_PARTS:
                key = re.sub(r"(\.resnets\.\d+\.)" + re.escape(old), r"\g<1>" + new, key)
        renamed[key] = tensor
    return renamed


# ----------------------------------------------------------------------------------------------------------------
# VAE: encoder.down.i / decoder.up.i / mid.block_1, attn_1, block_2 -> diffusers blocks

def compvis_vae_to_ours(state_dict):
    """CompVis AutoencoderKL keys (prefix `first_stage_model.` already stripped) -> diffusers names."""
    levels = len(_block_indices(state_dict, "decoder.up"))
    rules = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    for side in ("encoder", "decoder"):
        rules += [(f"{side}.conv_in.", f"{side}.conv_in."), (f"{side}.conv_out.", f"{side}.conv_out."),
                  (f"{side}.norm_out.", f"{side}.conv_norm_out."),
                  (f"{side}.mid.block_1.", f"{side}.mid_block.resnets.0."),
                  (f"{side}.mid.attn_1.", f"{side}.mid_block.attentions.0."),
                  (f"{side}.mid.block_2.", f"{side}.mid_block.resnets.1.")]
    for i in range(levels):
        rules += [(f"encoder.down.{i}.block.", f"encoder.down_blocks.{i}.resnets."),
                  (f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv.")]
        # decoder up blocks are numbered in reverse: CompVis up.0 is the FULL resolution, diffusers up_blocks.0
        # the lowest (the order they run in)
        rules += [(f"decoder.up.{levels - 1 - i}.block.", f"decoder.up_blocks.{i}.resnets."),
                  (f"decoder.up.{levels - 1 - i}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv.")]
    out = {}
    for key, tensor in _apply_prefix_rules(state_dict, rules, "CompVis VAE").items():
        key = key.replace(".nin_shortcut.", ".conv_shortcut.")  # the 1x1 skip conv when channels change
        if ".attentions.0." in key:
            # the mid attention: GroupNorm `norm`, 1x1 CONVS q/k/v/proj_out -> Linear layers ([C, C, 1, 1] -> [C, C])
            for old, new in [(".norm.", ".group_norm."), (".q.", ".to_q."), (".k.", ".to_k."), (".v.", ".to_v."),
                             (".proj_out.", ".to_out.0.")]:
                key = key.replace(".attentions.0" + old, ".attentions.0" + new)
            if key.endswith(".weight") and tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]
        out[key] = tensor
    return out


def legacy_vae_to_ours(state_dict):
    """diffusers VAEs saved before 0.14 (RoentGen, old SD folders): mid attention query/key/value/proj_attn."""
    out = {}
    for key, tensor in state_dict.items():
        # same Linear layers, new names; some very old files also stored them as 1x1 convs
        key = re.sub(r"\.attentions\.(\d+)\.(query|key|value|proj_attn)\.",
                     lambda m: f".attentions.{m.group(1)}.{dict(query='to_q', key='to_k', value='to_v', proj_attn='to_out.0')[m.group(2)]}.",
                     key)
        out[key] = tensor[:, :, 0, 0] if ".attentions." in key and key.endswith(".weight") and tensor.ndim == 4 else tensor
    return out


# ----------------------------------------------------------------------------------------------------------------
# Text encoders

def sd1_text_to_ours(state_dict):
    """SD1 `cond_stage_model.transformer.` (stripped): already HF CLIPTextModel names, with or without the
    `text_model.` level (older transformers versions saved without it); `position_ids` is a buffer: dropped."""
    out = {}
    for key, tensor in state_dict.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        if not key.endswith("embeddings.position_ids"):
            out[key] = tensor
    return out


_OPENCLIP_LAYER_PARTS = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                         ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")]


def openclip_text_to_ours(state_dict, num_layers=None):
    """SD2 `cond_stage_model.model.` (stripped, OpenCLIP ViT-H/14 text tower) -> HF CLIPTextModel names.

    SD2 conditions on the PENULTIMATE layer (then ln_final), so the last resblock is dropped: 24 -> 23 layers,
    exactly what diffusers' SD2 text_encoder/ holds. The fused attention input projection in_proj [3D, D] is
    split into q | k | v rows.
    """
    blocks = _block_indices(state_dict, "transformer.resblocks")
    keep = len(blocks) - 1 if num_layers is None else num_layers
    out = {}
    for key, tensor in state_dict.items():
        if key == "positional_embedding":  # a bare Parameter [77, D] in OpenCLIP, an Embedding in HF
            out["text_model.embeddings.position_embedding.weight"] = tensor
        elif key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = tensor
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key[len("ln_final."):]] = tensor
        elif key in ("text_projection", "logit_scale", "attn_mask") or key.startswith("visual."):
            continue  # contrastive head / vision tower / causal-mask buffer: not part of SD's conditioning
        else:
            m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", key)
            if not m:
                raise ValueError(f"OpenCLIP text encoder: unexpected key {key!r}")
            i, rest = int(m.group(1)), m.group(2)
            if i >= keep:
                continue
            prefix = f"text_model.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):  # in_proj_weight / in_proj_bias: rows are q, k, v
                kind = rest[len("attn.in_proj_"):]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part
                continue
            for old, new in _OPENCLIP_LAYER_PARTS:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            else:
                raise ValueError(f"OpenCLIP text encoder: unexpected key {key!r}")
            out[prefix + rest] = tensor
    return out


# ----------------------------------------------------------------------------------------------------------------
# The whole single file

def split_compvis(state_dict, use_ema=False):
    """A CompVis state dict -> ({"unet", "vae", "text"}: renamed state dicts, family "sd1" | "sd2", dropped counts).

    use_ema=True takes the UNet weights from the EMA copy (`model_ema.<key without dots>`) when the file has one.
    """
    parts = {"unet": {}, "vae": {}, "sd1": {}, "sd2": {}}
    dropped = collections.Counter()
    for key, tensor in state_dict.items():
        for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("sd1", SD1_TEXT_PREFIX),
                             ("sd2", SD2_TEXT_PREFIX)):
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = tensor
                break
        else:
            if key.startswith("model_ema."):
                dropped["EMA copies (model_ema.)"] += 1
            elif key in _SCHEDULE_BUFFERS:
                dropped["schedule buffers"] += 1
            else:
                dropped[f"other ({key.split('.')[0]})"] += 1
    if use_ema:
        for key in parts["unet"]:
            ema = "model_ema." + ("diffusion_model." + key).replace(".", "")
            if ema in state_dict:
                parts["unet"][key] = state_dict[ema]
    # the VAE's training loss (LPIPS + discriminator) rides along in some files
    loss = [k for k in parts["vae"] if k.startswith("loss.")]
    for k in loss:
        del parts["vae"][k]
    if loss:
        dropped["VAE training loss (first_stage_model.loss.)"] += len(loss)
    if not parts["unet"] or not parts["vae"]:
        raise ValueError(f"not a CompVis LDM file: no `{UNET_PREFIX}` or no `{VAE_PREFIX}` keys")
    if bool(parts["sd1"]) == bool(parts["sd2"]):
        raise ValueError(f"CompVis file: expected exactly one text encoder (`{SD1_TEXT_PREFIX}` for SD1 or "
                         f"`{SD2_TEXT_PREFIX}` for SD2)")
    family = "sd1" if parts["sd1"] else "sd2"
    text = sd1_text_to_ours(parts["sd1"]) if family == "sd1" else openclip_text_to_ours(parts["sd2"])
    return {"unet": compvis_unet_to_ours(parts["unet"]), "vae": compvis_vae_to_ours(parts["vae"]),
            "text": text}, family, dict(dropped)


# ----------------------------------------------------------------------------------------------------------------
# Architecture configs from shapes (for sources without config files). Inputs are OUR (diffusers) key names.

def _levels(state_dict, name):
    return len(_block_indices(state_dict, name))


def unet_config_from_state_dict(sd, head_dim=None, heads=8):
    """-> dict for UNetConfig.from_dict. Head counts are not in the shapes: SD1 uses 8 heads per level
    (pass heads=8), SD2 and MONAI a fixed head width (pass head_dim=64, or the channel width for one head)."""
    levels = _levels(sd, "down_blocks")
    channels = [sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
    attn = [f"down_blocks.{i}.attentions.0.proj_in.weight" in sd for i in range(levels)]
    cross = next(v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
    proj = next(v for k, v in sd.items() if k.endswith(".proj_in.weight"))
    return {"in_channels": sd["conv_in.weight"].shape[1], "out_channels": sd["conv_out.weight"].shape[0],
            "block_out_channels": channels, "layers_per_block": _levels(sd, "down_blocks.0.resnets"),
            "attention_levels": attn, "cross_attention_dim": cross, "use_linear_projection": proj.ndim == 2,
            "num_attention_heads": [c // head_dim if head_dim else heads for c in channels]}


def vae_config_from_state_dict(sd):
    """-> dict for VAEConfig.from_dict, for the SD-style (diffusers / CompVis) AutoencoderKL."""
    levels = _levels(sd, "encoder.down_blocks")
    return {"in_channels": sd["encoder.conv_in.weight"].shape[1], "out_channels": sd["decoder.conv_out.weight"].shape[0],
            "latent_channels": sd["post_quant_conv.weight"].shape[0],
            "block_out_channels": [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)],
            "layers_per_block": _levels(sd, "encoder.down_blocks.0.resnets"),
            "decoder_layers_per_block": _levels(sd, "decoder.up_blocks.0.resnets"),
            "mid_block_attention": "encoder.mid_block.attentions.0.to_q.weight" in sd}


def text_config_from_state_dict(sd, hidden_act):
    """-> dict for TextEncoderConfig.from_dict. Heads are not in the shapes: CLIP's head width is 64.
    hidden_act: "quick_gelu" (OpenAI CLIP, SD1) or "gelu" (OpenCLIP, SD2)."""
    vocab, width = sd["text_model.embeddings.token_embedding.weight"].shape
    return {"vocab_size": vocab, "hidden_size": width,
            "intermediate_size": sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_hidden_layers": _levels(sd, "text_model.encoder.layers"), "num_attention_heads": width // 64,
            "max_position_embeddings": sd["text_model.embeddings.position_embedding.weight"].shape[0],
            "hidden_act": hidden_act}
