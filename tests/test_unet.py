"""UNet2DConditionModel (ldm/unet.py): parity with diffusers and MONAI, sizes, config handling, layer layout.

Parity: random weights (every reference parameter perturbed, so zero-initialised convs and unit norms count too),
fp32, CPU, loaded with load_state_dict(strict=True); outputs within 1e-4 relative to the output scale.
"""
import pathlib
import json
import os

import pytest
import torch

from conftest import cmp, need
from ldm.unet import UNet2DConditionModel, UNetConfig
from ldm.weights.configs import unet_config_from_diffusers

KEYS = str(pathlib.Path(__file__).resolve().parent / "data" / "keys")  # reference key lists (tests/data/keys/README.md)


class Store:
    def __init__(self):
        self.maps = {}

    def wants(self, layer):
        return True

    def record(self, layer, probs):
        self.maps[layer.cross_index] = probs


def perturb(module):
    """Random weights everywhere: MONAI zero-initialises conv2/proj_out/conv_out, and norms start at 1 / 0."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def n_params(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel(cfg).parameters())


# ----------------------------------------------------------------------------------------------------------------
# sizes and layout
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, expected", [("sd15", 859_520_964), ("sd2", 865_910_724),
                                              ("monai_cxr", 263_636_995)])
def test_full_size_parameter_counts(preset, expected):
    assert n_params(getattr(UNetConfig, preset)()) == expected


@pytest.mark.parametrize("preset, latent, n_layers, mid", [("monai_cxr", 64, 11, 4), ("phantom", 32, 6, 2)])
def test_mid_and_first_decoder_layers_are_at_16x16(preset, latent, n_layers, mid):
    # MONAI: 4 down, 1 mid, 6 up; the paper's layers 4,5,6,7. Phantom: 2 down, 1 mid, 3 up; layers 2,3,4,5.
    cfg = getattr(UNetConfig, preset)()
    with torch.device("meta"):
        layers = UNet2DConditionModel(cfg).cross_attention_layers()
    assert len(layers) == n_layers
    assert [l.place for l in layers[mid:mid + 4]] == ["mid", "up", "up", "up"]
    assert [latent // l.downscale for l in layers[mid:mid + 4]] == [16] * 4
    assert [l.heads for l in layers] == [1] * n_layers  # one head, head width = channel width
    assert cfg.sample_size == latent


def test_phantom_maps_are_16x16_in_a_real_forward():
    cfg = UNetConfig.phantom()
    unet = UNet2DConditionModel(cfg).eval()
    store = Store()
    unet(torch.randn(1, 3, 32, 32), 500, torch.randn(1, 9, cfg.cross_attention_dim), store=store, stop_after=5)
    assert sorted(store.maps) == list(range(6))
    assert [store.maps[i].shape[2] for i in range(6)] == [16 * 16] * 6


def test_keys_match_diffusers_key_lists():
    for preset, fname in [("sd15", "unet_sd15.txt"), ("sd2", "unet_sd2.txt")]:
        path = os.path.join(KEYS, fname)
        ref = dict(line.split("\t") for line in open(path).read().splitlines() if line.strip())
        with torch.device("meta"):
            ours = {k: str(list(v.shape)) for k, v in UNet2DConditionModel(getattr(UNetConfig, preset)())
                    .state_dict().items()}
        assert ours == ref, f"{preset}: {sorted(set(ours) ^ set(ref))[:5]}"


@pytest.mark.parametrize("fname", ["gen_unet.txt", "monai14_unet.txt"])
def test_monai_cxr_keys_convert_to_ours(fname):
    convert_monai = pytest.importorskip("ldm.weights.monai")
    path = os.path.join(KEYS, fname)
    ref = dict(line.split("\t") for line in open(path).read().splitlines() if line.strip())
    renamed = convert_monai.monai_unet_to_ours(ref)
    with torch.device("meta"):
        ours = {k: str(list(v.shape)) for k, v in UNet2DConditionModel(UNetConfig.monai_cxr()).state_dict().items()}
    assert renamed == ours, f"{sorted(set(renamed) ^ set(ours))[:5]}"


# ----------------------------------------------------------------------------------------------------------------
# parity with diffusers
# ----------------------------------------------------------------------------------------------------------------
DIFFUSERS_CONFIGS = {
    # SD1 style: conv projections, `attention_head_dim` = head COUNT, attention at all but the last level
    "sd1_a": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2, cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=8),
    "sd1_b": dict(block_out_channels=(32, 64, 64), in_channels=3, out_channels=5,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  layers_per_block=1, cross_attention_dim=24, attention_head_dim=4, norm_num_groups=16),
    # SD2 style: linear projections, per-level head counts (width 16 here), upcast flag set
    "sd2_a": dict(block_out_channels=(32, 64, 64),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2,
                  cross_attention_dim=48, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                  upcast_attention=True, norm_num_groups=8),
    "sd2_b": dict(block_out_channels=(64, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                  cross_attention_dim=40, attention_head_dim=(4, 2), use_linear_projection=True, norm_num_groups=16,
                  flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
}


@pytest.mark.parametrize("name", sorted(DIFFUSERS_CONFIGS))
def test_parity_with_diffusers(name):
    need("diffusers")
    from diffusers import UNet2DConditionModel as RefUNet

    ref = perturb(RefUNet(sample_size=16, **DIFFUSERS_CONFIGS[name]))
    cfg = unet_config_from_diffusers(json.loads(json.dumps(dict(ref.config))))  # as read from config.json
    ours = UNet2DConditionModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    sample = torch.randn(2, cfg.in_channels, 16, 16)
    t = torch.tensor([3, 901])
    ctx = torch.randn(2, 7, cfg.cross_attention_dim)
    with torch.no_grad():
        want = ref(sample, t, ctx).sample
        assert cmp(f"{name} vs diffusers (fused)", ours(sample, t, ctx), want) <= 1e-4
        store = Store()
        got = ours(sample, t, ctx, store=store)  # every cross-attention layer on the explicit float32 path
        assert cmp(f"{name} vs diffusers (recorded)", got, want) <= 1e-4
    assert len(store.maps) == len(ours.cross_attention_layers()) > 0


# ----------------------------------------------------------------------------------------------------------------
# parity with MONAI (the paper's CXR UNet layout, tiny)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels, res_blocks", [((32, 64, 64), 2), ((32, 32, 64), 1)])
def test_parity_with_monai(channels, res_blocks):
    need("monai")
    from monai.networks.nets import DiffusionModelUNet

    from ldm.weights.monai import monai_unet_to_ours

    ref = perturb(DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=3, num_res_blocks=res_blocks,
                                     channels=channels, attention_levels=(False, True, True),
                                     num_head_channels=channels, norm_num_groups=16, with_conditioning=True,
                                     cross_attention_dim=24))
    cfg = UNetConfig.monai_cxr()
    cfg = UNetConfig.from_dict({**cfg.to_dict(), "block_out_channels": channels, "layers_per_block": res_blocks,
                                "cross_attention_dim": 24, "norm_num_groups": 16})
    ours = UNet2DConditionModel(cfg).eval()
    ours.load_state_dict(monai_unet_to_ours(ref.state_dict()), strict=True)
    sample, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([0, 999]), torch.randn(2, 5, 24)
    with torch.no_grad():
        want = ref(sample, t, ctx)
        assert cmp(f"MONAI {channels}x{res_blocks} (fused)", ours(sample, t, ctx), want) <= 1e-4
        got = ours(sample, t, ctx, store=Store())
        assert cmp(f"MONAI {channels}x{res_blocks} (recorded)", got, want) <= 1e-4


# ----------------------------------------------------------------------------------------------------------------
# config and inputs
# ----------------------------------------------------------------------------------------------------------------
def test_from_diffusers_config_reads_the_head_count_quirk():
    sd1 = {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
           "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2}
    assert unet_config_from_diffusers(sd1) == UNetConfig.sd15()
    sd2 = {**sd1, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True}
    assert unet_config_from_diffusers(sd2) == UNetConfig.sd2()
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_config_from_diffusers({**sd1, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="block types"):
        unet_config_from_diffusers({**sd1, "up_block_types": ["CrossAttnUpBlock2D"] * 4})


def test_config_dict_round_trip_and_bad_values():
    for preset in ("sd15", "sd2", "monai_cxr", "phantom", "tiny"):
        cfg = getattr(UNetConfig, preset)()
        assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # an earlier version wrote upcast_attention into model.yaml: ldm/weights/folder.py drops it (tests/test_convert.py)
    assert "upcast_attention" not in cfg.to_dict()
    with pytest.raises(ValueError, match="unknown keys.*'heads'"):
        UNetConfig.from_dict({"heads": 8})
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(block_out_channels=(30, 60), attention_levels=(True, True), num_attention_heads=(1, 1))
    with pytest.raises(ValueError, match="one entry per level"):
        UNetConfig(block_out_channels=(32, 64), attention_levels=(True,), num_attention_heads=(1, 1))


def test_timestep_forms_agree_and_bad_inputs_are_named():
    cfg = UNetConfig.tiny()
    unet = UNet2DConditionModel(cfg).eval()
    sample, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 3, cfg.cross_attention_dim)
    with torch.no_grad():
        a = unet(sample, 250, ctx)
        b = unet(sample, torch.tensor(250), ctx)
        c = unet(sample, torch.tensor([250, 250]), ctx)
        d = unet(sample, torch.tensor([250, 900]), ctx)
    assert torch.equal(a, b) and torch.equal(a, c) and a.shape == sample.shape
    torch.testing.assert_close(a[0], d[0], atol=1e-5, rtol=0)  # batch rows are independent
    assert not torch.allclose(a[1], d[1])  # the timestep matters
    with pytest.raises(ValueError, match="divisible by 2"):
        unet(torch.randn(1, 4, 15, 16), 1, ctx[:1])
    with pytest.raises(ValueError, match="cross_attention_dim"):
        unet(sample, 1, torch.randn(2, 3, 7))
