"""The README figure: held-out phantom pairs with their box and the frozen, tuned and swapped-prompt heatmaps.

Each row: the image with its box, the frozen and the tuned heatmap, the tuned heatmap of the left/right-swapped
prompt; plus an LDM sample.

    python scripts/figure.py --prompts runs/tune/learned_rows.safetensors --out docs/grounding.png

Columns: the image with the ground-truth box (green) | frozen LDM heatmap (paper's baseline: its layers + Otsu) |
tuned prompts heatmap | tuned heatmap of the same prompt with "left" and "right" exchanged (the location-swap test,
grounding/experiment/swap.py; blank for prompts that name no single side) | a sample the LDM draws for the prompt (DDIM 50
steps, guidance 4). The heatmaps use the run's own settings (layers, DDIM steps) as its final table does.
SYNTHETIC data.
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm import load_pipeline  # noqa: E402
from ldm.sampling import sample, to_pil  # noqa: E402
from grounding.experiment import sources  # noqa: E402
from grounding.heatmap import extract_heatmaps_shared  # noqa: E402
from grounding.experiment.provenance import eval_heatmap_config  # noqa: E402
from grounding.experiment.swap import prompt_side, swap_sides  # noqa: E402
from grounding.geometry import box_to_model  # noqa: E402
from grounding.data.images import preprocess  # noqa: E402
from grounding.prompts import LearnablePrompts  # noqa: E402
from grounding.experiment.rows import load_rows  # noqa: E402
from grounding.experiment.config import TrainConfig, load_config  # noqa: E402


def tile(grey, heat=None, box=None, scale=3):
    """(S, S) grey in [0,1] (+ heatmap in red, + box in green) -> an RGB PIL tile."""
    rgb = np.stack([grey] * 3, -1) * 255
    if heat is not None:
        rgb = rgb * 0.45 + np.stack([heat * 255, heat * 60, heat * 0], -1) * 0.55
    im = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).resize((grey.shape[1] * scale, grey.shape[0] * scale),
                                                                    Image.NEAREST)
    if box is not None:
        x, y, w, h = (v * scale for v in box)
        ImageDraw.Draw(im).rectangle([x, y, x + w - 1, y + h - 1], outline=(0, 255, 0))
    return im


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tune.yaml")
    p.add_argument("--prompts", required=True, help="learned rows from train.py")
    p.add_argument("--n", type=int, default=8, help="pairs (rows): one per class")
    p.add_argument("--out", default="docs/grounding.png")
    args = p.parse_args()
    cfg = load_config(TrainConfig, args.config)
    pipe = load_pipeline(cfg.weights)
    # write_lut=False: a LUT built here is not saved, least of all into the training run's folder (cfg.out_dir)
    data = sources.load(cfg, need_samples=False, image_size=pipe.image["size"], write_lut=False)
    # one single-box pair per class in a fixed order, preferring prompts that name one side (the swap column)
    pairs, seen = [], set()
    for one_side in (True, False):
        for pair in data.test_pairs:
            if (pair["category"] not in seen and len(pair["boxes"]) == 1
                    and (prompt_side(pair["prompt"])[0] is not None) == one_side):
                pairs.append(pair)
                seen.add(pair["category"])
    pairs = pairs[:args.n]
    prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens=cfg.shared_tokens, n_ctx=cfg.n_ctx)
    load_rows(prompts, args.prompts)
    images = torch.stack([preprocess(q["image_path"], pipe.image) for q in pairs])
    text = [q["prompt"] for q in pairs]
    swapped = [swap_sides(t) for t in text]
    frozen_cfg, tuned_cfg = (eval_heatmap_config(cfg, pipe.family, tuned) for tuned in (False, True))
    (frozen,), (tuned,), (swap,) = extract_heatmaps_shared(
        pipe, images, [(text, None, [frozen_cfg]), (text, prompts, [tuned_cfg]), (swapped, prompts, [tuned_cfg])])
    samples = sample(pipe, text, num_steps=50, guidance_scale=4.0, generator=torch.Generator().manual_seed(0))
    S = pipe.image["size"]
    rows = []
    for q, x, f, t, w, s, sw in zip(pairs, images, frozen, tuned, swap, to_pil(samples, pipe.image["range"]), swapped):
        grey = x[0].numpy()
        box = box_to_model(q["boxes"][0], q["image_width"], q["image_height"], S)
        has_side = sw != q["prompt"]
        cells = [tile(grey, box=box), tile(grey, f.numpy(), box), tile(grey, t.numpy(), box),
                 tile(grey, w.numpy(), box) if has_side else tile(np.zeros_like(grey)),
                 tile(np.asarray(s, dtype=np.float32) / 255)]
        row = Image.new("RGB", (sum(c.width for c in cells) + 4 * 4, cells[0].height + 14), (0, 0, 0))
        for k, c in enumerate(cells):
            row.paste(c, (k * (c.width + 4), 14))
        caption = q["prompt"] + (f'   (swapped: "{sw}")' if has_side else "   (names no single side)")
        ImageDraw.Draw(row).text((2, 1), caption, fill=(255, 255, 0))
        rows.append(row)
    head = Image.new("RGB", (rows[0].width, 14), (0, 0, 0))
    ImageDraw.Draw(head).text((2, 1), "image + box | frozen | tuned | tuned, swapped prompt | LDM sample  (SYNTHETIC phantom)", fill=(255, 255, 255))
    canvas = Image.new("RGB", (rows[0].width, 14 + sum(r.height for r in rows)), (0, 0, 0))
    canvas.paste(head, (0, 0))
    for k, r in enumerate(rows):
        canvas.paste(r, (0, 14 + k * r.height))
    canvas.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
