"""L_div and L_loc (paper Eqs. 2-4) by hand, the stop-gradient, and a short optimisation on a tiny LDM."""
import copy
import time

import pytest
import torch

from grounding.attention_store import AttentionStore
from grounding.losses import diversity_loss, grounding_loss, localisation_loss, localisation_target, token_average
from test_heatmap import _inputs, tiny_pipe


def _gauss(side, cx, cy, s):
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                          indexing="ij")
    return torch.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / s ** 2)


# ---- L_div ----------------------------------------------------------------------------------------------


def test_diversity_disjoint_identical_and_by_hand():
    N = 16
    disjoint = torch.zeros(1, 1, 1, N, 3)
    disjoint[..., 0:4, 0] = disjoint[..., 4:8, 1] = disjoint[..., 8:16, 2] = 1.0
    assert diversity_loss(disjoint).item() == pytest.approx(0.0)
    same = torch.rand(N, 1).expand(N, 4).reshape(1, 1, 1, N, 4)
    assert diversity_loss(same).item() == pytest.approx(1.0, abs=1e-6)
    # two maps at 60 degrees: cos = 1/2 -> cos^2 = 1/4; scale of a map does not matter
    two = torch.zeros(1, 1, 1, N, 2)
    two[..., 0, 0] = 1.0
    two[..., 0, 1], two[..., 1, 1] = 3.0, 3.0 * 3 ** 0.5
    assert diversity_loss(two).item() == pytest.approx(0.25, abs=1e-6)
    # mean over steps and layers: one (t, l) identical, one disjoint -> 1/2
    mix = torch.cat([same[..., :3], disjoint], dim=0)
    assert diversity_loss(mix).item() == pytest.approx(0.5, abs=1e-6)


def test_diversity_ignores_masked_tokens():
    N = 8
    m = torch.zeros(1, 1, 2, N, 3)
    m[:, :, 0, :4, 0] = m[:, :, 0, 4:, 1] = 1.0           # item 0: two disjoint tokens ...
    m[:, :, 0, :, 2] = 1.0                                 # ... plus a padding column that overlaps both
    m[:, :, 1, :, 0] = 1.0                                 # item 1: a single real token, no pair
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert diversity_loss(m, mask).item() == pytest.approx(0.0)
    # without the mask the padding counts: item 0 has cos^2 = 0, 1/2, 1/2 over its 3 pairs -> 1/3;
    # item 1's empty columns normalise to 0 -> 0; mean 1/6
    assert diversity_loss(m).item() == pytest.approx(1 / 6)
    single = torch.rand(1, 1, 1, N, 1, requires_grad=True)
    loss = diversity_loss(single)
    assert loss.item() == 0.0 and loss.requires_grad      # no pair: 0, still in the graph


# ---- L_loc ----------------------------------------------------------------------------------------------


def test_target_and_stop_gradient():
    G = _gauss(8, 2, 5, 1.5)[None]                         # (B=1, 8, 8)
    A = torch.rand(2, 3, 1, 64, requires_grad=True)        # (T, L, B, N)
    trg = localisation_target(A, G.flatten(1), alpha=0.1, eps=1e-5)
    assert not trg.requires_grad                           # stopgrad(A_sp): no path through the target
    support = (G.flatten(1) > 1e-5).float()
    assert torch.allclose(trg, support * A.detach() + 0.1 * G.flatten(1))
    # the gradient equals that of 1 - cos(A, c) with c a constant copy of the target
    loss = localisation_loss(A, G)
    loss.backward()
    A2 = A.detach().clone().requires_grad_(True)
    ref = (1 - torch.nn.functional.cosine_similarity(A2, trg.detach(), dim=-1)).mean()
    ref.backward()
    assert torch.allclose(A.grad, A2.grad, atol=1e-7)
    # where G has no support (G <= eps) the map is not kept in the target
    G0 = torch.zeros(1, 8, 8)
    G0[0, :2, :2] = 1.0
    trg0 = localisation_target(A, G0.flatten(1))
    assert torch.all(trg0.reshape(2, 3, 1, 8, 8)[..., 4:, 4:] == 0)


def test_localisation_zero_on_target_direction_and_grows_with_distance():
    G = _gauss(16, 4, 4, 2.0)[None]
    # A_sp proportional to G: the target is (c + alpha) G, same direction -> 0
    A = (0.02 * G).flatten(1)[None, None]
    assert localisation_loss(A, G).item() == pytest.approx(0.0, abs=1e-6)
    # a blob moving away from the Gaussian: the loss grows monotonically
    losses = [localisation_loss(_gauss(16, 4 + d, 4 + d, 2.0).flatten()[None, None, None] * 0.02, G).item()
              for d in range(0, 10, 2)]
    print("L_loc vs distance", [round(v, 4) for v in losses])
    assert all(b > a for a, b in zip(losses, losses[1:]))
    assert losses[0] < 1e-6 and losses[-1] > 0.3


def test_grounding_loss_parts_and_the_target_at_the_map_resolution():
    G = _gauss(16, 4, 10, 1.5)[None]                       # (B, 16, 16): rendered at the maps' 16 x 16
    maps = torch.rand(2, 4, 1, 256, 3).softmax(-2)         # (T, L, B, N, S)
    total, parts = grounding_loss(maps, G, weights=(1.0, 1.0))
    assert total.item() == pytest.approx(parts["div"].item() + parts["loc"].item(), rel=1e-6)
    t2, _ = grounding_loss(maps, G, weights=(0.0, 2.0))
    assert t2.item() == pytest.approx(2 * parts["loc"].item(), rel=1e-6)
    assert torch.allclose(token_average(maps), maps.mean(-1))
    with pytest.raises(ValueError, match="not a square"):
        localisation_loss(torch.rand(1, 1, 1, 12), G)
    with pytest.raises(ValueError, match=r"G must be \(B, 16, 16\).*render_gaussians"):   # nothing is resized
        grounding_loss(maps, _gauss(64, 16, 40, 6.0)[None])


# ---- a short optimisation on a tiny random LDM ---------------------------------------------------------


def _inside_fraction(maps, mask):
    a = token_average(maps)                                # (T, L, B, N)
    return ((a * mask.flatten()).sum(-1) / a.sum(-1)).mean().item()


def test_tuning_the_anatomy_rows_moves_attention_into_the_gaussian():
    from grounding.prompts import LearnablePrompts
    pipe = tiny_pipe()
    _, z0, _, _, _ = _inputs(pipe)
    # A freshly initialised UNet has near-uniform cross-attention (tiny q.k logits) that no key can steer;
    # a trained one is sharp. Scale the random q/k projections by 3 to get a trained-like logit range.
    unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for layer in unet.cross_attention_layers():
            layer.to_q.weight.mul_(3.0)
            layer.to_k.weight.mul_(3.0)
    prompt = "left lower atelectasis"
    prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder)
    layers = [1, 2, 3]                                     # the 8x8 layers of the tiny UNet
    G = _gauss(8, 1.5, 5.5, 1.2)[None]                     # bottom-left of the 8x8 map
    region = G[0] > 0.5

    def record():
        store = AttentionStore(layers, prompts.token_positions(prompt), keep_grad=True)
        for t in (399, 499):
            store.set_step(t)
            unet(z0, t, prompts.encode([prompt]), store=store, stop_after=max(layers))
        return store.maps()

    with torch.no_grad():
        before = _inside_fraction(record(), region)
    opt = torch.optim.Adam(prompts.parameters(), lr=0.3)   # embeddings have norm ~8 here (N(0, 1) init, D = 64)
    start = time.time()
    for _ in range(40):
        loss, parts = grounding_loss(record(), G)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = _inside_fraction(record(), region)
    print(f"fraction of attention inside the Gaussian region: {before:.3f} -> {after:.3f} "
          f"(region = {region.float().mean():.3f} of the map; {time.time() - start:.1f}s; L = {loss.item():.3f})")
    assert after > before + 0.1 and after > 3 * before
