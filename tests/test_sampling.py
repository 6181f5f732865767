"""ldm/sampling.py: classifier-free guidance and the DDIM loop, checked against a hand-written loop."""
import pytest
import torch

from ldm.sampling import grid, latent_shape, sample, to_pil
from test_heatmap import tiny_pipe as _tiny_pipe


def tiny_pipe():
    pipe = _tiny_pipe()
    pipe.image = {"channels": 1, "size": 32, "range": [0.0, 1.0]}
    return pipe


def hand_loop(pipe, prompt, steps, guidance, seed):
    """DDIM with classifier-free guidance written out with separate UNet calls per branch."""
    z = torch.randn(latent_shape(pipe, 1), generator=torch.Generator().manual_seed(seed))
    cond = pipe.text_encoder(pipe.tokenizer([prompt]))
    uncond = pipe.text_encoder(pipe.tokenizer([""]))
    pipe.scheduler.set_timesteps(steps)
    for t in pipe.scheduler.timesteps.tolist():
        u, c = pipe.unet(z, t, uncond), pipe.unet(z, t, cond)
        z = pipe.scheduler.step(u + guidance * (c - u), t, z)
    return pipe.vae.decode(z / pipe.scale_factor)


@torch.no_grad()
def test_sampling_equals_a_hand_written_guided_ddim_loop():
    pipe = tiny_pipe()
    for guidance in (1.0, 4.0):
        ours = sample(pipe, ["left lower atelectasis"], num_steps=5, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(3))
        ref = hand_loop(pipe, "left lower atelectasis", 5, guidance, 3)
        diff = (ours - ref).abs().max().item()
        print(f"guidance {guidance}: max diff {diff:.2e}")
        assert diff < 1e-4
    # guidance changes the image (the prompt matters), and the seed is honoured
    a = sample(pipe, ["right apical pneumothorax"], num_steps=5, guidance_scale=1.0, generator=torch.Generator().manual_seed(3))
    b = sample(pipe, ["right apical pneumothorax"], num_steps=5, guidance_scale=6.0, generator=torch.Generator().manual_seed(3))
    assert (a - b).abs().max() > 1e-4


def test_to_pil_and_grid_shapes():
    imgs = to_pil(torch.rand(3, 1, 8, 8), (0.0, 1.0))
    assert [im.mode for im in imgs] == ["L"] * 3
    g = grid(imgs, cols=2)
    assert g.size == (16, 16)


@pytest.mark.parametrize("args, message", [(["--n", "0"], "--n must be >= 1"), (["--steps", "0"], "--steps must be"),
                                           (["--guidance", "nan"], "--guidance must be a finite"),
                                           (["--out", "/nonexistent/x.png"], "an existing folder")])
def test_sample_checks_its_arguments_before_loading(args, message, capsys):
    import sample
    with pytest.raises(SystemExit):
        sample.main(["--weights", "/nonexistent-weights", "--prompt", "x", *args])
    assert message in capsys.readouterr().err


@torch.no_grad()
def test_an_overflowing_guidance_is_an_error_not_a_black_picture():
    with pytest.raises(ValueError, match=r"NaN or inf.*guidance_scale 1e\+30.*--guidance"):
        sample(tiny_pipe(), ["left effusion"], num_steps=3, guidance_scale=1e30, generator=torch.Generator().manual_seed(0))
