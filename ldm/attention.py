"""Attention and the spatial transformer of the LDM UNet: the one place where the UNet's attention (self and cross)
is computed, and where cross-attention probabilities are recorded. (The text encoder's causal self-attention is in
ldm/text_encoder.py, the VAE's single-head one in ldm/vae.py: nothing is recorded there.)

Mirrors diffusers `models/attention_processor.py` (Attention + AttnProcessor / AttnProcessor2_0),
`models/attention.py` (BasicTransformerBlock, FeedForward), `models/activations.py` (GEGLU) and
`models/transformers/transformer_2d.py` (Transformer2DModel); MONAI's `SpatialTransformer` /
`DiffusionUNetTransformerBlock` compute the same thing (their key names are mapped in ldm/weights/monai.py).

Recording (ARCHITECTURE.md "Attention recording"): a cross-attention layer that a store `wants` computes
probs = softmax(q k^T * scale) explicitly, in float32, shape (B, heads, N, K), and hands it to
`store.record(layer, probs)` right after the softmax -- with its autograd graph, since prompt tuning puts a loss
on it. Every other layer uses PyTorch's fused `scaled_dot_product_attention`, unless `fused` is switched off.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention with diffusers key names: to_q, to_k, to_v, to_out.0."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, is_cross=False, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        # q/k/v have no bias (diffusers `bias=False`, MONAI `qkv_bias=False`); the output projection has one
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head**-0.5
        # Set by the UNet after construction (see UNet2DConditionModel._name_attention_layers).
        self.name = ""  # key prefix, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
        self.place = None  # "down" | "mid" | "up"
        self.is_cross = is_cross
        self.cross_index = None  # 0..n-1 in down-mid-up order among cross-attention layers
        self.downscale = None  # map side = latent side // downscale
        self.fused = True  # when nothing is recorded: SDPA (True) or the explicit math (False; the tests compare both)

    def extra_repr(self):
        return f"name={self.name!r}, heads={self.heads}, dim_head={self.dim_head}, cross_index={self.cross_index}"

    def forward(self, x, context=None, store=None):
        """x (B, N, C); context (B, K, D) (K = 77 keys), or None for self-attention. Returns (B, N, C)."""
        context = x if context is None else context
        # (B, N, heads * dim_head) -> (B, heads, N, dim_head): a view, no copy
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.to_k(context), "b l (h d) -> b h l d", h=self.heads)
        v = rearrange(self.to_v(context), "b l (h d) -> b h l d", h=self.heads)

        record = store is not None and self.is_cross and store.wants(self)
        if record or not self.fused:
            # Explicit attention in float32 (diffusers' `upcast_attention` / `upcast_softmax` behaviour); autocast
            # is switched off here, or it would run the float32 matmul in bf16/fp16 again.
            with torch.autocast(q.device.type, enabled=False):
                # Eq. 1 (paper Sec. 3.2): A = softmax(Q K^T / sqrt(d)), d = dim_head; rows sum to 1 over the K keys
                scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.scale  # (B, heads, N, K)
                probs = scores.softmax(dim=-1)
            # ---------------- THE recording point: post-softmax probabilities (B, heads, N, K) ----------------
            if record:
                store.record(self, probs)
            # --------------------------------------------------------------------------------------------------
            out = torch.matmul(probs.to(v.dtype), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """Linear to 2 x hidden, then hidden * gelu(gate) (Shazeer 2020); diffusers `ff.net.0` (its weight: `proj`)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        hidden, gate = self.proj(x).chunk(2, dim=-1)  # first half is the value, second half the gate
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x hidden width: net.0 = GEGLU [8C, C], net.1 = Dropout, net.2 = Linear [C, 4C]."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention (attn1), cross-attention on the text (attn2), GEGLU feed-forward."""

    def __init__(self, dim, heads, dim_head, context_dim, norm_eps=1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, None, heads, dim_head, is_cross=False)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, is_cross=True)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim)

    def forward(self, x, context, store=None):
        x = x + self.attn1(self.norm1(x), store=store)
        x = x + self.attn2(self.norm2(x), context, store=store)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in, one BasicTransformerBlock over the H*W pixels, proj_out, plus the input (residual).

    proj_in / proj_out are 1x1 convolutions (SD1, MONAI) or Linear layers (SD2, `use_linear_projection`); the
    GroupNorm eps is 1e-6 in both diffusers (hard-coded) and MONAI (its `norm_eps` default).
    """

    def __init__(self, channels, heads, context_dim, norm_num_groups=32, norm_eps=1e-6, use_linear_projection=False):
        super().__init__()
        if channels % heads:
            raise ValueError(f"Transformer2DModel: {channels} channels do not split into {heads} heads")
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps, affine=True)
        if use_linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, channels // heads, context_dim)]
        )

    def forward(self, x, context, store=None):
        B, C, H, W = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = self.proj_in(rearrange(x, "b c h w -> b (h w) c"))
        else:
            x = rearrange(self.proj_in(x), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            x = block(x, context, store)  # (B, N, C), N = H*W
        if self.use_linear_projection:
            x = rearrange(self.proj_out(x), "b (h w) c -> b c h w", h=H, w=W).contiguous()
        else:
            x = self.proj_out(rearrange(x, "b (h w) c -> b c h w", h=H, w=W).contiguous())
        return x + residual
