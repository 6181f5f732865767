"""Key-renaming rules for the MONAI family: DiffusionModelUNet and AutoencoderKL -> our (diffusers) module names.

Covers both namings: MONAI GenerativeModels and MONAI core >= 1.4 (the paper's CXR LDM, docs/formats.md
"MONAI CXR LDM", tests/data/keys/gen_*.txt, monai14_*.txt). Built by loops with a comment per rule, like the
diffusers convert scripts. All renaming rules live in ldm/: the diffusers-family rules (CompVis / LDM single
files, legacy diffusers VAE names, text encoders, configs from shapes) are in ldm/weights/compvis.py.
Each function takes a flat state dict and returns a new one; nothing is copied (tensors are shared).
"""
import re

# ----------------------------------------------------------------------------------------------------------------
# MONAI DiffusionModelUNet -> diffusers UNet2DConditionModel names
# ----------------------------------------------------------------------------------------------------------------

# (pattern, replacement) applied in order to every key; both MONAI namings are covered.
_MONAI_UNET_RULES = [
    # MONAI wraps every conv in a `Convolution` module: `x.conv.weight` -> `x.weight`
    (r"^conv_in\.conv\.", "conv_in."),
    # time embedding MLP: Sequential(Linear, SiLU, Linear)
    (r"^time_embed\.0\.", "time_embedding.linear_1."),
    (r"^time_embed\.2\.", "time_embedding.linear_2."),
    # resnet convs and the 1x1 skip convolution
    (r"\.conv([12])\.conv\.", r".conv\1."),
    (r"\.skip_connection\.conv\.", ".conv_shortcut."),
    # one downsampler / upsampler per level (MONAI: a single module, diffusers: a list of one)
    (r"\.downsampler\.op\.conv\.", ".downsamplers.0.conv."),
    (r"\.upsampler\.(?:conv|postconv)\.conv\.", ".upsamplers.0.conv."),  # `conv` <= 1.3, `postconv` >= 1.4
    # the middle block is three named modules in MONAI, two lists in diffusers
    (r"^middle_block\.resnet_1\.", "mid_block.resnets.0."),
    (r"^middle_block\.resnet_2\.", "mid_block.resnets.1."),
    (r"^middle_block\.attention\.", "mid_block.attentions.0."),
    # spatial transformer: 1x1 conv projections in and out
    (r"\.proj_(in|out)\.conv\.", r".proj_\1."),
    # attention output projection: `out_proj` (MONAI >= 1.4) or `to_out.0` (GenerativeModels, same as diffusers)
    (r"\.(attn[12])\.out_proj\.", r".\1.to_out.0."),
    # GEGLU feed-forward: `linear1` / `linear2` (MONAI >= 1.4 MLPBlock) or `net.0.proj` / `net.2` (same as diffusers)
    (r"\.ff\.linear1\.", ".ff.net.0.proj."),
    (r"\.ff\.linear2\.", ".ff.net.2."),
    # output head: Sequential(GroupNorm, SiLU, Convolution)
    (r"^out\.0\.", "conv_norm_out."),
    (r"^out\.2\.conv\.", "conv_out."),
]


def monai_unet_to_ours(state_dict):
    """Rename a MONAI DiffusionModelUNet state dict (either naming) to diffusers UNet2DConditionModel names."""
    out = {}
    for key, tensor in state_dict.items():
        new = key
        for pattern, repl in _MONAI_UNET_RULES:
            new = re.sub(pattern, repl, new)
        out[new] = tensor
    return out


# ----------------------------------------------------------------------------------------------------------------
# MONAI AutoencoderKL -> diffusers AutoencoderKL names
# ----------------------------------------------------------------------------------------------------------------
# MONAI stores encoder and decoder as ONE flat list `blocks.N`, diffusers as nested levels. The flat list is read in
# order and each block is classified by the keys it holds:
#   conv only          first block: conv_in / last block: conv_out
#   norm1, conv1 ...   a resnet                      conv.conv / postconv.conv   a down- or upsampler
#   norm + to_q ...    a (mid-block) attention       weight, bias only           the output GroupNorm
# Encoder: conv_in, per level [resnets, downsampler (not after the last level)], [mid: resnet, attn, resnet], norm, conv.
# Decoder: conv_in, [mid: resnet, attn, resnet], per level (deepest first) [resnets, upsampler (not after the last)],
#          norm, conv. Without non-local attention there is no mid block at all (the CXR VAE).

_RESNET_RULES = [
    (r"^conv([12])\.conv\.", r"conv\1."),  # wrapped convolutions
    (r"^nin_shortcut\.conv\.", "conv_shortcut."),  # 1x1 skip when channels change
]
_ATTN_RULES = [
    (r"^norm\.", "group_norm."),  # the block's GroupNorm
    (r"^attn\.to_([qkv])\.", r"to_\1."),  # MONAI >= 1.4 nests q/k/v under `attn`
    (r"^attn\.out_proj\.", "to_out.0."),
    (r"^to_([qkv])\.", r"to_\1."),  # GenerativeModels: q/k/v directly on the block
    (r"^proj_attn\.", "to_out.0."),
]


def _group_blocks(state_dict, prefix):
    """{block index: {key suffix: tensor}} for keys `prefix.blocks.N.suffix`."""
    blocks = {}
    pat = re.compile(re.escape(prefix) + r"\.blocks\.(\d+)\.(.+)$")
    for key, tensor in state_dict.items():
        m = pat.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
    return [blocks[i] for i in sorted(blocks)]


def _kind(block):
    keys = set(block)
    if any(k.startswith("norm1.") for k in keys):
        return "resnet"
    if any(k.startswith(("attn.", "to_q.")) for k in keys):
        return "attn"
    if any(k.startswith(("conv.conv.", "postconv.conv.")) for k in keys):
        return "sampler"
    if keys <= {"weight", "bias"}:
        return "norm"
    if keys <= {"conv.weight", "conv.bias"}:
        return "conv"
    raise ValueError(f"MONAI AutoencoderKL: cannot classify a block with keys {sorted(keys)}")


def _rename(block, rules, new_prefix, out):
    for suffix, tensor in block.items():
        new = suffix
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        out[f"{new_prefix}.{new}"] = tensor


def _convert_coder(blocks, side, out):
    """Name the blocks of the encoder (side="encoder") or the decoder (side="decoder")."""
    kinds = [_kind(b) for b in blocks]
    if "attn" in kinds and kinds.count("attn") > 1:
        raise ValueError(f"MONAI AutoencoderKL {side}: attention inside levels is not supported (only the mid block)")
    # The mid block is the resnet-attn-resnet triple around the single attention block, if any.
    mid = set()
    if "attn" in kinds:
        a = kinds.index("attn")
        mid = {a - 1, a, a + 1}
    level, j, levels = 0, 0, "down_blocks" if side == "encoder" else "up_blocks"
    for i, (block, kind) in enumerate(zip(blocks, kinds)):
        if i == 0:  # the first block is always the input convolution
            _rename(block, [(r"^conv\.", "")], f"{side}.conv_in", out)
        elif i == len(blocks) - 1:  # ... and the last one the output convolution
            _rename(block, [(r"^conv\.", "")], f"{side}.conv_out", out)
        elif kind == "norm":
            _rename(block, [], f"{side}.conv_norm_out", out)
        elif i in mid:
            name = {"resnet": f"resnets.{0 if i < kinds.index('attn') else 1}", "attn": "attentions.0"}[kind]
            _rename(block, _RESNET_RULES if kind == "resnet" else _ATTN_RULES, f"{side}.mid_block.{name}", out)
        elif kind == "resnet":
            _rename(block, _RESNET_RULES, f"{side}.{levels}.{level}.resnets.{j}", out)
            j += 1
        elif kind == "sampler":
            sampler = "downsamplers" if side == "encoder" else "upsamplers"
            _rename(block, [(r"^(?:post)?conv\.conv\.", "")], f"{side}.{levels}.{level}.{sampler}.0.conv", out)
            level, j = level + 1, 0
        else:
            raise ValueError(f"MONAI AutoencoderKL {side}: unexpected {kind} block at position {i}")


def monai_vae_to_ours(state_dict):
    """Rename a MONAI AutoencoderKL state dict (either naming) to diffusers AutoencoderKL names (split quant convs)."""
    out = {}
    for side in ("encoder", "decoder"):
        _convert_coder(_group_blocks(state_dict, side), side, out)
    # the 1x1 quantisation convolutions keep their names, minus MONAI's Convolution wrapper
    for key, tensor in state_dict.items():
        m = re.match(r"^(quant_conv_mu|quant_conv_log_sigma|post_quant_conv)\.conv\.(weight|bias)$", key)
        if m:
            out[f"{m.group(1)}.{m.group(2)}"] = tensor
        elif not key.startswith(("encoder.blocks.", "decoder.blocks.")):
            raise ValueError(f"MONAI AutoencoderKL: unexpected key {key!r}")
    return out
