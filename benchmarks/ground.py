"""ground.py's work per image: seconds per image, and how close that is to the UNet-pass floor.

ground.py (grounding/experiment/grounder.py ground_batch) inverts each image batch ONCE following "" and, at each
recorded step, runs ONE conditional UNet call for every model and prompt variant (the frozen and the tuned rows, the
prompt and its left/right swap: V = 4 for PROMPT), stopped after the last recorded layer; every word's map, every
reading (frozen / untuned / tuned) and every layer / step of the viewer is then a slice of those maps. The floor is
the UNet work no implementation of this procedure can skip, each pass timed alone (per run, the median of n_uncond unconditional and n_cond conditional passes; runs
alternate with the measured ones; medians over --runs):

    floor = n_uncond * t(unconditional pass, batch B) + n_cond * t(conditional pass, batch V*B, cut after the last
            recorded layer, recording)
    n_uncond = inversion steps up to the window's last timestep, n_cond = timesteps in the window

ratio = measured / floor (goal <= 1.15). The profile splits the measured time (VAE encode, text encoder, the two
kinds of UNet pass inside the loop, the heatmaps of every unit x reading x prompt), so the rest is visible.
--outputs also times writing one image's files (ground_files.write_image_outputs: .npy, overlays, grid.png).

  python benchmarks/ground.py --size phantom --runs 3               # the committed phantom LDM and its tuned rows
  python benchmarks/ground.py --size monai --runs 2 --threads 2     # MONAI CXR size, random weights, 100 steps
  python benchmarks/ground.py --size monai --device cuda --batch 8 --runs 5
"""
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not benchmarks/ (no shadowing)
from benchmarks.common import base_parser, env_line, fmt_s, median, setup, time_once, write_json  # noqa: E402
from benchmarks.pipes import build_pipe, random_images  # noqa: E402

import torch  # noqa: E402

from ldm import load_pipeline  # noqa: E402
from grounding.attention_store import AttentionStore  # noqa: E402
from grounding.heatmap import TEST_WINDOW  # noqa: E402
from grounding.prompts import LearnablePrompts  # noqa: E402
from grounding.experiment.grounder import ground_batch, readings  # noqa: E402
from grounding.experiment.rows import load_rows  # noqa: E402
from grounding.experiment.swap import swap_sides  # noqa: E402
from grounding.experiment.words import prompt_words  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "small left pleural effusion"          # names one side: the swapped prompt runs too (V = 4)


def build(size, device):
    """(pipe, tuned rows, their heatmap settings or None)."""
    if size == "phantom":
        pipe = load_pipeline(str(ROOT / "assets" / "phantom_ldm"), device=device)
        rows = LearnablePrompts(pipe.tokenizer, pipe.text_encoder).to(device)
        load_rows(rows, str(ROOT / "assets" / "phantom_tuned_rows.safetensors"))
        return pipe, rows, rows.heatmap_settings
    pipe = build_pipe(size, device)
    rows = LearnablePrompts(pipe.tokenizer, pipe.text_encoder).to(device)
    with torch.no_grad():     # rows that differ from the frozen ones (their values do not change the time)
        rows.anatomy.mul_(1.1)
    return pipe, rows, None


@torch.no_grad()
def floor_passes(pipe, rows, images, cfg, layers):
    """(n_uncond, n_cond, V, the unconditional pass, the conditional pass) of one ground_batch call on `images`:
    the same inputs, shapes and stop_after as inside it, ready to be timed alone."""
    device = images.device
    sched = type(pipe.scheduler)(dataclasses.replace(pipe.scheduler.config, timestep_spacing=cfg.spacing))
    sched.set_timesteps(cfg.num_steps)
    schedule = sched.inversion_timesteps.tolist()
    window = [t for t in schedule if cfg.window[0] <= t < cfg.window[1]]
    B = images.shape[0]
    z = pipe.vae.encode(images) * pipe.scale_factor
    uncond = pipe.text_encoder(pipe.tokenizer([""]).to(device)).expand(B, -1, -1)
    texts, swapped = [PROMPT] * B, [swap_sides(PROMPT)] * B
    frozen = lambda t: pipe.text_encoder(pipe.tokenizer(t).to(device))   # noqa: E731
    cond = torch.cat([frozen(texts), rows.encode(texts), frozen(swapped), rows.encode(swapped)])
    V, t = cond.shape[0] // B, window[0]
    return (schedule.index(window[-1]), len(window), V,
            torch.no_grad()(lambda: pipe.unet(z, t, uncond)),
            torch.no_grad()(lambda: pipe.unet(z.repeat(V, 1, 1, 1), t, cond, store=AttentionStore(layers, None),
                                              stop_after=max(layers))))


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--size", choices=("phantom", "small", "monai", "sd15"), default="phantom")
    p.add_argument("--steps", type=int, default=None, help="DDIM inversion steps (default: the rows file's, else 100)")
    p.add_argument("--batch", type=int, default=1, help="images per ground_batch call")
    p.add_argument("--outputs", action="store_true", help="also time writing one image's files")
    args = p.parse_args(argv)
    device = setup(args)
    if args.dtype != "fp32":
        raise SystemExit("benchmarks/ground.py times ground.py's fp32 path only")
    pipe, rows, settings = build(args.size, device)
    settings = settings or {"num_steps": 100, "window": TEST_WINDOW, "layers": None}
    steps = args.steps or settings["num_steps"]
    reads = readings(pipe.family, steps, settings["window"], settings["layers"], tuned=True)
    layers = sorted({l for r in reads for l in r.cfg.resolved_layers()})
    images = random_images(pipe, args.batch, device)
    words = [prompt_words(pipe.tokenizer, PROMPT)] * args.batch
    print(env_line(device), f"| size {args.size} | {steps} steps, window {tuple(settings['window'])} | recorded layers "
          f"{layers} | batch {args.batch} | prompt {PROMPT!r} + swapped, frozen + tuned rows")

    n_uncond, n_cond, V, uncond_pass, cond_pass = floor_passes(pipe, rows, images, reads[0].cfg, layers)
    for _ in range(args.warmup):
        ground_batch(pipe, images, words, rows, reads)
        uncond_pass(), cond_pass()
    # measured and floor alternate run by run, so that a background load hits both alike
    timings, measured, t_uncond, t_cond = {}, [], [], []
    for _ in range(args.runs):
        measured.append(time_once(lambda: ground_batch(pipe, images, words, rows, reads, timings=timings), device)[0])
        t_uncond.append(median([time_once(uncond_pass, device)[0] for _ in range(n_uncond)]))
        t_cond.append(median([time_once(cond_pass, device)[0] for _ in range(n_cond)]))
    per_image = median(measured) / args.batch
    parts = {"n_uncond": n_uncond, "n_cond": n_cond, "V": V, "t_uncond_s": median(t_uncond), "t_cond_s": median(t_cond)}
    floor_s = n_uncond * parts["t_uncond_s"] + n_cond * parts["t_cond_s"]
    ratio = median(measured) / floor_s
    profile = {k: v / args.runs / args.batch for k, v in timings.items()}
    profile["other (Python, stacking)"] = sum(measured) / args.runs / args.batch - sum(profile.values())
    row = {"benchmark": "ground", "size": args.size, "device": args.device, "steps": steps, "batch": args.batch,
           "s_per_image": per_image, "floor_s_per_image": floor_s / args.batch, "ratio": ratio,
           "profile_s_per_image": profile, **parts}
    print(f"measured     : {fmt_s(per_image)} per image (median of {args.runs}, batch {args.batch})")
    print(f"UNet floor   : {fmt_s(floor_s / args.batch)} per image = {parts['n_uncond']} unconditional passes x "
          f"{fmt_s(parts['t_uncond_s'])} + {parts['n_cond']} conditional passes (batch {parts['V']} x {args.batch}, "
          f"cut after layer {max(layers)}) x {fmt_s(parts['t_cond_s'])}, per batch of {args.batch}")
    print(f"ratio        : {ratio:.3f} (goal <= 1.15)")
    print("profile      : " + ", ".join(f"{k} {fmt_s(v)}" for k, v in profile.items()))

    if args.outputs:   # one image's files, as ground.py writes them (the original is the model-size image here)
        from grounding.experiment.ground_files import write_image_outputs
        res = ground_batch(pipe, images[:1], words[:1], rows, reads)[0]
        grey = images[0, 0].float().cpu().numpy()
        grey = (grey - grey.min()) / max(float(grey.max() - grey.min()), 1e-6)
        image = {"grey": grey, "width": grey.shape[1], "height": grey.shape[0], "box": None}
        with tempfile.TemporaryDirectory() as tmp:
            secs = median([time_once(lambda: write_image_outputs(tmp, image, words[0], res, reads), device)[0]
                           for _ in range(max(1, args.runs))])
        row["outputs_s_per_image"] = secs
        print(f"outputs      : {fmt_s(secs)} per image (.npy + overlays of {sum(len(m) for m in res['maps'].values())} "
              f"maps, grid.png)")
    write_json(args.json, {"benchmark": "ground", "env": env_line(device), "rows": [row]})
    return row


if __name__ == "__main__":
    main()
