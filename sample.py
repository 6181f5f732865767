"""Text-to-image DDIM sampling from a converted model (a sanity check of weights, and pictures for the README).

    python sample.py --weights assets/phantom_ldm --prompt "left lower atelectasis" --n 4 --out samples.png
    python sample.py --weights weights/roentgen --prompt "big right-sided pleural effusion" --steps 50 --guidance 4
"""
import argparse
import math
import os
import sys

import torch

from ldm import load_pipeline
from ldm.sampling import grid, sample, to_pil


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="converted model folder (convert_weights.py or assets/phantom_ldm)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat the flag for several)")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="samples.png", help="PNG grid: one row per prompt")
    args = p.parse_args(argv)
    # checked before the model loads: a bad value must not cost a sampling run
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if not 1 <= args.steps <= 1000:
        p.error(f"--steps must be in [1, 1000] (the training schedule's length), got {args.steps}")
    if not math.isfinite(args.guidance):
        p.error(f"--guidance must be a finite number, got {args.guidance}")
    if not args.out.lower().endswith((".png", ".jpg", ".jpeg")) or not os.path.isdir(os.path.dirname(args.out) or "."):
        p.error(f"--out {args.out}: a .png or .jpg path in an existing folder")
    pipe = load_pipeline(args.weights, device=args.device)
    prompts = [q for q in args.prompt for _ in range(args.n)]
    images = sample(pipe, prompts, num_steps=args.steps, guidance_scale=args.guidance,
                    generator=torch.Generator().manual_seed(args.seed))
    grid(to_pil(images, pipe.image["range"]), cols=args.n).save(args.out)
    print(f"{len(prompts)} samples from {args.weights} (family {pipe.family}) -> {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input (a broken weights folder): its message, no traceback
        sys.exit(f"sample.py: error: {e}")
