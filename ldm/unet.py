"""The conditional UNet of a latent diffusion model, with its cross-attention layers exposed.

Mirrors diffusers `models/unets/unet_2d_condition.py` (UNet2DConditionModel with CrossAttnDownBlock2D /
DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D / UpBlock2D, ResnetBlock2D, Downsample2D, Upsample2D,
Timesteps, TimestepEmbedding), with the same module names, so a diffusers checkpoint loads with
`load_state_dict(strict=True)`. MONAI's `DiffusionModelUNet` (the paper's CXR LDM, Pinaya et al. 2022) is the
same network; its keys are renamed in ldm/weights/monai.py and its layout differences are config values.

Every cross-attention layer knows its name, place (down/mid/up), cross_index and map resolution; `forward`
passes an attention store down explicitly and can stop right after a given cross-attention layer (the heatmap
extraction only needs the maps of layers 4..7, so the rest of the decoder need not run).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.configs import ConfigDict
from ldm.attention import Attention, Transformer2DModel


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------
def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0, max_period=10000):
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim), in float32 (DDPM / Transformer positional code)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """Linear - SiLU - Linear from the sinusoid (width C0) to the time embedding (width 4 C0)."""

    def __init__(self, dim_in, dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim_in, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, + projected time embedding, GroupNorm-SiLU-conv, + (1x1-projected) input."""

    def __init__(self, c_in, c_out, temb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B, C_out) broadcast over pixels
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (the VAE's decoder uses it too)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNetLevel(nn.Module):
    """One level of the down or up path: resnets, optional spatial transformers, optional resampler.

    Only holds modules (keys `resnets.j`, `attentions.j`, `downsamplers.0` / `upsamplers.0`); the UNet's forward
    runs them, so that the early stop after a given cross-attention layer is written in one place.
    """

    def __init__(self, resnets, attentions=None, downsample=None, upsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:  # levels without attention have no `attentions` key at all
            self.attentions = nn.ModuleList(attentions)
        if downsample is not None:
            self.downsamplers = nn.ModuleList([downsample])
        if upsample is not None:
            self.upsamplers = nn.ModuleList([upsample])


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class UNetConfig(ConfigDict):
    """Defaults are Stable Diffusion 1.x (859,520,964 parameters)."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64  # latent side it was trained at; conversion derives the image size from it
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_levels: tuple = (True, True, True, False)  # a spatial transformer after each resnet of the level
    num_attention_heads: tuple = (8, 8, 8, 8)  # head COUNT per level (diffusers' `attention_head_dim` in SD1/2)
    cross_attention_dim: int = 768  # text width D
    use_linear_projection: bool = False  # SD2: Linear proj_in/proj_out instead of 1x1 convs
    norm_num_groups: int = 32
    norm_eps: float = 1e-5  # resnets and conv_norm_out (MONAI: 1e-6)
    transformer_norm_eps: float = 1e-6  # GroupNorm in front of each spatial transformer (both families)
    flip_sin_to_cos: bool = True  # sinusoid order [cos, sin] (diffusers SD and MONAI alike)
    freq_shift: int = 0  # frequencies exp(-log(10000) * i / (half - freq_shift))

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        heads = self.num_attention_heads
        heads = (heads,) * len(self.block_out_channels) if isinstance(heads, int) else heads
        self.num_attention_heads = tuple(int(h) for h in heads)
        n = len(self.block_out_channels)
        if len(self.attention_levels) != n or len(self.num_attention_heads) != n:
            raise ValueError(
                f"UNetConfig: block_out_channels {self.block_out_channels}, attention_levels {self.attention_levels} "
                f"and num_attention_heads {self.num_attention_heads} must have one entry per level"
            )
        for c, h in zip(self.block_out_channels, self.num_attention_heads):
            if c % self.norm_num_groups or c % h:
                raise ValueError(
                    f"UNetConfig: channel width {c} must be divisible by norm_num_groups={self.norm_num_groups} "
                    f"and by its head count {h}"
                )

    @classmethod
    def sd15(cls):
        return cls()

    @classmethod
    def sd2(cls):
        # SD 2.x: head width 64 everywhere (diffusers writes the counts [5, 10, 20, 20] as `attention_head_dim`)
        return cls(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)

    @classmethod
    def monai_cxr(cls):
        # MONAI bundle cxr_image_synthesis_latent_diffusion_model: num_head_channels = channel width -> ONE head
        return cls(in_channels=3, out_channels=3, block_out_channels=(256, 512, 768),
                   attention_levels=(False, True, True), num_attention_heads=(1, 1, 1),
                   cross_attention_dim=1024, norm_eps=1e-6)

    @classmethod
    def phantom(cls):
        # The embedded tiny world: 3x32x32 latents, two levels (32x32, 16x16). Like MONAI's CXR UNet (attention at
        # its two deepest levels only), attention sits at the bottleneck level alone: 6 cross-attention layers, all
        # at 16x16 (2 down, 1 mid, 3 up). Self-attention at 32x32 would more than double the cost on 2 CPU cores.
        # The paper's "mid + first three decoder layers" are indices 2,3,4,5 here (4,5,6,7 in MONAI's UNet).
        return cls(in_channels=3, out_channels=3, sample_size=32, block_out_channels=(32, 64),
                   attention_levels=(False, True), num_attention_heads=(1, 1), cross_attention_dim=64,
                   norm_num_groups=16, norm_eps=1e-6)

    @classmethod
    def tiny(cls):
        return cls(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, attention_levels=(True, True),
                   num_attention_heads=(2, 2), cross_attention_dim=32, norm_num_groups=8)


# ----------------------------------------------------------------------------------------------------------------
# The UNet
# ----------------------------------------------------------------------------------------------------------------
class UNet2DConditionModel(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        temb = 4 * ch[0]
        G, eps = cfg.norm_num_groups, cfg.norm_eps

        def transformer(c, heads):
            return Transformer2DModel(c, heads, cfg.cross_attention_dim, G, cfg.transformer_norm_eps,
                                      cfg.use_linear_projection)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)

        # Down path: level i works at latent / 2**i and (except the last) halves the resolution at its end.
        self.down_blocks = nn.ModuleList()
        for i in range(n):
            c_prev = ch[max(i - 1, 0)]
            resnets = [ResnetBlock2D(c_prev if j == 0 else ch[i], ch[i], temb, G, eps)
                       for j in range(cfg.layers_per_block)]
            attns = [transformer(ch[i], cfg.num_attention_heads[i]) for _ in resnets] if cfg.attention_levels[i] else None
            self.down_blocks.append(UNetLevel(resnets, attns, downsample=Downsample2D(ch[i]) if i < n - 1 else None))

        # Middle: resnet, cross-attention, resnet. Diffusers and MONAI both give the mid block attention in every
        # text-conditional UNet, even where the deepest level has none (SD).
        self.mid_block = UNetLevel([ResnetBlock2D(ch[-1], ch[-1], temb, G, eps) for _ in range(2)],
                                   [transformer(ch[-1], cfg.num_attention_heads[-1])])

        # Up path: up block i mirrors down level n-1-i, with one extra resnet; each resnet takes the running
        # features concatenated with one skip tensor (pushed in the down path, popped last-in first-out).
        self.up_blocks = nn.ModuleList()
        skip_ch = [ch[0]] + [c for i, c in enumerate(ch) for _ in range(cfg.layers_per_block + (i < n - 1))]
        c_run = ch[-1]
        for i in range(n):
            level = n - 1 - i
            resnets = []
            for j in range(cfg.layers_per_block + 1):
                resnets.append(ResnetBlock2D(c_run + skip_ch.pop(), ch[level], temb, G, eps))
                c_run = ch[level]
            attns = ([transformer(ch[level], cfg.num_attention_heads[level]) for _ in resnets]
                     if cfg.attention_levels[level] else None)
            self.up_blocks.append(UNetLevel(resnets, attns, upsample=Upsample2D(ch[level]) if i < n - 1 else None))

        self.conv_norm_out = nn.GroupNorm(G, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self._name_attention_layers()

    def _name_attention_layers(self):
        """Tell each Attention its key prefix, place, cross_index and map downscale (see ARCHITECTURE.md)."""
        n = len(self.config.block_out_channels)
        cross = 0
        # Modules were registered in forward order (down, mid, up), and attn1 before attn2 in each block.
        for name, module in self.named_modules():
            if not isinstance(module, Attention):
                continue
            parts = name.split(".")  # e.g. ["up_blocks", "1", "attentions", "0", ...] or ["mid_block", ...]
            if parts[0] == "down_blocks":
                place, level = "down", int(parts[1])
            elif parts[0] == "mid_block":
                place, level = "mid", n - 1
            else:  # up block i mirrors down level n-1-i; its upsampler runs after its attentions
                place, level = "up", n - 1 - int(parts[1])
            module.name, module.place, module.downscale = name, place, 2**level
            if module.is_cross:
                module.cross_index, cross = cross, cross + 1

    def cross_attention_layers(self):
        """The cross-attention layers in cross_index order (down, mid, up)."""
        layers = [m for m in self.modules() if isinstance(m, Attention) and m.is_cross]
        return sorted(layers, key=lambda m: m.cross_index)

    def set_fused_attention(self, flag):
        """Default path of every layer that records nothing: fused SDPA (True) or the explicit math (False)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused = bool(flag)

    def _attend(self, transformer, x, context, store, stop_after):
        """(x after the transformer, stop): stop is True once cross-attention layer `stop_after` has run."""
        x = transformer(x, context, store)
        return x, stop_after is not None and transformer.transformer_blocks[-1].attn2.cross_index >= stop_after

    def forward(self, sample, timestep, encoder_hidden_states, store=None, stop_after=None):
        """sample (B, C, H, W) latents; timestep int, 0-d or (B,); encoder_hidden_states (B, K, D).

        Returns the model output (eps or v) of the same shape as sample, or None when stopped right after
        cross-attention layer `stop_after` (its maps and all earlier ones have then been recorded).
        """
        if stop_after is not None and not 0 <= stop_after < len(self.cross_attention_layers()):
            raise ValueError(f"UNet: stop_after={stop_after} is not a cross-attention layer index "
                             f"(0..{len(self.cross_attention_layers()) - 1})")
        return self._forward(sample, timestep, encoder_hidden_states, store, stop_after)

    def _forward(self, sample, timestep, context, store, stop_after):
        B, _, H, W = sample.shape
        n = len(self.config.block_out_channels)
        if H % 2 ** (n - 1) or W % 2 ** (n - 1):
            raise ValueError(f"UNet: latent size {H}x{W} must be divisible by {2 ** (n - 1)} ({n} levels)")
        if context.shape[-1] != self.config.cross_attention_dim:
            raise ValueError(f"UNet: text width {context.shape[-1]} != cross_attention_dim "
                             f"{self.config.cross_attention_dim}")
        dtype = self.conv_in.weight.dtype
        if not torch.is_autocast_enabled(sample.device.type) and (sample.dtype != dtype or context.dtype != dtype):
            raise ValueError(f"UNet: inputs are {sample.dtype} / {context.dtype} but the model is {dtype}; cast the "
                             f"latents and the text context to {dtype}, or run under torch.autocast")
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(1).expand(B) if t.ndim == 0 else t
        emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                 self.config.freq_shift)
        emb = self.time_embedding(emb.to(sample.dtype))  # (B, 4 C0)

        # Shapes with C = block_out_channels, level i at (h_i, w_i) = (H, W) / 2**i, n levels.
        x = self.conv_in(sample)                                   # (B, C[0], H, W)
        skips = [x]         # the skip stack: every resnet's and downsampler's output, popped last-in first-out below
        for block in self.down_blocks:                             # level i
            for j, resnet in enumerate(block.resnets):
                x = resnet(x, emb)                                 # (B, C[i], h_i, w_i)
                if hasattr(block, "attentions"):
                    x, stop = self._attend(block.attentions[j], x, context, store, stop_after)
                    if stop:
                        return None                                # nothing after this layer is needed
                skips.append(x)
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)                       # (B, C[i], h_i / 2, w_i / 2)
                skips.append(x)
        # len(skips) = 1 + n * layers_per_block + (n - 1): one per up-path resnet (each level has one resnet more)

        x = self.mid_block.resnets[0](x, emb)                     # (B, C[-1], h_{n-1}, w_{n-1}) through the middle
        x, stop = self._attend(self.mid_block.attentions[0], x, context, store, stop_after)
        if stop:
            return None
        x = self.mid_block.resnets[1](x, emb)

        for block in self.up_blocks:                               # up block i works at level n-1-i
            for j, resnet in enumerate(block.resnets):
                # (B, C_running + C_skip, h, w): the skip of the same resolution, on channels -> (B, C[level], h, w)
                x = resnet(torch.cat([x, skips.pop()], dim=1), emb)
                if hasattr(block, "attentions"):
                    x, stop = self._attend(block.attentions[j], x, context, store, stop_after)
                    if stop:
                        return None
            if hasattr(block, "upsamplers"):
                x = block.upsamplers[0](x)                         # (B, C[level], 2h, 2w)

        return self.conv_out(F.silu(self.conv_norm_out(x)))        # (B, out_channels, H, W): eps or v
