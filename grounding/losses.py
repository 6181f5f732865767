"""The anatomy-grounding losses: diversity L_div (Eq. 2) and localisation L_loc (Eqs. 3-4).

Mirrors Vilouras et al., "Anatomy-Grounded Weakly Supervised Prompt Tuning for Chest X-ray Latent
Diffusion Models" (MIDL 2026), Sec. 3.2; restated in docs/paper.md section 5.

Shapes: `maps` are cross-attention probabilities as the AttentionStore gives them, (T, L, B, N, S):
T recorded steps, L recorded layers, B batch, N = h*w pixels of the map, S the prompt's tokens
(only the non-special ones: the store already dropped the BOS/EOS/pad columns and the "and" joining locations,
grounding/prompts.py `token_positions`). When the prompts of a batch
have different lengths the store pads S and gives a (B, S) `token_mask` (True = a real token); pass it here.
G is the anatomy Gaussian target, (B, h, w) at the map's own resolution: prompt tuning renders it there
(grounding/tuning.py: grounding/anatomy.py `render_gaussians` puts each Gaussian's mass over a map cell into that
cell, peak 1), so nothing is resized here.
"""
import math

import torch
import torch.nn.functional as F

PAPER_ALPHA = 0.1   # Eq. 3 weight of the Gaussian in the target (ablations: 0 and 1 are worse)
PAPER_EPS = 1e-5    # Eq. 3 support threshold on G


def _token_mask(maps, token_mask):
    """(B, S) bool mask of the real token columns (all True when none is given)."""
    B, S = maps.shape[-3], maps.shape[-1]
    if token_mask is None:
        return torch.ones(B, S, dtype=torch.bool, device=maps.device)
    token_mask = torch.as_tensor(token_mask, dtype=torch.bool, device=maps.device)
    if token_mask.shape != (B, S):
        raise ValueError(f"token_mask shape {tuple(token_mask.shape)} does not match maps (B={B}, S={S})")
    return token_mask


def diversity_loss(maps, token_mask=None):
    """Eq. 2: L_div = mean over t, l and token pairs i != j of cos^2(A_i, A_j).

    Each token map A_i (N pixels) is L2-normalised, so the Gram matrix holds the cosines. Disjoint maps
    give 0, identical maps give 1. Batch items with fewer than two tokens have no pair and are skipped;
    with no pair at all the loss is 0 (kept in the graph).
    """
    mask = _token_mask(maps, token_mask)
    a = F.normalize(maps.float(), dim=-2)                      # unit norm over the N pixels
    cos = a.transpose(-1, -2) @ a                              # (T, L, B, S, S)
    S = maps.shape[-1]
    pair = mask[:, :, None] & mask[:, None, :] & ~torch.eye(S, dtype=torch.bool, device=maps.device)
    n_pairs = pair.sum(dim=(-1, -2))                           # (B,) ordered pairs i != j
    per_item = (cos.square() * pair).sum(dim=(-1, -2)) / n_pairs.clamp(min=1)   # (T, L, B)
    has_pair = n_pairs > 0
    if not has_pair.any():
        return maps.sum() * 0.0
    return per_item[..., has_pair].mean()                      # mean over t, l and items with pairs


def token_average(maps, token_mask=None):
    """A_sp: the map averaged over the prompt's non-special tokens, (T, L, B, N)."""
    mask = _token_mask(maps, token_mask).to(maps.dtype)        # (B, S)
    if (mask.sum(-1) == 0).any():
        raise ValueError("a prompt has no non-special token to average: empty prompt?")
    return (maps * mask[:, None, :]).sum(-1) / mask.sum(-1)[:, None]


def _map_side(N):
    """The side of a square map of N pixels (every cross-attention map of these UNets is square)."""
    side = math.isqrt(N)
    if side * side != N:
        raise ValueError(f"maps have N={N} pixels, not a square map")
    return side


def localisation_target(A_sp, G, alpha=PAPER_ALPHA, eps=PAPER_EPS):
    """Eq. 3: trg = 1[G > eps] * stopgrad(A_sp) + alpha * G.

    A_sp (..., B, N); G (B, N) already at the map resolution and flattened. The model's own map is kept
    (without gradient) where the Gaussian has support, and the Gaussian is added on top: the target
    sharpens the current map towards the anatomy instead of replacing it.
    """
    support = (G > eps).to(A_sp.dtype)
    return support * A_sp.detach() + alpha * G                 # .detach() is the stop-gradient


def localisation_loss(A_sp, G, alpha=PAPER_ALPHA, eps=PAPER_EPS):
    """Eq. 4: L_loc = mean over t, l, b of 1 - cos(A_sp, trg), the cosine taken over the N pixels.

    A_sp (T, L, B, N) (or any leading dims ending in B, N); G (B, side, side) at the maps' resolution, N = side^2.
    """
    side = _map_side(A_sp.shape[-1])
    if G.dim() != 3 or tuple(G.shape[-2:]) != (side, side):
        raise ValueError(f"G must be (B, {side}, {side}), the maps' resolution, got {tuple(G.shape)}; render the "
                         f"Gaussians at that size (grounding/anatomy.py render_gaussians(gaussians, {side}))")
    g = G.to(A_sp.device).float().flatten(1)                         # (B, N)
    trg = localisation_target(A_sp, g, alpha=alpha, eps=eps)
    return (1 - F.cosine_similarity(A_sp.float(), trg.float(), dim=-1)).mean()


def grounding_loss(maps, G, weights=(1.0, 1.0), alpha=PAPER_ALPHA, eps=PAPER_EPS, token_mask=None):
    """Total L = w_div * L_div + w_loc * L_loc (paper: both weights 1). Returns (total, parts dict).

    maps (T, L, B, N, S) prompt-token probabilities; G (B, H, W) the (jittered, merged) Gaussian.
    """
    if maps.dim() != 5:
        raise ValueError(f"maps must be (T, L, B, N, S), got {tuple(maps.shape)}")
    w_div, w_loc = weights
    l_div = diversity_loss(maps, token_mask)
    l_loc = localisation_loss(token_average(maps, token_mask), G, alpha=alpha, eps=eps)
    total = w_div * l_div + w_loc * l_loc
    return total, {"div": l_div.detach(), "loc": l_loc.detach(), "total": total.detach()}
