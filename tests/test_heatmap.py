"""Heatmap extraction: deterministic, unchanged by recording, fast path == straightforward path; and the
image-processing pieces (Gaussian filter, Otsu, window, per-map normalisation) checked by hand."""
import dataclasses
import functools
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import cmp
from grounding.attention_store import AttentionStore
from grounding.heatmap import (HeatmapConfig, LAYER_PRESETS, extract_heatmaps, gaussian_filter, heatmap_from_maps,
                               inversion_scheduler, invert_and_record, otsu_threshold, prompt_contexts,
                               training_latents, window_timesteps)

CORPUS = ["left lower atelectasis", "right upper pneumonia", "bibasilar atelectasis", "cardiomegaly",
          "left pleural effusion", "right pneumothorax", "bilateral lower edema", "left apical opacity",
          "pulmonary edema", "lingular consolidation", "right costophrenic lung opacity", "left base and right"]


@functools.lru_cache(maxsize=None)
def tiny_pipe(image_size=32, seed=0):
    """A random tiny LDM with the pipeline's fields (tokenizer, text_encoder, vae, unet, scheduler, ...).

    Image 1 x 32 x 32 -> latent 3 x 16 x 16; tiny UNet: cross_index 0 @16, 1 @8, 2 (mid) @8, 3-4 @8, 5-6 @16.
    """
    from ldm.schedulers import DDIMScheduler, SchedulerConfig
    from ldm.text_encoder import TextEncoder, TextEncoderConfig
    from ldm.tokenizer import train_bpe
    from ldm.unet import UNet2DConditionModel, UNetConfig
    from ldm.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(seed)
    tok = train_bpe(CORPUS, vocab_size=640)
    te = TextEncoder(TextEncoderConfig.tiny()).eval()
    unet_cfg = dataclasses.replace(UNetConfig.tiny(), in_channels=3, out_channels=3, cross_attention_dim=64)
    unet = UNet2DConditionModel(unet_cfg).eval()
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    for m in (te, unet, vae):
        m.requires_grad_(False)
    return SimpleNamespace(tokenizer=tok, text_encoder=te, vae=vae, unet=unet,
                           scheduler=DDIMScheduler(SchedulerConfig.monai_cxr()), scale_factor=1.0,
                           family="phantom", prediction_type="v_prediction", image_size=image_size)


def _inputs(pipe, prompt="left lower atelectasis"):
    torch.manual_seed(1)
    image = torch.rand(1, 1, pipe.image_size, pipe.image_size)
    with torch.no_grad():
        z0 = pipe.vae.encode(image) * pipe.scale_factor
        cond, pos = prompt_context(pipe, prompt)
        uncond = pipe.text_encoder(pipe.tokenizer([""]))
    return image, z0, cond, uncond, pos


# ---- schedule and window ----------------------------------------------------------------------------------


def test_window_matches_paper_indices():
    from ldm.schedulers import DDIMScheduler, SchedulerConfig
    sched = inversion_scheduler(DDIMScheduler(SchedulerConfig.monai_cxr()), HeatmapConfig())
    ts = sched.timesteps
    assert ts[0] == 999 and ts[-1] == 9 and len(ts) == 100                  # trailing spacing
    test = window_timesteps(sched, 400, 600)
    assert test.tolist() == ts[40:60].tolist() and len(test) == 20           # reverse-process [40, 60)
    train = window_timesteps(sched, 400, 700)
    assert train.tolist() == ts[30:60].tolist() and len(train) == 30        # reverse-process [30, 60)
    # the inversion-order reading of [30, 60) is a different window
    assert window_timesteps(sched, 300, 600).tolist() == sched.inversion_timesteps[30:60].flip(0).tolist()


def test_layer_presets():
    assert HeatmapConfig().resolved_layers() == (4, 5, 6, 7) and not HeatmapConfig().resolved_otsu()
    base = HeatmapConfig(preset="baseline")
    assert base.resolved_layers() == (3, 4, 6, 7) and base.resolved_otsu()
    assert all(len(v) == 4 for v in LAYER_PRESETS.values())
    with pytest.raises(ValueError, match="preset"):
        HeatmapConfig(family="nope").resolved_layers()
    with pytest.raises(ValueError, match="preset must be one of"):
        HeatmapConfig(preset=True)          # the old `tuned` flag's values are not presets


def test_preset_layers_share_one_resolution_on_real_layouts():
    # build nothing heavy: name the layers of the full-size configs on the meta device
    from ldm.unet import UNet2DConditionModel, UNetConfig
    for family, cfg in (("monai_cxr", UNetConfig.monai_cxr()), ("sd1", UNetConfig.sd15()),
                        ("phantom", UNetConfig.phantom())):
        with torch.device("meta"):
            layers = UNet2DConditionModel(cfg).cross_attention_layers()
        for preset in ("tuning", "baseline"):
            scales = {layers[i].downscale for i in LAYER_PRESETS[(family, preset)]}
            print(family, preset, len(layers), scales)
            assert len(scales) == 1, (family, preset, scales)
        assert len(layers) == {"sd1": 16, "monai_cxr": 11, "phantom": 6}[family]


# ---- image processing -----------------------------------------------------------------------------------


def test_gaussian_filter_by_hand():
    x = torch.zeros(1, 21, 21)
    x[0, 10, 10] = 1.0
    y = gaussian_filter(x, sigma=2.0)
    # a delta gives the (normalised, 4-sigma truncated) 2D kernel: centre = 1 / (sum of 1D weights)^2
    k = torch.exp(-0.5 * (torch.arange(-8, 9.0) / 2.0) ** 2)
    assert y[0, 10, 10].item() == pytest.approx((1 / k.sum() ** 2).item(), rel=1e-5)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(y[0], y[0].T, atol=1e-7)                          # isotropic
    # constant maps stay constant at the borders (reflect mode), even with a radius larger than the image
    c = torch.full((2, 5, 7), 0.3)
    assert torch.allclose(gaussian_filter(c, sigma=3.0), c, atol=1e-6)
    # scipy's "reflect" repeats the edge: a step at the border is smoothed symmetrically
    e = torch.zeros(1, 1, 6)
    e[0, 0, 0] = 1
    assert gaussian_filter(e.expand(1, 6, 6).clone(), 1.0)[0, 0, 0] > 0.5


def test_otsu_splits_two_modes():
    x = torch.cat([torch.full((50,), 0.1), torch.full((30,), 0.8)]) + torch.linspace(0, 0.05, 80)
    thr = otsu_threshold(x)
    # every split in the empty gap separates equally well; like skimage the first one wins, and the threshold is the
    # centre of the low mode's top bin: the one low value above that centre counts as foreground (skimage too)
    width = (x.max() - x.min()) / 256
    assert x[49] - width / 2 < thr < x[49] and ((x > thr) == (torch.arange(80) >= 49)).all()


def test_otsu_threshold_is_the_bin_centre():
    """Hand-computed: 4 bins over [0, 1], centres .125 .375 .625 .875, counts [4, 1, 0, 3]. Between-class
    variance w1 w2 (m1 - m2)^2 of the split after bin k: k=0: 4*4*(.125 - .75)^2 = 6.25; k=1: 5*3*(.175 - .875)^2
    = 7.35; k=2: the same 7.35 (bin 2 is empty), the first wins. The threshold is bin 1's centre, 0.375 (skimage's
    convention), not its upper edge 0.5: the 0.45 pixel, in bin 1 above its centre, is foreground."""
    x = torch.tensor([0.0, 0.1, 0.1, 0.2, 0.45, 0.8, 0.9, 1.0])
    assert torch.histc(x, bins=4, min=0, max=1).tolist() == [4, 1, 0, 3]
    assert otsu_threshold(x, nbins=4) == pytest.approx(0.375)
    assert (x > otsu_threshold(x, nbins=4)).tolist() == [False] * 4 + [True] * 4


def test_heatmap_from_maps_normalises_each_map():
    # two layers, one step: layer 0 peaks top-left, layer 1 has 100x the scale but peaks bottom-right;
    # per-map min-max makes both count equally, so both corners end up equally bright
    m = torch.zeros(1, 2, 1, 16, 1)
    m[0, 0, 0, 0, 0] = 1.0
    m[0, 1, 0, 15, 0] = 100.0
    hm = heatmap_from_maps(m, 8, HeatmapConfig(sigma=0.0, otsu=False, resize_mode="nearest"))
    assert hm.shape == (1, 8, 8)
    assert hm[0, 0, 0] == pytest.approx(1.0) and hm[0, -1, -1] == pytest.approx(1.0)
    assert hm.min() == 0 and hm[0, 4, 4] == 0
    # token mask: a padded column must not dilute the mean
    m2 = torch.cat([m, torch.full_like(m, 7.0)], dim=-1)
    hm2 = heatmap_from_maps(m2, 8, HeatmapConfig(sigma=0.0, otsu=False, resize_mode="nearest"),
                            token_mask=torch.tensor([[True, False]]))
    assert torch.equal(hm, hm2)


# ---- the tiny LDM -----------------------------------------------------------------------------------------


def test_fast_path_equals_straightforward_path():
    pipe = tiny_pipe()
    image, z0, cond, uncond, pos = _inputs(pipe)
    cfg = tiny_heatmap_config()
    fast, slow = AttentionStore(cfg.layers, pos), AttentionStore(cfg.layers, pos)
    invert_and_record(pipe, z0, cond, uncond, fast, cfg, fast=True)
    invert_and_record(pipe, z0, cond, uncond, slow, cfg, fast=False)
    assert fast.keys() == slow.keys() and len(fast.keys()) == 3 * 3         # 3 steps in [400, 700) x 3 layers
    assert {t for t, _ in fast.keys()} == {699, 599, 499}
    d = cmp("maps fast vs straightforward", fast.maps(), slow.maps(), atol=1e-5)
    assert d <= 1e-5
    h_fast = extract_heatmap(pipe, image[0], "left lower atelectasis", cfg, fast=True)
    h_slow = extract_heatmap(pipe, image[0], "left lower atelectasis", cfg, fast=False)
    assert h_fast.shape == (32, 32) and 0 <= h_fast.min() and h_fast.max() == pytest.approx(1.0)
    assert cmp("heatmap fast vs straightforward", h_fast, h_slow, atol=1e-5) <= 1e-5


def test_extraction_is_deterministic_and_prompt_dependent():
    pipe = tiny_pipe()
    image = _inputs(pipe)[0][0]
    cfg = tiny_heatmap_config()
    a = extract_heatmap(pipe, image, "left lower atelectasis", cfg)
    b = extract_heatmap(pipe, image, "left lower atelectasis", cfg)
    assert torch.equal(a, b)
    c = extract_heatmap(pipe, image, "right pneumothorax", cfg)
    assert (a - c).abs().max() > 1e-3
    # with Otsu, everything under the threshold is 0 and the map is still normalised
    o = extract_heatmap(pipe, image, "left lower atelectasis", dataclasses.replace(cfg, otsu=True))
    assert (o == 0).float().mean() > 0.2 and o.max() == pytest.approx(1.0)


class RecordsNothing(AttentionStore):
    def wants(self, layer):
        return False


def test_recording_does_not_change_the_output_path():
    pipe = tiny_pipe()
    _, z0, cond, uncond, pos = _inputs(pipe)
    cfg = tiny_heatmap_config()
    # the UNet output with recording on equals the output without a store
    store = AttentionStore(None, pos)
    with torch.no_grad():
        out_rec = pipe.unet(z0, 499, cond, store=store)
        out_plain = pipe.unet(z0, 499, cond)
    assert len(store.keys()) == len(pipe.unet.cross_attention_layers())
    assert cmp("unet output, recording on vs off", out_rec, out_plain, atol=1e-5) <= 1e-5
    # the inversion trajectory does not depend on what is recorded
    z_rec = invert_and_record(pipe, z0, cond, uncond, AttentionStore(cfg.layers, pos), cfg)
    z_none = invert_and_record(pipe, z0, cond, uncond, RecordsNothing(cfg.layers, pos), cfg)
    assert torch.equal(z_rec, z_none)


def test_training_latents_inversion_and_noise():
    pipe = tiny_pipe()
    _, z0, _, uncond, _ = _inputs(pipe)
    cfg = tiny_heatmap_config()
    ts = window_timesteps(inversion_scheduler(pipe.scheduler, cfg), *cfg.window)
    lat = training_latents(pipe, z0, ts, mode="inversion", uncond=uncond, cfg=cfg)
    assert lat.shape == (3,) + tuple(z0.shape)
    # the latent for t is the inversion state the test-time procedure feeds to the UNet at t
    sched = inversion_scheduler(pipe.scheduler, cfg)
    z = z0
    with torch.no_grad():
        for t in sched.inversion_timesteps.tolist():
            if t == int(ts[0]):
                break
            z = sched.invert_step(pipe.unet(z, t, uncond), t, z)
    assert torch.equal(lat[0], z)
    g = torch.Generator().manual_seed(0)
    noisy = training_latents(pipe, z0, ts, mode="noise", generator=g)
    a = pipe.scheduler.alphas_cumprod[int(ts[1])]
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(noisy[1], a.sqrt() * z0 + (1 - a).sqrt() * noise, atol=1e-6)
    with pytest.raises(ValueError, match="not on the"):
        training_latents(pipe, z0, [123], cfg=cfg)
    assert math.isfinite(lat.abs().max().item())


# ---- helpers (other test files import them from here) -----------------------------------------------------


def tiny_heatmap_config(layers=(1, 2, 3)):
    """For tests with UNetConfig.tiny(): 10 steps, window t in [400, 700), three layers at latent/2."""
    return HeatmapConfig(num_steps=10, window=(400, 700), layers=layers, otsu=False)


def prompt_context(pipe, prompt, prompts=None):
    """(context (1, 77, D), token positions) of one prompt."""
    cond, positions = prompt_contexts(pipe, [prompt], prompts)
    return cond, positions[0]


def extract_heatmap(pipe, image, prompt, cfg=None, prompts=None, fast=True):
    """One image (C, H, W) or (1, C, H, W) and its prompt -> the (H, W) heatmap (see extract_heatmaps)."""
    x = image[None] if image.dim() == 3 else image
    assert x.shape[0] == 1
    return extract_heatmaps(pipe, x, [prompt], cfg, prompts, fast=fast)[0]
