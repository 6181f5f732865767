"""Attention recording (ldm/attention.py + the UNet's store / stop_after plumbing, ARCHITECTURE.md).

Fused (SDPA) and explicit paths agree; recording changes nothing; recorded probabilities are distributions over
the text tokens with shape (B, heads, N, K); gradients reach the text through them; an early stop records exactly
what the full forward records up to that layer; the layer order and names match diffusers' execution order.
"""
import pytest
import torch

from conftest import cmp, need
from ldm.attention import Attention, BasicTransformerBlock
from ldm.unet import UNet2DConditionModel, UNetConfig
from ldm.weights.configs import unet_config_from_diffusers


class Store:
    """The store protocol in its simplest form: keep the probabilities of the wanted cross_index values."""

    def __init__(self, want=None):
        self.want, self.maps, self.asked = want, {}, []

    def wants(self, layer):
        self.asked.append(layer.cross_index)
        return self.want is None or layer.cross_index in self.want

    def record(self, layer, probs):
        assert layer.cross_index not in self.maps, "a layer was recorded twice in one forward"
        self.maps[layer.cross_index] = probs


def tiny_unet(**overrides):
    cfg = UNetConfig.tiny()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return UNet2DConditionModel(UNetConfig.from_dict(cfg.to_dict())).eval()


def inputs(cfg, B=2, side=16, L=7):
    return torch.randn(B, cfg.in_channels, side, side), torch.tensor([10, 700][:B]), torch.randn(B, L, cfg.cross_attention_dim)


def test_attention_math_and_fused_paths_agree():
    attn = Attention(24, 16, heads=3, dim_head=8, is_cross=True)
    x, ctx = torch.randn(2, 20, 24), torch.randn(2, 5, 16)
    fused = attn(x, ctx)
    attn.fused = False
    math = attn(x, ctx)
    assert cmp("attention fused vs math", fused, math, atol=1e-6) <= 1e-6


def test_unet_math_and_fused_paths_agree():
    unet = tiny_unet()
    sample, t, ctx = inputs(unet.config)
    fused = unet(sample, t, ctx)
    unet.set_fused_attention(False)
    assert all(not m.fused for m in unet.modules() if isinstance(m, Attention))
    math = unet(sample, t, ctx)
    assert cmp("unet fused vs math", fused, math, atol=1e-5) <= 1e-5


def test_attention_matches_diffusers_attention():
    need("diffusers")
    from diffusers.models.attention_processor import Attention as RefAttention

    ref = RefAttention(query_dim=24, cross_attention_dim=16, heads=3, dim_head=8).eval()
    ours = Attention(24, 16, heads=3, dim_head=8, is_cross=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(2, 20, 24), torch.randn(2, 5, 16)
    assert cmp("Attention vs diffusers", ours(x, ctx), ref(x, encoder_hidden_states=ctx)) <= 1e-5


def test_transformer_block_matches_diffusers():
    need("diffusers")
    from diffusers.models.attention import BasicTransformerBlock as RefBlock

    ref = RefBlock(32, 4, 8, cross_attention_dim=16, activation_fn="geglu").eval()
    for p in ref.parameters():  # LayerNorm weights and biases too, so that a swapped norm would show
        p.data.add_(0.1 * torch.randn_like(p))
    ours = BasicTransformerBlock(32, 4, 8, 16).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(2, 12, 32), torch.randn(2, 5, 16)
    assert cmp("BasicTransformerBlock vs diffusers", ours(x, ctx), ref(x, encoder_hidden_states=ctx)) <= 1e-5


def test_recording_does_not_change_the_output():
    unet = tiny_unet()
    sample, t, ctx = inputs(unet.config)
    store = Store()
    recorded = unet(sample, t, ctx, store=store)
    assert len(store.maps) == len(unet.cross_attention_layers()) == 7
    cmp("recorded vs fused forward", recorded, unet(sample, t, ctx), atol=1e-5)
    assert torch.allclose(recorded, unet(sample, t, ctx), atol=1e-5)
    # With the explicit path everywhere, recording is bit-for-bit a no-op.
    unet.set_fused_attention(False)
    assert torch.equal(unet(sample, t, ctx, store=Store()), unet(sample, t, ctx))


def test_recorded_probs_are_distributions_with_documented_shape():
    unet = tiny_unet()
    B, side, K = 2, 16, 7
    sample, t, ctx = inputs(unet.config, B, side, K)
    store = Store()
    unet(sample, t, ctx, store=store)
    for layer in unet.cross_attention_layers():
        probs = store.maps[layer.cross_index]
        N = (side // layer.downscale) ** 2
        assert probs.shape == (B, layer.heads, N, K), (layer.name, probs.shape)
        assert probs.dtype == torch.float32 and (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(B, layer.heads, N))


def test_only_wanted_layers_are_recorded_and_self_attention_never():
    unet = tiny_unet()
    store = Store(want={2, 5})
    unet(*inputs(unet.config), store=store)
    assert sorted(store.maps) == [2, 5]
    # the store is asked about cross-attention layers only (self-attention is never recorded)
    assert sorted(store.asked) == list(range(7))


def test_gradient_reaches_the_text_through_recorded_probs():
    # Prompt tuning puts its loss on the recorded maps: the graph must stay attached.
    unet = tiny_unet()
    sample, t, ctx = inputs(unet.config)
    ctx.requires_grad_(True)
    store = Store(want={3})
    unet(sample, t, ctx, store=store, stop_after=3)
    probs = store.maps[3]
    (probs[..., 1] * torch.linspace(0, 1, probs.shape[2])).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [0, 2, 4])
def test_early_stop_records_exactly_the_maps_of_the_full_forward(k):
    unet = tiny_unet()
    sample, t, ctx = inputs(unet.config)
    full, early = Store(), Store()
    assert unet(sample, t, ctx, store=full) is not None
    assert unet(sample, t, ctx, store=early, stop_after=k) is None
    assert sorted(early.maps) == list(range(k + 1))
    for i in early.maps:
        assert torch.equal(early.maps[i], full.maps[i]), f"layer {i}"
    with pytest.raises(ValueError, match="stop_after"):
        unet(sample, t, ctx, stop_after=7)


def test_cross_index_order_and_names_follow_diffusers_execution_order():
    need("diffusers")
    from diffusers import UNet2DConditionModel as RefUNet

    ref = RefUNet(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  layers_per_block=2, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8).eval()
    called = []
    for name, m in ref.named_modules():
        if name.endswith("attn2"):
            m.register_forward_hook(lambda mod, args, kwargs, out, name=name: called.append(name), with_kwargs=True)
    ref(torch.randn(1, 4, 16, 16), 5, torch.randn(1, 3, 16))

    unet = UNet2DConditionModel(unet_config_from_diffusers(dict(ref.config)))
    layers = unet.cross_attention_layers()
    assert [l.name for l in layers] == called
    assert [l.cross_index for l in layers] == list(range(len(called)))
    assert [l.place for l in layers] == ["down"] * 4 + ["mid"] + ["up"] * 6
    assert [l.downscale for l in layers] == [1, 1, 2, 2, 4, 2, 2, 2, 1, 1, 1]
    # self-attention layers know their place too, but have no cross_index
    selfs = [m for m in unet.modules() if isinstance(m, Attention) and not m.is_cross]
    assert all(m.cross_index is None and m.name.endswith("attn1") and m.place for m in selfs)


def test_recorded_probs_stay_float32_under_bf16_autocast():
    # The fast path runs the UNet under autocast; the recorded maps must still be float32 softmaxes of the
    # (bf16) projections, not bf16 scores upcast afterwards.
    unet = tiny_unet()
    sample, t, ctx = inputs(unet.config)
    layer = unet.cross_attention_layers()[1]
    seen = {}
    layer.to_q.register_forward_hook(lambda m, a, out: seen.__setitem__("q", out))
    layer.to_k.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out))
    store = Store(want={1})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(sample, t, ctx, store=store)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    probs = store.maps[1]
    assert seen["q"].dtype == torch.bfloat16 and probs.dtype == torch.float32
    h = layer.heads
    q = seen["q"].float().unflatten(-1, (h, -1)).transpose(1, 2)
    k = seen["k"].float().unflatten(-1, (h, -1)).transpose(1, 2)
    want = (q @ k.transpose(-1, -2) * layer.scale).softmax(-1)
    assert cmp("probs under bf16 autocast", probs, want, atol=1e-6) <= 1e-6
