"""ldm/vae.py against diffusers AutoencoderKL and MONAI AutoencoderKL (random weights, tiny sizes, CPU).

Parity: weights are copied from the reference model (diffusers: load_state_dict(strict=True) as is; MONAI: through
ldm.convert_monai.monai_vae_to_ours), then encode mean / logvar, decode and the sampled forward are compared with `cmp`.
Full sizes are only counted, on the meta device.
"""
import pathlib

import torch
import pytest

from conftest import cmp, need
from ldm.vae import AutoencoderKL, VAEConfig
from ldm.weights.configs import vae_config_from_diffusers

KEYS = pathlib.Path(__file__).resolve().parent / "data" / "keys"  # reference key lists (tests/data/keys/README.md)

TOL = 1e-4  # max abs diff relative to the output scale (conftest.cmp)


def perturb_norms(model):
    """GroupNorms start at weight 1 / bias 0, which would hide a swapped norm1/norm2: make them all different."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def weights_from_file(path):
    """{key: shape} from a reference key list in tests/data/keys."""
    rows = [line.rstrip("\n").split("\t") for line in open(path) if line.strip()]
    return {k: [int(s) for s in shape.strip("[]").split(",")] for k, shape, *_ in rows}


# ---------------------------------------------------------------------------------------------------------------
# diffusers

DIFFUSERS_TINY = [
    # SD layout in miniature: RGB, 4 latents, 2 levels, 1 resnet per level, mid-block attention
    dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
         norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    # other channel counts, 3 levels (f = 4), 2 resnets per level, in != out channels
    dict(in_channels=1, out_channels=2, latent_channels=3, block_out_channels=(16, 32, 48), layers_per_block=2,
         norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
         scaling_factor=0.5),
    # mid block without attention (diffusers keeps the two mid resnets)
    dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
         norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
         mid_block_add_attention=False),
]


@pytest.mark.parametrize("kwargs", DIFFUSERS_TINY)
def test_diffusers_parity(kwargs):
    diffusers = need("diffusers")
    ref = perturb_norms(diffusers.AutoencoderKL(**kwargs)).eval()
    config = vae_config_from_diffusers(dict(ref.config))
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names, nothing renamed

    x = torch.randn(2, kwargs["in_channels"], 32, 32)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode_dist(x)
        f = 2 ** (len(kwargs["block_out_channels"]) - 1)
        assert mean.shape == (2, kwargs["latent_channels"], 32 // f, 32 // f)
        assert cmp("encode mean", mean, dist.mean) < TOL
        assert cmp("encode logvar", logvar, dist.logvar) < TOL
        assert torch.equal(ours.encode(x), mean)

        z = torch.randn_like(mean)
        assert cmp("decode", ours.decode(z), ref.decode(z).sample) < TOL

        # forward with a sampled posterior draws the same noise from the same generator
        ref_out = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
        out, _, _ = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(7))
        assert cmp("forward (sampled)", out, ref_out) < TOL
        mean_out, _, _ = ours(x)
        assert not torch.allclose(out, mean_out)  # the sample really differs from the mean path


def test_sd_full_size_on_meta():
    diffusers = need("diffusers")
    # the SD 1.5 vae/config.json
    sd_json = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                   layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=512,
                   down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                   _class_name="AutoencoderKL", _diffusers_version="0.6.0")
    assert vae_config_from_diffusers(sd_json) == VAEConfig.sd()
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig.sd())
        ref = diffusers.AutoencoderKL(**{k: v for k, v in sd_json.items() if not k.startswith("_")})
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters()) == 83_653_863
    # every key and shape equals the real SD 1.5 VAE's list
    expected = weights_from_file(str(KEYS / "vae_sd15.txt"))
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == expected


# ---------------------------------------------------------------------------------------------------------------
# MONAI

MONAI_TINY = [
    # the CXR structure: no attention anywhere, no mid block, 1 channel, 3 latents; this is VAEConfig.tiny()
    dict(channels=(32, 64), num_res_blocks=1, norm_num_groups=8, attn=False),
    dict(channels=(16, 32, 32), num_res_blocks=2, norm_num_groups=8, attn=False),
    # MONAI with non-local attention = our mid block (resnet, attention, resnet), still split quant convs
    dict(channels=(16, 32), num_res_blocks=1, norm_num_groups=8, attn=True),
]


def monai_model(channels, num_res_blocks, norm_num_groups, attn):
    monai = need("monai")
    return monai.networks.nets.AutoencoderKL(
        spatial_dims=2, in_channels=1, out_channels=1, channels=channels, num_res_blocks=num_res_blocks,
        attention_levels=(False,) * len(channels), latent_channels=3, norm_num_groups=norm_num_groups,
        with_encoder_nonlocal_attn=attn, with_decoder_nonlocal_attn=attn)


def our_monai_config(channels, num_res_blocks, norm_num_groups, attn):
    return VAEConfig(in_channels=1, out_channels=1, latent_channels=3, block_out_channels=list(channels),
                     layers_per_block=num_res_blocks, decoder_layers_per_block=num_res_blocks,
                     norm_num_groups=norm_num_groups, mid_block=attn, mid_block_attention=attn, quant="split",
                     silu_before_conv_out=False)


@pytest.mark.parametrize("naming", ["monai>=1.4", "GenerativeModels"])
@pytest.mark.parametrize("kwargs", MONAI_TINY)
def test_monai_parity(kwargs, naming):
    from ldm.weights.monai import monai_vae_to_ours

    ref = perturb_norms(monai_model(**kwargs)).eval()
    state = ref.state_dict()
    if naming == "GenerativeModels":  # the old names: upsampler `conv` instead of `postconv`
        assert any(".postconv." in k for k in state)
        state = {k.replace(".postconv.", ".conv."): v for k, v in state.items()}
    ours = AutoencoderKL(our_monai_config(**kwargs)).eval()
    ours.load_state_dict(monai_vae_to_ours(state), strict=True)

    x = torch.rand(2, 1, 32, 32)  # CXR range [0, 1]
    with torch.no_grad():
        z_mu, z_sigma = ref.encode(x)  # MONAI returns (mean, sigma), sigma = exp(logvar / 2)
        mean, logvar = ours.encode_dist(x)
        assert cmp("encode mean", mean, z_mu) < TOL
        assert cmp("encode sigma", torch.exp(0.5 * logvar), z_sigma) < TOL
        z = torch.randn_like(mean)
        assert cmp("decode", ours.decode(z), ref.decode(z)) < TOL
        assert cmp("reconstruct", ours(x)[0], ref.reconstruct(x)) < TOL


def test_tiny_is_the_first_monai_config():
    assert VAEConfig.tiny() == our_monai_config(**MONAI_TINY[0])
    vae = AutoencoderKL(VAEConfig.tiny())
    assert vae.encode(torch.rand(1, 1, 64, 64)).shape == (1, 3, 32, 32)  # ONE downsampling
    assert vae.decode(torch.randn(1, 3, 32, 32)).shape == (1, 1, 64, 64)


def test_monai_cxr_full_size_on_meta():
    from ldm.weights.monai import monai_vae_to_ours

    need("monai")
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig.monai_cxr())
        ref = monai_model(channels=(64, 128, 128, 128), num_res_blocks=2, norm_num_groups=32, attn=False)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 4_607_848
    # the checkpoint's key list (GenerativeModels names, as the released autoencoder.pth) maps onto our keys
    for keys in ("gen_aekl.txt", "monai14_aekl.txt"):
        expected = weights_from_file(str(KEYS / keys))
        renamed = monai_vae_to_ours({k: torch.empty(shape, device="meta") for k, shape in expected.items()})
        assert {k: list(v.shape) for k, v in renamed.items()} == {k: list(v.shape) for k, v in ours.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# config and bad input

def test_config_round_trip_and_presets():
    for config in (VAEConfig.sd(), VAEConfig.monai_cxr(), VAEConfig.tiny()):
        assert VAEConfig.from_dict(config.to_dict()) == config
    assert VAEConfig.sd().decoder_layers_per_block == 3 and VAEConfig.monai_cxr().decoder_layers_per_block == 2
    # the latent scale is the pipeline's; an older model.yaml's vae.scale_factor is dropped by ldm/weights/folder.py
    assert "scale_factor" not in VAEConfig.sd().to_dict()


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown keys.*'latent'"):
        VAEConfig.from_dict({"latent": 4})
    with pytest.raises(ValueError, match="quant"):
        VAEConfig(quant="both")
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        VAEConfig(block_out_channels=[48, 64])
    with pytest.raises(ValueError, match="shift_factor"):
        vae_config_from_diffusers({"block_out_channels": [64], "shift_factor": 0.1159})
    with pytest.raises(ValueError, match="down_block_types"):
        vae_config_from_diffusers({"down_block_types": ["DownBlock2D"]})
    vae = AutoencoderKL(VAEConfig.tiny())
    with pytest.raises(ValueError, match=r"expects \(B, 1, H, W\), got shape \(1, 3, 64, 64\)"):
        vae.encode(torch.rand(1, 3, 64, 64))  # an RGB image into the grey VAE
    with pytest.raises(ValueError, match="divisible by 2"):
        vae.encode(torch.rand(1, 1, 63, 64))
    with pytest.raises(ValueError, match=r"decode expects \(B, 3, H, W\)"):
        vae.decode(torch.randn(1, 4, 32, 32))
