"""One prompt-tuning step: ours vs a naive full forward / backward, and the gradients on the learned rows.

Ours (train.py's step, grounding/tuning.py `tuning_loss`): the 30 training timesteps in ONE batched UNet call, the store keeps only the chosen layers'
prompt-token columns with their graph (keep_grad), the forward stops right after the last chosen layer
(stop_after=7 for the MONAI layout; the layers are grounding/heatmap.py's tuned preset), and the frozen parts (UNet, text encoder) have requires_grad=False, so
backward computes no weight gradients. Naive: the same batch through the WHOLE UNet, every cross-attention layer
recorded with all 77 columns, and the frozen parts still requiring grad (their weight gradients are computed and
thrown away). Same loss (grounding/losses.py grounding_loss), same inputs; the gradients of the anatomy rows
must agree.

  python benchmarks/tuning_step.py --size small --runs 3
  python benchmarks/tuning_step.py --size monai --device cuda --dtype bf16 --runs 10
"""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not benchmarks/ (no shadowing)
from benchmarks.common import (alternate, autocast, base_parser, env_line, fmt_mb, fmt_s,  # noqa: E402
                               measure_call_memory, median, setup, write_json)
from benchmarks.pipes import build_pipe  # noqa: E402

import torch  # noqa: E402

from grounding.anatomy import FRAME, render_gaussians  # noqa: E402
from grounding.attention_store import AttentionStore  # noqa: E402
from grounding.heatmap import HeatmapConfig, TRAIN_WINDOW, inversion_scheduler, window_timesteps  # noqa: E402
from grounding.losses import grounding_loss  # noqa: E402
from grounding.prompts import LearnablePrompts  # noqa: E402
from grounding.tuning import tuning_loss  # noqa: E402

PROMPT = "left lower atelectasis and right pleural effusion"


# one anatomy-like Gaussian (mu_x, mu_y, sigma_x, sigma_y) in LUT frame pixels: the role of the jittered LUT
# Gaussian in train.py
GAUSSIANS = [(0.65 * FRAME, 0.6 * FRAME, 0.12 * FRAME, 0.12 * FRAME)]


class Step:
    """Holds the inputs; `ours()` and `naive()` each run one step and return the anatomy-row gradient."""

    def __init__(self, pipe, n_timesteps, layers, device, amp):
        self.pipe, self.layers, self.amp = pipe, tuple(layers), amp
        self.prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder).to(device)
        self.positions = self.prompts.token_positions(PROMPT)
        sched = inversion_scheduler(pipe.scheduler, HeatmapConfig(window=TRAIN_WINDOW))
        ts = window_timesteps(sched, *TRAIN_WINDOW)[:n_timesteps]
        self.ts = ts.to(device)
        c, side = pipe.unet.config.in_channels, pipe.image["size"] // pipe.vae.downscale_factor
        g = torch.Generator().manual_seed(2)
        self.z = torch.randn(len(ts), 1, c, side, side, generator=g).to(device)   # (T, 1, C, h, w) noisy latents

    def _grad(self):
        g = self.prompts.anatomy.grad.detach().clone()
        self.prompts.anatomy.grad = None
        return g

    def ours(self):
        with self.amp():
            loss, _ = tuning_loss(self.pipe, self.prompts, PROMPT, self.z, self.ts, self.layers, GAUSSIANS)
        loss.backward()
        return self._grad()

    def naive(self):
        T, unet, te = len(self.ts), self.pipe.unet, self.pipe.text_encoder
        unet.requires_grad_(True)
        te.requires_grad_(True)                                           # "frozen" but still tracked
        try:
            with self.amp():
                context = self.prompts.encode([PROMPT])
                store = AttentionStore(None, None, keep_grad=True)        # every layer, all 77 columns
                unet(self.z[:, 0], self.ts, context.expand(T, -1, -1), store=store)   # the whole UNet
                idx = torch.tensor(self.positions, device=self.z.device)
                maps = torch.stack([store.records[(0, l)][..., idx] for l in self.layers])  # (L, T, N, S)
                maps = maps[:, :, None].transpose(0, 1)                   # (T, L, 1, N, S)
                side = int(maps.shape[-2] ** 0.5)
                G = render_gaussians(GAUSSIANS, side)[None].to(maps.device)   # the same target as tuning_loss
                loss = grounding_loss(maps, G)[0]
            loss.backward()
        finally:
            unet.requires_grad_(False)
            te.requires_grad_(False)
            unet.zero_grad(set_to_none=True)
            te.zero_grad(set_to_none=True)
        return self._grad()


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--size", choices=("small", "monai", "sd15"), default="small")
    p.add_argument("--timesteps", type=int, default=30, help="timesteps batched per step (paper: 30)")
    p.add_argument("--skip-naive", action="store_true", help="time ours only (throughput runs on a GPU)")
    args = p.parse_args(argv)
    device = setup(args)
    pipe = build_pipe(args.size, device)
    if args.compile:
        pipe.unet = torch.compile(pipe.unet)
    layers = HeatmapConfig(family=pipe.family).resolved_layers()   # the tuning preset (MONAI: 4..7)
    step = Step(pipe, args.timesteps, layers, device, lambda: autocast(args))
    print(env_line(device), f"| size {args.size} | dtype {args.dtype} | {len(step.ts)} timesteps batched | "
          f"layers {layers} | stop_after={max(layers)}")

    g_ours = step.ours()
    row = {"benchmark": "tuning_step", "size": args.size, "dtype": args.dtype, "timesteps": len(step.ts)}
    fns = {"ours": step.ours}
    if not args.skip_naive:
        g_naive = step.naive()
        scale = g_naive.abs().max().item()
        row["grad_max_abs_diff"] = (g_ours - g_naive).abs().max().item()
        row["grad_rel_diff"] = row["grad_max_abs_diff"] / max(scale, 1e-30)
        row["grad_nonzero_rows"] = int((g_ours.abs().sum(-1) > 0).sum())
        fns["naive"] = step.naive
    times = alternate(fns, args.runs, args.warmup, device)
    row["ours_s"] = median(times["ours"])
    row["steps_per_s"] = 1.0 / row["ours_s"]
    if not args.skip_naive:
        row["naive_s"] = median(times["naive"])
        row["speedup"] = row["naive_s"] / row["ours_s"]
    if args.device == "cuda":
        row.update({f"{k}_peak_mem": measure_call_memory(f, device)[0] for k, f in fns.items()})

    print(f"ours : {fmt_s(row['ours_s'])} per step ({row['steps_per_s']:.2f} steps/s)")
    if not args.skip_naive:
        print(f"naive: {fmt_s(row['naive_s'])} per step | speed-up {row['speedup']:.2f}x (goal >= 1.5x)")
        print(f"anatomy-row gradients: max |ours - naive| {row['grad_max_abs_diff']:.2e} "
              f"(relative {row['grad_rel_diff']:.2e}); {row['grad_nonzero_rows']} of "
              f"{step.prompts.anatomy.shape[0]} rows get a gradient")
    if "ours_peak_mem" in row:
        print("CUDA peak memory per step: " + ", ".join(f"{k} {fmt_mb(row[f'{k}_peak_mem'])}" for k in fns))
    write_json(args.json, {"benchmark": "tuning_step", "env": env_line(device), "rows": [row]})
    return row


if __name__ == "__main__":
    main()
