"""The latent-diffusion autoencoder (AutoencoderKL) for both model families.

Mirrors diffusers `models/autoencoders/autoencoder_kl.py` + `vae.py` (Encoder, Decoder, DownEncoderBlock2D,
UpDecoderBlock2D, UNetMidBlock2D) and MONAI `networks/nets/autoencoderkl.py` (the CXR LDM of Pinaya et al.
2022 that the paper uses as its frozen backbone). Both are the same network with small layout differences,
which are config flags here (Z = latent channels, `latent_channels`):

|                          | SD 1.x / 2.x / RoentGen (diffusers)  | MONAI CXR                              |
|--------------------------|--------------------------------------|----------------------------------------|
| mid block (res-attn-res) | yes, one-head attention              | none ("no attention anywhere")         |
| decoder resnets / level  | layers_per_block + 1                 | layers_per_block                       |
| posterior head           | conv_out -> 2Z, quant_conv 2Z -> 2Z  | conv_out -> Z, 1x1 quant_conv_mu and   |
|                          | then split into mean, logvar         | quant_conv_log_sigma (Z -> Z each)     |
| before each conv_out     | GroupNorm, SiLU                      | GroupNorm only (no activation)         |

Parameter names are the diffusers keys, so a diffusers `vae/` folder loads with `load_state_dict(strict=True)`;
MONAI checkpoints are renamed onto these names in ldm/weights/monai.py.
Latents are UNSCALED here: multiply by the pipeline's `scale_factor` before the UNet, divide before `decode`.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.configs import ConfigDict
from ldm.unet import Upsample2D   # nearest x2 + 3x3 conv: the same upsampler as the UNet's


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (the VAE's own: its resnet has no time embedding)

def group_norm(channels, config):
    return nn.GroupNorm(config.norm_num_groups, channels, eps=config.norm_eps, affine=True)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice plus a (1x1 conv) shortcut; diffusers ResnetBlock2D with temb=None, MONAI AEKLResBlock."""

    def __init__(self, in_channels, out_channels, config):
        super().__init__()
        self.norm1 = group_norm(in_channels, config)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, config)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # the shortcut only exists where the channel count changes (no key otherwise)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric zero pad (right and bottom only), as the original LDM VAE does."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention with biases and a residual (diffusers Attention in the VAE mid block).

    diffusers stores q/k/v/out as Linear [C, C] over channels; the CompVis checkpoints hold them as 1x1 convs.
    """

    def __init__(self, channels, config):
        super().__init__()
        self.group_norm = group_norm(channels, config)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key `to_out.0` (diffusers had a Dropout at 1)

    def forward(self, x):
        _, _, H, W = x.shape
        h = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        # one head of width C: scale 1/sqrt(C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        h = rearrange(self.to_out[0](h), "b (h w) c -> b c h w", h=H, w=W)
        return x + h


class MidBlock(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution (diffusers UNetMidBlock2D)."""

    def __init__(self, channels, config):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, config) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, config)] if config.mid_block_attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownEncoderBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, add_downsample, config):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if j == 0 else out_channels, out_channels, config)
                                      for j in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if add_downsample else [])

    def forward(self, x):
        for module in [*self.resnets, *self.downsamplers]:
            x = module(x)
        return x


class UpDecoderBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, add_upsample, config):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if j == 0 else out_channels, out_channels, config)
                                      for j in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if add_upsample else [])

    def forward(self, x):
        for module in [*self.resnets, *self.upsamplers]:
            x = module(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Config

@dataclass
class VAEConfig(ConfigDict):
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: list = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2            # encoder resnets per level
    decoder_layers_per_block: int = 3    # SD: layers_per_block + 1; MONAI: layers_per_block
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    mid_block: bool = True               # resnet (-> attention) -> resnet at the lowest resolution
    mid_block_attention: bool = True
    quant: str = "joint"                 # "joint" (diffusers quant_conv) | "split" (MONAI quant_conv_mu / _log_sigma)
    silu_before_conv_out: bool = True    # MONAI's Encoder/Decoder go GroupNorm -> conv_out with no SiLU between

    def __post_init__(self):
        self.block_out_channels = [int(c) for c in self.block_out_channels]
        if self.quant not in ("joint", "split"):
            raise ValueError(f"VAEConfig.quant must be 'joint' or 'split', got {self.quant!r}")
        if self.mid_block_attention and not self.mid_block:
            raise ValueError("VAEConfig.mid_block_attention=True needs mid_block=True")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if not self.block_out_channels or bad:
            raise ValueError(f"VAEConfig.block_out_channels {self.block_out_channels} must be non-empty and "
                             f"divisible by norm_num_groups={self.norm_num_groups}")

    # ---- named sizes
    @classmethod
    def sd(cls):
        """Stable Diffusion 1.x/2.x and RoentGen: 83,653,863 parameters, RGB in [-1, 1], f = 8."""
        return cls()

    @classmethod
    def monai_cxr(cls):
        """MONAI CXR LDM autoencoder: 4,607,848 parameters, grey in [0, 1], f = 8, no attention, no mid block."""
        return cls(in_channels=1, out_channels=1, latent_channels=3, block_out_channels=[64, 128, 128, 128],
                   layers_per_block=2, decoder_layers_per_block=2, mid_block=False, mid_block_attention=False,
                   quant="split", silu_before_conv_out=False)

    @classmethod
    def tiny(cls):
        """Tests: MONAI layout, ONE downsampling (64x64 image -> 3x32x32 latent); the phantom uses it at half width."""
        return cls(in_channels=1, out_channels=1, latent_channels=3, block_out_channels=[32, 64],
                   layers_per_block=1, decoder_layers_per_block=1, norm_num_groups=8, mid_block=False,
                   mid_block_attention=False, quant="split", silu_before_conv_out=False)


# ----------------------------------------------------------------------------------------------------------------
# Encoder, decoder, autoencoder

class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        # level i: resnets from channels[i-1] to channels[i], then halve the resolution (all but the last level)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block,
                             add_downsample=i < len(channels) - 1, config=config)
            for i in range(len(channels))])
        self.mid_block = MidBlock(channels[-1], config) if config.mid_block else None
        self.conv_norm_out = group_norm(channels[-1], config)
        self.conv_act = nn.SiLU() if config.silu_before_conv_out else nn.Identity()  # MONAI: no activation here
        # "joint": mean | logvar stacked on channels; "split": Z channels, the two heads come after
        out = 2 * config.latent_channels if config.quant == "joint" else config.latent_channels
        self.conv_out = nn.Conv2d(channels[-1], out, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)                                        # (B, C_in, H, W) -> (B, ch[0], H, W)
        for block in self.down_blocks:
            x = block(x)                                           # (B, ch[i], H / 2**(i+1), ..); last: H / f
        if self.mid_block is not None:
            x = self.mid_block(x)                                  # (B, ch[-1], H / f, W / f), f = 2**(levels - 1)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))   # (B, 2Z "joint" | Z "split", H / f, W / f)


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        channels = list(reversed(config.block_out_channels))  # up_blocks.0 is the DEEPEST level (diffusers order)
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], config) if config.mid_block else None
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(channels[max(i - 1, 0)], channels[i], config.decoder_layers_per_block,
                           add_upsample=i < len(channels) - 1, config=config)
            for i in range(len(channels))])
        self.conv_norm_out = group_norm(channels[-1], config)
        self.conv_act = nn.SiLU() if config.silu_before_conv_out else nn.Identity()  # MONAI: no activation here
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)                                        # (B, Z, h, w) -> (B, ch[-1], h, w)
        if self.mid_block is not None:
            x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)                                           # doubles h, w (not the last) -> (B, ch[0], h f, w f)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))  # (B, C_out, h f, w f); no output activation


class AutoencoderKL(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or VAEConfig()
        Z = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.quant == "joint":
            self.quant_conv = nn.Conv2d(2 * Z, 2 * Z, 1)
        else:
            self.quant_conv_mu = nn.Conv2d(Z, Z, 1)
            # MONAI's name says sigma but the head predicts the log VARIANCE (sigma = exp(out / 2))
            self.quant_conv_log_sigma = nn.Conv2d(Z, Z, 1)
        self.post_quant_conv = nn.Conv2d(Z, Z, 1)

    @property
    def downscale_factor(self):
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _check(self, t, channels, what):
        if t.ndim != 4 or t.shape[1] != channels:
            raise ValueError(f"AutoencoderKL.{what} expects (B, {channels}, H, W), got shape {tuple(t.shape)}")

    def encode_dist(self, x):
        """x (B, C_in, H, W) in the family's range -> (mean, logvar), each (B, Z, H/f, W/f), unscaled."""
        self._check(x, self.config.in_channels, "encode")
        f = self.downscale_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"AutoencoderKL.encode: image size {tuple(x.shape[-2:])} must be divisible by {f}")
        h = self.encoder(x)
        if self.config.quant == "joint":
            mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        else:
            mean, logvar = self.quant_conv_mu(h), self.quant_conv_log_sigma(h)
        # both libraries clamp the log variance to keep exp() finite
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x):
        """Posterior mean, UNSCALED (the paper encodes with the mean, no sampling)."""
        return self.encode_dist(x)[0]

    def decode(self, z):
        """UNSCALED latents (B, Z, h, w) -> image (B, C_out, h*f, w*f), no output activation."""
        self._check(z, self.config.latent_channels, "decode")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=False, generator=None):
        """-> (reconstruction, mean, logvar); samples z ~ N(mean, exp(logvar)) when sample_posterior (training)."""
        mean, logvar = self.encode_dist(x)
        z = mean
        if sample_posterior:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.decode(z), mean, logvar
