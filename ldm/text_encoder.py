"""CLIP text encoder: the frozen text tower that turns token ids into the (B, 77, D) cross-attention context.

Mirrors transformers' `models/clip/modeling_clip.py` (CLIPTextModel: CLIPTextEmbeddings, CLIPAttention,
CLIPMLP, CLIPEncoderLayer, final_layer_norm), i.e. the GPT-2-like text half of CLIP (Radford et al. 2021):
a pre-LayerNorm causal transformer over 77 positions. Stable Diffusion conditions on the LAST hidden state
after `final_layer_norm`, all 77 positions, no pooling and no projection, so that is all we build.

Two extra entry points serve prompt tuning (the paper's learnable anatomy rows, CoOp / textual inversion):
`embed(ids)` returns token + position embeddings, `embed(token_embeds=...)` adds positions to token vectors
you supply (tuned rows swapped in), and `forward(embeds=...)` runs the frozen transformer from there.

Module names equal the checkpoint keys on disk (`text_model.embeddings.token_embedding.weight`, ...), so a
transformers 4.x state dict loads with `load_state_dict(sd, strict=True)` once the unused
`text_model.embeddings.position_ids` buffer (older files only) is dropped. (transformers >= 5 removes the
`text_model.` prefix in memory and adds it back on disk; we keep the on-disk names.)
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.configs import ConfigDict


def quick_gelu(x):
    # OpenAI CLIP's sigmoid approximation of GELU; SD1 text encoders were trained with it.
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # "gelu" is the exact erf form (OpenCLIP)


# ----------------------------------------------------------------------------------------------------------
# Transformer blocks


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v/out projections (all with bias)."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.heads = config.num_attention_heads
        self.head_dim = D // self.heads
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)
        self.fused = True  # F.scaled_dot_product_attention; False = the explicit math below (same numbers)

    def forward(self, x):
        B, L, D = x.shape
        # (B, L, D) -> (B, heads, L, head_dim)
        q, k, v = (p(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5            # (B, heads, L, L)
            future = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
            probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)    # token i sees tokens <= i
            out = probs @ v
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config):
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(D, eps=eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(D, eps=eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class CLIPTextTransformer(nn.Module):
    """The `text_model.` level of the checkpoint: embeddings, encoder, final_layer_norm."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TextEncoderConfig(ConfigDict):
    vocab_size: int = 49408             # 2 x 256 byte symbols (plain, +</w>) + 48,894 merges + 2 specials
    hidden_size: int = 768              # D, the width of the context the UNet cross-attends to
    intermediate_size: int = 3072       # MLP width, 4 D
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77   # L: CLIP's fixed context length
    hidden_act: str = "quick_gelu"      # "quick_gelu" (OpenAI CLIP, SD1) | "gelu" (OpenCLIP, SD2)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"text encoder hidden_act={self.hidden_act!r} is not supported; "
                             f"use one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"text encoder hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def clip_vit_l14(cls):
        """OpenAI CLIP ViT-L/14 text tower: Stable Diffusion 1.x and RoentGen (123,060,480 parameters)."""
        return cls()

    @classmethod
    def sd21(cls):
        """OpenCLIP ViT-H/14 text tower as shipped in SD 2.x diffusers folders (and used by the MONAI CXR
        LDM): 24 OpenCLIP blocks with the last one dropped -> 23 layers (340,387,840 parameters)."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu")

    @classmethod
    def tiny(cls):
        """About 136k parameters, for tests and (with its own vocabulary size) the phantom world."""
        return cls(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4)


# ----------------------------------------------------------------------------------------------------------
# The text encoder


class TextEncoder(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config or TextEncoderConfig()
        self.text_model = CLIPTextTransformer(self.config)

    @property
    def token_embedding(self):
        """The (vocab_size, D) input embedding table (prompt tuning copies and replaces rows of it)."""
        return self.text_model.embeddings.token_embedding

    def embed(self, ids=None, token_embeds=None):
        """Input embeddings (B, L, D) = token embeddings + position embeddings.

        ids: LongTensor (B, L) -> token rows are looked up; or token_embeds: (B, L, D) given directly
        (e.g. the lookup with some rows replaced by learnable vectors; gradients flow into them).
        """
        if (ids is None) == (token_embeds is None):
            raise ValueError("TextEncoder.embed: pass exactly one of ids or token_embeds")
        emb = self.text_model.embeddings
        if ids is not None:
            self._check_ids(ids)
            token_embeds = emb.token_embedding(ids)
        elif token_embeds.dim() != 3 or token_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"TextEncoder.embed: token_embeds must be (B, L, {self.config.hidden_size}), "
                             f"got {tuple(token_embeds.shape)}")
        L = token_embeds.shape[1]
        if L > self.config.max_position_embeddings:
            raise ValueError(f"TextEncoder: {L} tokens exceed max_position_embeddings="
                             f"{self.config.max_position_embeddings}; truncate in the tokenizer")
        return token_embeds + emb.position_embedding.weight[:L]   # (L, D) broadcasts over B

    def forward(self, ids=None, embeds=None):
        """Context for the UNet: the last hidden state after final_layer_norm, (B, L, D), every position.

        Pass ids (B, L), or embeds (B, L, D) = the output of `embed` (already including positions).
        """
        if (ids is None) == (embeds is None):
            raise ValueError("TextEncoder.forward: pass exactly one of ids or embeds")
        x = self.embed(ids=ids) if ids is not None else embeds
        x = self.text_model.encoder(x)
        return self.text_model.final_layer_norm(x)

    def set_fused_attention(self, flag):
        """Switch every layer between fused SDPA (default) and the explicit math path."""
        for layer in self.text_model.encoder.layers:
            layer.self_attn.fused = bool(flag)

    def _check_ids(self, ids):
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"TextEncoder: ids must be an integer tensor (B, L), got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"TextEncoder: token ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{ids.min().item()}, {ids.max().item()}]; tokenizer and text encoder mismatch?")
