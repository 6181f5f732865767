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


# ---------------------------------------------------------------------------------------------------------
# sampling with the learned rows (sample.py --prompts)

import os  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHANTOM = os.path.join(REPO, "assets", "phantom_ldm")


def moved_rows(pipe, scale=-1.0):
    """LearnablePrompts of `pipe` whose anatomy rows were moved (as tuning would), not the frozen ones."""
    from grounding.prompts import LearnablePrompts
    prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder)
    with torch.no_grad():
        prompts.anatomy.mul_(scale)
    return prompts


@torch.no_grad()
def test_given_latents_replace_the_generators_draw():
    pipe = tiny_pipe()
    z = torch.randn(latent_shape(pipe, 2), generator=torch.Generator().manual_seed(5))
    a = sample(pipe, ["cardiomegaly", "left pleural effusion"], num_steps=3, generator=torch.Generator().manual_seed(5))
    b = sample(pipe, ["cardiomegaly", "left pleural effusion"], num_steps=3, latents=z)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"latents of shape \(1, 3, 16, 16\), expected \(2, 3, 16, 16\)"):
        sample(pipe, ["cardiomegaly", "left pleural effusion"], num_steps=3, latents=z[:1])


@torch.no_grad()
def test_learned_rows_reach_the_unet_and_only_they_differ():
    import sample as script
    pipe = tiny_pipe()
    learned = moved_rows(pipe)
    texts, seeds = ["left pleural effusion", "pneumothorax"], [0, 1]   # "pneumothorax": no anatomy token
    seen = []   # the conditional half of every UNet call's context
    hook = pipe.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[2].chunk(2)[1].clone()))
    try:
        frozen = script.generate(pipe, texts, seeds, None, steps=2)
        tuned = script.generate(pipe, texts, seeds, learned, steps=2)
    finally:
        hook.remove()
    batch = [t for t in texts for _ in seeds]
    plain = pipe.text_encoder(pipe.tokenizer(batch))
    assert torch.equal(seen[0], plain) and torch.equal(seen[-1], learned.encode(batch))
    assert not torch.allclose(seen[-1][:2], plain[:2])          # "left ..." holds learned rows
    # the same seed's noise in every row and model: a prompt without a location word draws the same image
    assert torch.allclose(frozen[1], tuned[1], atol=1e-6)
    assert (frozen[0] - tuned[0]).abs().max() > 1e-3
    assert not torch.equal(frozen[0][0], frozen[0][1])            # seeds 0 and 1 differ


def test_prompts_naming_one_side_get_their_swapped_twin():
    import sample as script
    texts = ["left pneumothorax", "cardiomegaly", "right pneumothorax", "Left base effusion"]
    assert script.with_swapped_sides(texts) == ["left pneumothorax", "right pneumothorax", "cardiomegaly",
                                                "Left base effusion", "Right base effusion"]


def test_the_grid_puts_each_tile_under_its_group_and_seed_beside_its_prompt():
    import sample as script
    from PIL import Image
    texts, seeds = ["left pneumothorax", "right pneumothorax"], [7, 8, 9]
    # every tile a distinct grey: (group, row, col) -> 10 + 40 g + 12 r + 3 c
    value = lambda g, r, c: 10 + 40 * g + 12 * r + 3 * c
    groups = {name: [[Image.new("L", (64, 64), value(g, r, c)) for c in range(3)] for r in range(2)]
              for g, name in enumerate(["frozen", "tuned: rows.safetensors"])}
    picture, where = script.labelled_grid(groups, texts, seeds, "GENERATED by x (phantom) - SYNTHETIC")
    assert len(where) == 12
    for (name, r, c), (x, y) in where.items():
        g = ["frozen", "tuned: rows.safetensors"].index(name)
        # the tile is drawn at 2x (64 -> 128) where the layout says
        assert picture.getpixel((x + 64, y + 64)) == (value(g, r, c),) * 3
        assert picture.getpixel((x + 127, y + 127)) == (value(g, r, c),) * 3
    xs = sorted({x for x, _ in where.values()})
    ys = sorted({y for _, y in where.values()})
    assert len(xs) == 6 and len(ys) == 2 and where[("tuned: rows.safetensors", 0, 0)][0] > where[("frozen", 0, 2)][0]
    # labels: each prompt left of its row, the group names and seeds above the tiles, the title on top
    ink = lambda box: picture.crop(box).convert("L").getextrema()[1] > 0
    for r in range(2):
        assert ink((0, ys[r], xs[0] - 1, ys[r] + 128))
    assert ink((xs[0], 14, xs[0] + 100, ys[0] - 1)) and ink((xs[3], 14, xs[3] + 100, ys[0] - 1))
    assert ink((0, 0, picture.width, 14))
    # nothing else: a blank strip between the label column and the first tile
    assert not ink((xs[0] - 3, ys[0], xs[0] - 1, ys[1] + 128))


def test_sample_py_draws_frozen_vs_tuned_under_runs_samples(tmp_path, monkeypatch, capsys):
    import sample as script
    from PIL import Image
    from ldm import load_pipeline
    from grounding.experiment.rows import save_rows
    save_rows(moved_rows(load_pipeline(PHANTOM)), str(tmp_path / "rows.safetensors"))
    monkeypatch.chdir(tmp_path)
    script.main(["--weights", PHANTOM, "--prompt", "left pneumothorax", "--prompts", "rows.safetensors",
                 "--n", "2", "--steps", "2"])
    out = tmp_path / "runs" / "samples" / "left_pneumothorax_frozen_vs_tuned.png"
    assert "8 samples" in capsys.readouterr().out and out.is_file()
    # 2 prompts ("left ...", "right ...") x 2 groups x 2 seeds of 128 px tiles, plus labels
    w, h = Image.open(out).size
    assert h == 44 + 2 * (128 + 4) and w > 2 * 2 * 128


def test_sample_py_names_bad_learned_rows(tmp_path, capsys):
    import sample as script
    from grounding.experiment.rows import save_rows
    with pytest.raises(SystemExit):
        script.main(["--weights", "/nonexistent-weights", "--prompt", "x", "--prompts"])
    assert "argument --prompts: expected one argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # refused before the model loads
        script.main(["--weights", "/nonexistent-weights", "--prompt", "x",
                     "--prompts", str(tmp_path / "no.safetensors")])
    assert "no.safetensors: no such file; give the learned rows train.py wrote" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # the run folder instead of its rows file
        script.main(["--weights", "/nonexistent-weights", "--prompt", "x", "--prompts", str(tmp_path)])
    assert "a folder; give the learned rows train.py wrote" in capsys.readouterr().err
    # rows learned with another text encoder (the tiny test model's) are refused, the file named
    other = str(tmp_path / "other.safetensors")
    save_rows(moved_rows(tiny_pipe()), other)
    with pytest.raises(ValueError, match=f"{other} was learned with another vocabulary size"):
        script.main(["--weights", PHANTOM, "--prompt", "left pneumothorax", "--prompts", other, "--steps", "1"])
