"""The GPU path: mixed precision with float32 recorded probabilities, fused attention wherever nothing is recorded,
dtype rules, and (on a CUDA machine) CUDA == CPU.

CPU tests always run: bf16 autocast on CPU keeps the recorded probabilities float32 and close to fp32; every
unrecorded attention layer takes the fused SDPA path (counted); fused and math paths agree under autocast; a bf16
model gives bf16 outputs; mismatched input dtypes are refused. Tests marked `cuda` skip without a GPU
(benchmarks/device_check.sh runs them on one).
"""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import cmp
from grounding.attention_store import AttentionStore
from grounding.heatmap import invert_and_record
from ldm.unet import UNet2DConditionModel, UNetConfig
from test_heatmap import tiny_heatmap_config, prompt_context, extract_heatmap

HAS_CUDA = torch.cuda.is_available()
cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


def on_cuda(f):
    for m in cuda:
        f = m(f)
    return f


class Store:
    """Records every wanted cross-attention layer's probabilities (B, heads, N, K) as given."""

    def __init__(self, want=None):
        self.want, self.maps = want, {}

    def wants(self, layer):
        return self.want is None or layer.cross_index in self.want

    def record(self, layer, probs):
        self.maps[layer.cross_index] = probs


def tiny_unet(device="cpu", heads=(2, 2)):
    torch.manual_seed(0)
    cfg = dataclasses.replace(UNetConfig.tiny(), num_attention_heads=heads)
    return UNet2DConditionModel(UNetConfig.from_dict(cfg.to_dict())).eval().to(device)


def unet_inputs(unet, device="cpu", B=2, side=16, L=9):
    g = torch.Generator().manual_seed(3)
    cfg = unet.config
    return (torch.randn(B, cfg.in_channels, side, side, generator=g).to(device), torch.tensor([50, 700], device=device)[:B],
            torch.randn(B, L, cfg.cross_attention_dim, generator=g).to(device))


def tiny_pipe(device="cpu"):
    """A random tiny LDM with the fields the heatmap code uses (image 1x32x32 -> latent 3x16x16)."""
    from ldm.schedulers import DDIMScheduler, SchedulerConfig
    from ldm.text_encoder import TextEncoder, TextEncoderConfig
    from ldm.tokenizer import train_bpe
    from ldm.vae import AutoencoderKL, VAEConfig
    torch.manual_seed(0)
    tok = train_bpe(["left lower atelectasis", "right pleural effusion", "cardiomegaly", "bibasilar edema"], 600)
    te = TextEncoder(TextEncoderConfig.tiny())
    unet = UNet2DConditionModel(dataclasses.replace(UNetConfig.tiny(), in_channels=3, out_channels=3,
                                                    cross_attention_dim=64))
    vae = AutoencoderKL(VAEConfig.tiny())
    for m in (te, unet, vae):
        m.eval().requires_grad_(False).to(device)
    return SimpleNamespace(tokenizer=tok, text_encoder=te, vae=vae, unet=unet, scale_factor=1.0, family="phantom",
                           scheduler=DDIMScheduler(SchedulerConfig.monai_cxr()))


# ----------------------------------------------------------------------------------------------------------------
# CPU: autocast, the fused path, dtype rules
# ----------------------------------------------------------------------------------------------------------------
def test_bf16_autocast_on_cpu_records_float32_probs_close_to_fp32():
    unet = tiny_unet()
    x = unet_inputs(unet)
    ref, amp = Store(), Store()
    with torch.no_grad():
        out32 = unet(*x, store=ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16 = unet(*x, store=amp)
    assert out16.dtype == torch.bfloat16                       # the rest of the network did run in bf16
    assert sorted(amp.maps) == sorted(ref.maps) == list(range(len(unet.cross_attention_layers())))
    worst = 0.0
    for i, p in amp.maps.items():
        assert p.dtype == torch.float32, f"layer {i}: recorded probs are {p.dtype} under autocast"
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5, rtol=0)
        worst = max(worst, cmp(f"probs layer {i}, bf16 autocast vs fp32", p, ref.maps[i], atol=2e-2))
    # bf16 keeps 8 bits of mantissa: q/k projections are off by ~0.4%, the probabilities by about as much
    assert worst <= 2e-2
    assert cmp("output, bf16 autocast vs fp32", out16, out32, atol=5e-2) <= 5e-2


def test_every_unrecorded_layer_takes_the_fused_path(monkeypatch):
    unet = tiny_unet()
    x = unet_inputs(unet)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    n_attn = 2 * len(unet.cross_attention_layers())            # one self- and one cross-attention per block
    with torch.no_grad():
        unet(*x)
        assert len(calls) == n_attn                             # nothing recorded: every layer fused
        calls.clear()
        store = Store(want={1, 3})
        unet(*x, store=store)
        assert sorted(store.maps) == [1, 3] and len(calls) == n_attn - 2   # only the two recorded layers unfused
        calls.clear()
        unet.set_fused_attention(False)
        unet(*x)
        assert len(calls) == 0                                  # the explicit path everywhere when switched off


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_and_math_paths_agree(dtype):
    unet = tiny_unet()
    x = unet_inputs(unet)
    amp = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), amp:
        fused = unet(*x)
        unet.set_fused_attention(False)
        math_ = unet(*x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2             # the math path upcasts to fp32: differs by bf16 rounding
    assert cmp(f"fused vs math ({dtype})", fused, math_, atol=tol) <= tol


def test_bf16_model_gives_bf16_outputs_and_float32_probs():
    unet = tiny_unet().to(torch.bfloat16)
    s, t, c = unet_inputs(unet)
    store = Store()
    with torch.no_grad():
        out = unet(s.bfloat16(), t, c.bfloat16(), store=store)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert all(p.dtype == torch.float32 for p in store.maps.values())


def test_mismatched_input_dtype_is_refused():
    # The rule: inputs must have the model's dtype; mixed precision goes through autocast, never silent casts.
    unet = tiny_unet()
    s, t, c = unet_inputs(unet)
    for args in ((s.half(), t, c), (s, t, c.half()), (s.bfloat16(), t, c.bfloat16())):
        with pytest.raises((RuntimeError, ValueError)):
            unet(*args)
    bf = tiny_unet().to(torch.bfloat16)
    with pytest.raises((RuntimeError, ValueError)):
        bf(s, t, c)                                             # fp32 inputs into a bf16 model


def test_mismatched_input_dtype_error_names_the_model_dtype():
    unet = tiny_unet()
    s, t, c = unet_inputs(unet)
    with pytest.raises(ValueError, match="float32"):
        unet(s.half(), t, c)


def test_inversion_under_bf16_autocast_keeps_float32_latents_and_maps():
    pipe = tiny_pipe()
    torch.manual_seed(1)
    with torch.no_grad():
        z0 = pipe.vae.encode(torch.rand(1, 1, 32, 32))
        cond, pos = prompt_context(pipe, "left lower atelectasis")
        uncond = pipe.text_encoder(pipe.tokenizer([""]))
    cfg = tiny_heatmap_config()
    s32, s16 = AttentionStore(cfg.layers, pos), AttentionStore(cfg.layers, pos)
    invert_and_record(pipe, z0, cond, uncond, s32, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16 = invert_and_record(pipe, z0, cond, uncond, s16, cfg)
    # the scheduler upcasts the bf16 model output, so the trajectory itself stays float32
    assert z16.dtype == torch.float32 and s16.maps().dtype == torch.float32
    assert cmp("maps after bf16 inversion vs fp32", s16.maps(), s32.maps(), atol=5e-2) <= 5e-2


# ----------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ----------------------------------------------------------------------------------------------------------------
@on_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_unet_close_to_fp32_and_probs_float32(dtype):
    unet = tiny_unet("cuda")
    x = unet_inputs(unet, "cuda")
    ref, amp = Store(), Store()
    with torch.no_grad():
        out32 = unet(*x, store=ref)
        plain32 = unet(*x)                                      # fused (SDPA / flash) everywhere
        with torch.autocast("cuda", dtype=dtype):
            out16 = unet(*x, store=amp)
            plain16 = unet(*x)
    assert out16.dtype == dtype
    assert cmp("cuda fp32 recorded vs fused", out32, plain32, atol=1e-4) <= 1e-4
    assert cmp(f"cuda {dtype} vs fp32", out16, out32, atol=5e-2) <= 5e-2
    assert cmp(f"cuda {dtype} fused vs recorded", plain16, out16, atol=5e-2) <= 5e-2
    for i, p in amp.maps.items():
        assert p.dtype == torch.float32 and p.device.type == "cuda"
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5, rtol=0)
        assert cmp(f"cuda probs layer {i} {dtype}", p, ref.maps[i], atol=2e-2) <= 2e-2


@on_cuda
def test_cuda_heatmap_equals_cpu():
    from grounding.heatmap import extract_heatmaps
    torch.backends.cudnn.allow_tf32 = False                     # TF32 convolutions would differ by ~1e-3
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = tiny_heatmap_config()
    image = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    h_cpu = extract_heatmaps(tiny_pipe("cpu"), image, ["left lower atelectasis"], cfg)
    pipe = tiny_pipe("cuda")
    h_gpu = extract_heatmaps(pipe, image.cuda(), ["left lower atelectasis"], cfg)
    assert cmp("heatmap cuda vs cpu (fp32)", h_gpu, h_cpu, atol=1e-4) <= 1e-4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h_bf16 = extract_heatmaps(pipe, image.cuda(), ["left lower atelectasis"], cfg)
    corr = torch.corrcoef(torch.stack([h_bf16.flatten(), h_cpu.flatten()]))[0, 1].item()
    print(f"heatmap bf16 autocast vs fp32: correlation {corr:.4f}")
    assert corr > 0.95


@on_cuda
def test_cuda_single_image_extract_heatmap():
    pipe = tiny_pipe("cuda")
    h = extract_heatmap(pipe, torch.rand(1, 32, 32, device="cuda"), "left lower atelectasis", tiny_heatmap_config())
    assert h.shape == (32, 32) and h.max().item() == pytest.approx(1.0)
