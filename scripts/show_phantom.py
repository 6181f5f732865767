"""Write a PNG grid of phantom chest X-ray samples with finding boxes and anatomy overlays (README figure).

Each tile: the rendered image, its ground-truth finding box(es) in red with the report phrase, and the
ImaGenome-style anatomy boxes (lungs, zones, costophrenic angles, cardiac silhouette) in thin colours.
The last row shows VinDr-style out-of-distribution cases. Everything drawn is SYNTHETIC.

    python scripts/show_phantom.py --out docs/phantom_grid.png [--seed 0] [--cols 6]
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grounding.phantom.world import PATHOLOGIES, SYNTHETIC_NOTICE, PhantomConfig, sample_case  # noqa: E402
from grounding.phantom.render import render_case  # noqa: E402

ANATOMY_COLOURS = {"lung": (80, 160, 255), "apical zone": (120, 220, 255), "upper lung zone": (80, 220, 120),
                   "mid lung zone": (240, 220, 60), "lower lung zone": (255, 150, 40),
                   "costophrenic angle": (220, 90, 255), "cardiac silhouette": (255, 255, 255)}


def tile(case, scale, anatomy=True):
    img, info = render_case(case)
    W, H = case["anat"]["W"], case["anat"]["H"]
    im = Image.fromarray(np.round(img * 255).astype(np.uint8)).convert("RGB").resize((W * scale, H * scale))
    d = ImageDraw.Draw(im)
    if anatomy:
        for name, (x1, y1, x2, y2) in info["anatomy"].items():
            colour = next(c for k, c in ANATOMY_COLOURS.items() if name.endswith(k))
            d.rectangle([x1 * scale, y1 * scale, x2 * scale, y2 * scale], outline=colour, width=1)
    for f, boxes in zip(case["findings"], info["boxes"]):
        for x, y, w, h in boxes:
            d.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale], outline=(255, 40, 40), width=3)
    label = "; ".join(f["phrase"] for f in case["findings"]) or "no finding"
    canvas = Image.new("RGB", (W * scale, H * scale + 30), (0, 0, 0))
    canvas.paste(im, (0, 30))
    ImageDraw.Draw(canvas).text((4, 4), label[:60], fill=(255, 255, 255))
    ImageDraw.Draw(canvas).text((4, 16), case["kind"], fill=(160, 160, 160))
    return canvas


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/phantom_grid.png", help="PNG file to write")
    ap.add_argument("--seed", type=int, default=0, help="world seed")
    ap.add_argument("--cols", type=int, default=6, help="tiles per row")
    ap.add_argument("--size", type=int, default=256, help="image short side")
    ap.add_argument("--scale", type=int, default=1, help="upscale factor of each tile")
    args = ap.parse_args()
    cfg = PhantomConfig(seed=args.seed, size=args.size)
    # one training case per pathology (first one found), then a few normals and VinDr-style cases
    cases, seen, i = [], set(), 0
    while len(seen) < len(PATHOLOGIES) and i < 400:
        c = sample_case(cfg, "test", i)
        if c["findings"] and c["findings"][0]["pathology"] not in seen:
            seen.add(c["findings"][0]["pathology"])
            cases.append(c)
        i += 1
    cases += [sample_case(cfg, "vindr", j) for j in range(2 * args.cols - len(cases) % args.cols)]
    tiles = [tile(c, args.scale, anatomy=(k % 2 == 0)) for k, c in enumerate(cases)]
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = (len(tiles) + args.cols - 1) // args.cols
    grid = Image.new("RGB", (tw * args.cols, th * rows + 20), (20, 20, 20))
    for k, t in enumerate(tiles):
        grid.paste(t, ((k % args.cols) * tw, (k // args.cols) * th))
    ImageDraw.Draw(grid).text((4, th * rows + 4), SYNTHETIC_NOTICE + " - anatomy boxes on every other tile",
                              fill=(255, 200, 0))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    print(f"{SYNTHETIC_NOTICE}\nwrote {args.out} ({len(tiles)} tiles)")


if __name__ == "__main__":
    main()
