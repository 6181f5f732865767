"""Phrase-grounding heatmap per image: our fast path vs the straightforward procedure.

Fast path (grounding/heatmap.py extract_heatmaps -> record_fast):
the inversion stops at the last recorded step, the conditional pass runs only at the recorded steps and stops
right after the last recorded layer, and the store keeps only the prompt's token columns of the chosen layers.

Straightforward procedure (grounding/heatmap.py record_straightforward, the procedure as described): the full
100-step DDIM inversion with a conditional AND an unconditional UNet pass at every step, every cross-attention
layer recorded with all 77 token columns; the window's steps, the preset layers and the prompt's columns are
selected afterwards. Both then go through the same heatmap_from_maps.

Prints: max |heatmap_fast - heatmap_straightforward| (goal <= 1e-5), the median time per image and the ratio
(goal >= 2.5x), and the recorded-map memory (numbers held by each store: selected steps x layers x pixels x
prompt tokens vs all steps x all layers x pixels x 77).

  python benchmarks/heatmap.py --size small --runs 3                  # seconds, CPU
  python benchmarks/heatmap.py --size monai --device cuda --dtype bf16 --runs 5
"""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not benchmarks/ (no shadowing)
from benchmarks.common import (alternate, autocast, base_parser, env_line, fmt_s, measure_call_memory,  # noqa: E402
                               median, setup, write_json, fmt_mb)
from benchmarks.pipes import PROMPT, build_pipe, random_images  # noqa: E402

import torch  # noqa: E402

from grounding.attention_store import AttentionStore  # noqa: E402
from grounding.heatmap import extract_heatmaps, prompt_contexts  # noqa: E402
from grounding.heatmap import HeatmapConfig, heatmap_from_maps, record_fast, record_straightforward  # noqa: E402


@torch.no_grad()
def _inputs(pipe, images, prompts):
    """Scaled latents, prompt contexts with their token columns, and the "" context (as extract_heatmaps)."""
    device = pipe.unet.conv_in.weight.device
    z0 = pipe.vae.encode(images.to(device)) * pipe.scale_factor
    cond, positions = prompt_contexts(pipe, prompts)                      # (B, 77, D), per-item token columns
    uncond = pipe.text_encoder(pipe.tokenizer([""]).to(device))
    return z0, cond, positions, uncond


@torch.no_grad()
def straightforward(pipe, images, prompts, cfg):
    """The procedure as described (grounding/heatmap.py record_straightforward), then the same heatmap_from_maps.

    Returns ((B, S, S) heatmaps, numbers held by its full store)."""
    z0, cond, positions, uncond = _inputs(pipe, images, prompts)
    store = AttentionStore(cfg.resolved_layers(), positions)
    _, full = record_straightforward(pipe, z0, cond, uncond, store, cfg)
    return heatmap_from_maps(store, tuple(images.shape[-2:]), cfg).float().cpu(), full.numel()


@torch.no_grad()
def fast_store_numel(pipe, images, prompts, cfg):
    """Numbers held by the fast path's store for the same inputs (grounding/heatmap.py record_fast)."""
    z0, cond, positions, uncond = _inputs(pipe, images, prompts)
    store = AttentionStore(cfg.resolved_layers(), positions)
    record_fast(pipe, z0, cond, uncond, store, cfg)
    steps = {t for t, _ in store.keys()}
    return store.numel(), len(steps), len(store.layers), store.maps().shape


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--size", choices=("small", "monai", "sd15"), default="small")
    p.add_argument("--steps", type=int, default=100, help="DDIM inversion steps (paper: 100)")
    p.add_argument("--batch", type=int, default=1, help="images per call (both procedures batch the same way)")
    p.add_argument("--skip-straightforward", action="store_true",
                   help="time the fast path only (throughput runs on a GPU)")
    args = p.parse_args(argv)
    device = setup(args)
    pipe = build_pipe(args.size, device)
    if args.compile:
        pipe.unet = torch.compile(pipe.unet)
    cfg = HeatmapConfig(num_steps=args.steps, family=pipe.family)
    n = (args.runs + args.warmup) * args.batch
    images = random_images(pipe, n + args.batch, device)
    prompts = [PROMPT] * args.batch
    print(env_line(device), f"| size {args.size} | dtype {args.dtype} | {args.steps} steps | window {cfg.window} "
          f"| layers {cfg.resolved_layers()} | batch {args.batch}")

    # equality first (the same images for both)
    x0 = images[:args.batch]
    with autocast(args):
        h_fast = extract_heatmaps(pipe, x0, prompts, cfg)
        if not args.skip_straightforward:
            h_slow, slow_numel = straightforward(pipe, x0, prompts, cfg)
        fast_numel, T, L, shape = fast_store_numel(pipe, x0, prompts, cfg)
    diff = (h_fast - h_slow).abs().max().item() if not args.skip_straightforward else float("nan")

    it = {"fast": 0, "slow": 0}

    def run(which):
        def fn():
            k = it[which] % (n // args.batch)
            it[which] += 1
            x = images[k * args.batch:(k + 1) * args.batch]
            with autocast(args):
                return extract_heatmaps(pipe, x, prompts, cfg) if which == "fast" else straightforward(pipe, x, prompts, cfg)
        return fn

    fns = {"fast": run("fast")} if args.skip_straightforward else {"fast": run("fast"), "slow": run("slow")}
    times = alternate(fns, args.runs, args.warmup, device)
    row = {"benchmark": "heatmap", "size": args.size, "dtype": args.dtype, "steps": args.steps, "batch": args.batch,
           "fast_s_per_image": median(times["fast"]) / args.batch, "max_abs_diff": diff,
           "fast_store_numel": fast_numel, "recorded_steps": T, "recorded_layers": L,
           "fast_maps_shape": list(shape)}
    row["images_per_s"] = 1.0 / row["fast_s_per_image"]
    if not args.skip_straightforward:
        row.update(slow_s_per_image=median(times["slow"]) / args.batch, slow_store_numel=slow_numel)
        row["speedup"] = row["slow_s_per_image"] / row["fast_s_per_image"]
        row["memory_ratio"] = slow_numel / fast_numel
    if args.device == "cuda":
        row["fast_peak_mem"] = measure_call_memory(run("fast"), device)[0]
        if not args.skip_straightforward:
            row["slow_peak_mem"] = measure_call_memory(run("slow"), device)[0]

    print(f"fast path         : {fmt_s(row['fast_s_per_image'])} per image ({row['images_per_s']:.2f} images/s); "
          f"store holds {fast_numel:,} numbers = {T} steps x {L} layers x B x N x S, maps {list(shape)}")
    if not args.skip_straightforward:
        print(f"straightforward   : {fmt_s(row['slow_s_per_image'])} per image; store holds {slow_numel:,} numbers "
              f"(all {args.steps} steps x every layer x N x 77)")
        print(f"speed-up {row['speedup']:.2f}x (goal >= 2.5x) | recorded-map memory ratio {row['memory_ratio']:.0f}x | "
              f"max |heatmap diff| {diff:.2e} (goal <= 1e-5)")
    if "fast_peak_mem" in row:
        print(f"CUDA peak memory per call: fast {fmt_mb(row['fast_peak_mem'])}"
              + (f", straightforward {fmt_mb(row['slow_peak_mem'])}" if "slow_peak_mem" in row else ""))
    write_json(args.json, {"benchmark": "heatmap", "env": env_line(device), "rows": [row]})
    return row


if __name__ == "__main__":
    main()
