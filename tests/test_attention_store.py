"""AttentionStore: records only the chosen layers, steps and token columns; gradients only when asked."""
from types import SimpleNamespace

import pytest
import torch

from grounding.attention_store import AttentionStore
from test_heatmap import _inputs, tiny_pipe


def _layer(i, cross=True):
    return SimpleNamespace(cross_index=i if cross else None, is_cross=cross)


def test_keeps_only_prompt_columns_averaged_over_heads():
    store = AttentionStore(layers=[1], columns=[2, 3])
    probs = torch.rand(2, 4, 16, 77).softmax(-1)                  # (B, heads, N, K)
    assert store.wants(_layer(1)) and not store.wants(_layer(0)) and not store.wants(_layer(1, cross=False))
    store.set_step(7)
    store.record(_layer(1), probs)
    assert store.keys() == [(7, 1)]
    kept = store.records[(7, 1)]
    assert kept.shape == (2, 16, 2)
    assert torch.equal(kept, probs[..., [2, 3]].mean(1))
    assert not kept.requires_grad
    with pytest.raises(RuntimeError, match="twice"):
        store.record(_layer(1), probs)


def test_per_item_positions_are_padded_and_masked():
    store = AttentionStore(layers=None, columns=[[1, 2, 3], [1]], average_heads=False)
    probs = torch.rand(2, 3, 4, 77)
    store.record(_layer(0), probs)
    kept = store.maps()                                           # (T, L, B, heads, N, S)
    assert kept.shape == (1, 1, 2, 3, 4, 3)
    assert torch.equal(kept[0, 0, 1, ..., 0], probs[1, ..., 1])
    assert store.token_mask().tolist() == [[True, True, True], [True, False, False]]


def test_step_keys_and_reset():
    store = AttentionStore(layers=[0], columns=[1])
    for step in (10, 20):                                         # the caller's step key (here a timestep)
        store.set_step(step)
        store.record(_layer(0), torch.rand(1, 1, 4, 77))
    assert store.keys() == [(10, 0), (20, 0)] and store.maps().shape == (2, 1, 1, 4, 1)
    store.reset()
    assert store.keys() == [] and store.numel() == 0
    with pytest.raises(ValueError, match="nothing recorded"):
        store.maps()


def test_memory_is_steps_x_layers_x_pixels_x_tokens_on_the_unet():
    pipe = tiny_pipe()
    _, z0, cond, _, pos = _inputs(pipe)
    layers = [1, 2, 3]                                            # three 8x8 layers of the tiny UNet
    store = AttentionStore(layers, pos)
    with torch.no_grad():
        for step in (0, 1):
            store.set_step(step)
            pipe.unet(z0, 500, cond, store=store)
    maps = store.maps()
    T, L, B, N, S = 2, 3, 1, 8 * 8, len(pos)
    assert maps.shape == (T, L, B, N, S)
    assert store.numel() == T * L * B * N * S                     # nothing else is kept (no 77, no heads)
    assert maps.sum(-1).max() <= 1.0 + 1e-6                       # a subset of each softmax row
    # the stored maps are exactly the selected columns of the full probabilities
    full = AttentionStore([1], None, average_heads=False)
    with torch.no_grad():
        pipe.unet(z0, 500, cond, store=full)
    probs = full.records[(0, 1)]                                    # (B, heads, N, 77)
    assert probs.shape[-1] == 77 and torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(store.records[(0, 1)], probs[..., pos].mean(1), atol=0)
    # layers of different resolutions cannot be stacked silently
    mixed = AttentionStore([0, 1], pos)
    with torch.no_grad():
        pipe.unet(z0, 500, cond, store=mixed)
    with pytest.raises(ValueError, match="different resolutions"):
        mixed.maps()


def test_keep_grad_keeps_the_graph():
    pipe = tiny_pipe()
    _, z0, cond, _, pos = _inputs(pipe)
    ctx = cond.clone().requires_grad_(True)
    store = AttentionStore([2], pos, keep_grad=True)
    pipe.unet(z0, 500, ctx, store=store, stop_after=2)
    m = store.maps()
    assert m.requires_grad
    m[..., 0].sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    detached = AttentionStore([2], pos)
    pipe.unet(z0, 500, ctx, store=detached, stop_after=2)
    assert not detached.maps().requires_grad
