"""The README figure: held-out pairs with their boxes, and the frozen, untuned and tuned heatmaps of the true prompt
beside those of the left/right-swapped prompt, each row with its own numbers from the run's per-pair rows.

    python scripts/figure.py --run runs/tune            # -> docs/grounding.png (about a minute on 2 CPU cores)

Reads the run folder train.py wrote: config.yaml (weights, data), learned_rows.safetensors, eval_<model>.jsonl (the
per-pair rows of the final table) and their .provenance.json sidecars (the heatmap settings of each column).

Rows, chosen deterministically from eval_tuned.jsonl: for every class and each side its prompts name, the held-out
pair with the median tuned CNR (the lower median of that group sorted by CNR, ties by pair id); a class none of whose
prompts names a single side (cardiomegaly, edema) gives the median pair of the class. So both sides and every class
appear, and no row is picked for looking good.
Columns: the model-frame image with its box(es) (red) | per model (frozen: the paper's baseline protocol, its layers
+ Otsu; untuned: the tuned layers with the original rows; tuned: the learned rows), the heatmap of the true prompt
and of the same prompt with "left" and "right" exchanged (grounding/experiment/swap.py), the midline dashed.
Numbers: in each map, the share of its mass on the finding's true side (the swap table counts a map as "on the true
side" when that share is above 50%); under the maps, the pair's CNR and mIoU from the run's rows (mIoU of the
swapped prompt under its map). The maps are recomputed here with each column's recorded settings and checked
against those rows: a figure whose maps do not reproduce the table's numbers is refused.
The footer counts, over the one-sided rows shown, the maps on the true side, next to the run's swap table.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm import load_pipeline  # noqa: E402
from grounding.data.images import preprocess  # noqa: E402
from grounding.experiment import sources  # noqa: E402
from grounding.experiment.config import TrainConfig, load_config  # noqa: E402
from grounding.experiment.evaluation import percent_row, score  # noqa: E402
from grounding.experiment.ground_files import font  # noqa: E402
from grounding.experiment.provenance import folder_digest, prompts_digest, read_record  # noqa: E402
from grounding.experiment.rows import load_rows  # noqa: E402
from grounding.experiment.swap import side_masses, swap_sides  # noqa: E402
from grounding.geometry import box_to_model, to_original  # noqa: E402
from grounding.heatmap import HeatmapConfig, extract_heatmaps_shared  # noqa: E402
from grounding.prompts import LearnablePrompts  # noqa: E402

MODELS = ("frozen", "untuned", "tuned")   # eval_<model>.jsonl; "untuned" is optional (eval_untuned: false)
SCALE, GAP = 2, 4                         # each 64 x 64 model-frame tile drawn at 2x; pixels between tiles
CNR_TOL, MIOU_TOL = 0.02, 0.5             # recomputed vs recorded CNR, mIoU % (batching changes the last float bits)


# ---------------------------------------------------------------------------------------------------------
# the run's rows and which pairs to show


def read_run(run):
    """{model: {"rows": {pair_id: row}, "record": provenance}} for every eval_<model>.jsonl in the run folder."""
    out = {}
    for m in MODELS:
        path = os.path.join(run, f"eval_{m}.jsonl")
        if not os.path.isfile(path):
            if m == "untuned":
                continue
            raise FileNotFoundError(f"{path} not found: run train.py (eval_at_end: true) to write {run}")
        with open(path) as f:
            rows = [percent_row(json.loads(line)) for line in f if line.strip()]   # mIoU in percent
        sidecar = path + ".provenance.json"
        if not os.path.isfile(sidecar):
            raise FileNotFoundError(f"{sidecar} not found: the heatmap settings of {path} are unknown")
        # read_record: a record written before HeatmapConfig.tuned became `preset` reads as the same settings
        out[m] = {"rows": {r["pair_id"]: r for r in rows}, "record": read_record(sidecar), "path": path}
    return out


def choose_rows(rows):
    """[(category, side or None, n in the group, row)]: per class and named side, the pair of median CNR.

    rows: the tuned model's per-pair rows (those of one-sided prompts carry `side`, from the swap test). A class with
    no one-sided pair gives the median pair of the whole class. Classes sorted, "left" before "right".
    """
    chosen = []
    for c in sorted({r["category"] for r in rows}):
        in_class = [r for r in rows if r["category"] == c]
        groups = [(s, [r for r in in_class if r.get("side") == s]) for s in ("left", "right")]
        groups = [(s, g) for s, g in groups if g] or [(None, in_class)]
        for side, group in groups:
            group = sorted(group, key=lambda r: (r["cnr"], r["pair_id"]))
            chosen.append((c, side, len(group), group[(len(group) - 1) // 2]))   # the lower median
    return chosen


def side_share(full_map, side):
    """Share of an original-frame map's mass on the patient's `side` (image right for "left"), NaN ignored."""
    image_left, image_right = side_masses(full_map)
    true = image_right if side == "left" else image_left
    return true / max(image_left + image_right, 1e-12)


def class_average(rows, key):
    """Mean over classes of the per-class mean of `key` (the swap table's Average row), over rows that hold it."""
    per_class = {}
    for r in rows:
        if key in r:
            per_class.setdefault(r["category"], []).append(r[key])
    return float(np.mean([np.mean(v) for v in per_class.values()]))


# ---------------------------------------------------------------------------------------------------------
# drawing (PIL + numpy only)

# viridis at 9 stops (matplotlib's values): perceptually even, readable in grey, no red/green pair
_STOPS = np.array([[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
                   [31, 158, 137], [53, 183, 121], [109, 205, 89], [253, 231, 37]], dtype=np.float32)
ALPHA = 0.65            # heatmap colour over the grey image
BOX = (255, 64, 64)


def colormap(h):
    """(...) values in [0, 1] -> (..., 3) RGB floats in [0, 255] (viridis, linear between stops)."""
    x = np.clip(h, 0, 1) * (len(_STOPS) - 1)
    i = np.minimum(x.astype(int), len(_STOPS) - 2)
    f = (x - i)[..., None]
    return _STOPS[i] * (1 - f) + _STOPS[i + 1] * f


def tile(grey, heat=None, boxes=(), midline=False):
    """(S, S) grey in [0, 1] (+ heatmap in [0, 1], + model-frame boxes, + dashed midline) -> RGB tile at SCALE."""
    rgb = np.stack([grey] * 3, -1) * 255
    if heat is not None:
        rgb = rgb * (1 - ALPHA) + colormap(heat) * ALPHA
    S = grey.shape[0]
    im = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).resize((S * SCALE, S * SCALE), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    if midline:   # x = W/2, the swap test's midline
        for y in range(0, S * SCALE, 6):
            draw.line([(S * SCALE // 2, y), (S * SCALE // 2, y + 2)], fill=(255, 255, 255))
    for x, y, w, h in boxes:
        draw.rectangle([x * SCALE, y * SCALE, (x + w) * SCALE - 1, (y + h) * SCALE - 1], outline=BOX)
    return im


def label(im, text, f, xy=(2, 2)):
    """Write `text` on a dark box into the tile's corner."""
    draw = ImageDraw.Draw(im)
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=f)
    draw.rectangle([x0 - 2, y0 - 1, x1 + 1, y1 + 1], fill=(0, 0, 0))
    draw.text(xy, text, fill=(255, 255, 255), font=f)
    return im


def colour_bar(width, height, f):
    """The heatmap colour scale as drawn (over mid grey), with ticks 0, 0.5, 1."""
    ramp = np.linspace(0, 1, width)[None].repeat(height, 0)
    rgb = 0.5 * 255 * (1 - ALPHA) + colormap(ramp) * ALPHA
    bar = Image.new("RGB", (width + 40, height + 14), (0, 0, 0))
    bar.paste(Image.fromarray(rgb.astype(np.uint8)), (20, 0))
    draw = ImageDraw.Draw(bar)
    for v in (0.0, 0.5, 1.0):
        x = 20 + round(v * (width - 1))
        draw.line([(x, height), (x, height + 2)], fill=(255, 255, 255))
        draw.text((x, height + 1), f"{v:g}", fill=(255, 255, 255), font=f, anchor="mt")
    return bar


# ---------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/tune", help="train.py's run folder (config.yaml, learned rows, eval_*.jsonl)")
    p.add_argument("--out", default="docs/grounding.png")
    args = p.parse_args(argv)
    run = read_run(args.run)
    cfg = load_config(TrainConfig, os.path.join(args.run, "config.yaml"))
    models = list(run)
    tuned_record = run["tuned"]["record"]
    if folder_digest(cfg.weights) != tuned_record["weights"]:
        raise ValueError(f"{cfg.weights} is not the model {run['tuned']['path']} was scored with (weights digest "
                         f"{folder_digest(cfg.weights)} vs {tuned_record['weights']} recorded)")
    pipe = load_pipeline(cfg.weights)
    prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens=cfg.shared_tokens, n_ctx=cfg.n_ctx)
    rows_file = os.path.join(args.run, "learned_rows.safetensors")
    load_rows(prompts, rows_file)
    if prompts_digest(prompts) != tuned_record["prompts"]:
        raise ValueError(f"{rows_file} holds other rows than the ones {run['tuned']['path']} was scored with "
                         f"({prompts_digest(prompts)} vs {tuned_record['prompts']}): rerun the evaluation")
    # write_lut=False: a LUT built here is not saved, least of all into the training run's folder (cfg.out_dir)
    data = sources.load(cfg, need_samples=False, image_size=pipe.image["size"], write_lut=False)
    pairs = {q["pair_id"]: q for q in data.test_pairs}
    chosen = choose_rows(list(run["tuned"]["rows"].values()))
    missing = [r["pair_id"] for _, _, _, r in chosen if r["pair_id"] not in pairs]
    if missing:
        raise ValueError(f"pairs {missing[:3]} of {run['tuned']['path']} are not in this data's test split: "
                         f"{data.description}")
    chosen_pairs = [pairs[r["pair_id"]] for _, _, _, r in chosen]

    # one inversion for every map: per model its true and its swapped prompts, read with its recorded settings
    hcfgs = {m: HeatmapConfig(**{**run[m]["record"]["heatmap"], "window": tuple(run[m]["record"]["heatmap"]["window"])})
             for m in models}
    learned = {m: prompts if m == "tuned" else None for m in models}
    images = torch.stack([preprocess(q["image_path"], pipe.image) for q in chosen_pairs])
    texts = [q["prompt"] for q in chosen_pairs]
    swapped = [swap_sides(t) for t in texts]
    variants = [(t, learned[m], [hcfgs[m]]) for m in models for t in (texts, swapped)]
    maps = extract_heatmaps_shared(pipe, images, variants)
    maps = {m: (maps[2 * k][0], maps[2 * k + 1][0]) for k, m in enumerate(models)}   # model -> (true, swapped)

    f, fb = font(11), font(13)
    S = pipe.image["size"]
    T = S * SCALE                                             # tile side in the picture
    width = (1 + 2 * len(models)) * (T + GAP) - GAP
    blocks, hits = [], {m: [0, 0] for m in models}           # hits: one-sided rows on the true side (true, swapped)
    for i, ((category, side, n, _), q, x) in enumerate(zip(chosen, chosen_pairs, images)):
        grey = x[0].numpy()
        boxes = [box_to_model(b, q["image_width"], q["image_height"], S) for b in q["boxes"]]
        cells, notes = [tile(grey, boxes=boxes)], [""]
        for m in models:
            row = run[m]["rows"][q["pair_id"]]
            for which in (0, 1):                              # 0: the true prompt, 1: the swapped prompt
                hm = maps[m][which][i]
                full = to_original(hm, q["image_width"], q["image_height"])
                if which == 0:
                    check(score(full, q["boxes"]), row, run[m]["path"])
                if side is None:
                    cells.append(tile(grey, hm.numpy(), boxes) if which == 0 else
                                 label(tile(np.zeros_like(grey)), "names no single side", f, (4, T // 2 - 6)))
                    notes.append(f"CNR {row['cnr']:.2f}  mIoU {row['miou_percent']:.1f}%" if which == 0 else "")
                    continue
                share = side_share(full, side)
                hits[m][which] += share > 0.5
                cells.append(label(tile(grey, hm.numpy(), boxes, midline=True), f"{100 * share:.1f}% on true side", f))
                notes.append(f"CNR {row['cnr']:.2f}  mIoU {row['miou_percent']:.1f}%" if which == 0
                             else f"mIoU {row['miou_swap_percent']:.1f}%")
        title = f"{category}, {side or 'no single side'} (median of {n}):  \"{q['prompt']}\""
        if side is not None:
            title += f"   swapped: \"{swap_sides(q['prompt'])}\""
        block = Image.new("RGB", (width, 16 + T + 16), (0, 0, 0))
        draw = ImageDraw.Draw(block)
        draw.text((2, 1), title, fill=(255, 230, 0), font=fb)
        for k, (c, note) in enumerate(zip(cells, notes)):
            block.paste(c, (k * (T + GAP), 16))
            draw.text((k * (T + GAP) + 1, 16 + T + 2), note, fill=(230, 230, 230), font=f)
        blocks.append(block)

    # header: what the columns are, the colour scale
    head = Image.new("RGB", (width, 104), (0, 0, 0))
    draw = ImageDraw.Draw(head)
    draw.text((2, 2), f"Phrase grounding on held-out pairs of the SYNTHETIC phantom world  (run {args.run}, "
              f"{hcfgs['tuned'].num_steps} DDIM steps)", fill=(255, 255, 255), font=fb)
    names = {"frozen": "frozen (paper's protocol)", "untuned": "untuned rows", "tuned": "tuned rows"}
    draw.text((2, 52), "image + box", fill=(200, 200, 200), font=f)
    for k, m in enumerate(models):
        h = hcfgs[m]
        x0 = (1 + 2 * k) * (T + GAP)
        draw.text((x0, 22), names[m], fill=(255, 255, 255), font=fb)
        draw.text((x0, 38), f"layers {','.join(map(str, h.resolved_layers()))}"
                  + (" + Otsu mask" if h.resolved_otsu() else ""), fill=(255, 255, 255), font=f)
        draw.text((x0, 52), "true prompt", fill=(200, 200, 200), font=f)
        draw.text((x0 + T + GAP, 52), "left/right swapped", fill=(200, 200, 200), font=f)
    head.paste(colour_bar(200, 12, f), (2, 72))
    draw.text((260, 70), "heatmap value (min-max per map); dashed: the midline. In each map: the share of its mass on "
              "the finding's TRUE\nside (patient left = image right), for the swapped prompt too; the table counts a "
              "map above 50% as on the true side.", fill=(255, 255, 255), font=f)

    # footer: how the rows were chosen, and whether these rows agree with the run's swap table
    one_sided = sum(side is not None for _, side, _, _ in chosen)
    lines = ["Rows: per class and named side, the held-out pair with the median tuned CNR (eval_tuned.jsonl); classes "
             "naming no side: the class median.",
             f"Maps on the true side in these {one_sided} one-sided rows (true / swapped prompt) vs the run's swap "
             "table (class average, all one-sided pairs):"]
    lines += [f"  {m:8s} here: true prompt {hits[m][0]}/{one_sided}, swapped {hits[m][1]}/{one_sided}    table: "
              f"true {class_average(run[m]['rows'].values(), 'true_side'):.2f}, "
              f"swapped {class_average(run[m]['rows'].values(), 'swap_side'):.2f}" for m in models]
    for other in [m for m in ("untuned", "frozen") if m in run]:
        pair_ids = [r["pair_id"] for *_, r in chosen]
        tuned, base = run["tuned"]["rows"], run[other]["rows"]
        above = [sum(tuned[i][key] > base[i][key] for i in pair_ids) for key in ("cnr", "miou_percent")]
        lines.append(f"Tuned above {other} in these {len(chosen)} rows: CNR {above[0]}, mIoU {above[1]}")
    foot = Image.new("RGB", (width, 8 + 14 * len(lines)), (0, 0, 0))
    draw = ImageDraw.Draw(foot)
    for k, line in enumerate(lines):
        draw.text((2, 4 + 14 * k), line, fill=(255, 255, 255), font=f)

    parts = [head, *blocks, foot]
    canvas = Image.new("RGB", (width, sum(b.height + GAP for b in parts)), (0, 0, 0))
    y = 0
    for b in parts:
        canvas.paste(b, (0, y))
        y += b.height + GAP
    canvas.save(args.out, optimize=True)
    print("\n".join(lines))
    print(f"wrote {args.out} ({canvas.width} x {canvas.height})")


def check(recomputed, row, path):
    """The map drawn must give the run's own numbers for its pair, else the figure would not show the table."""
    for key, tol in (("cnr", CNR_TOL), ("miou_percent", MIOU_TOL)):
        if abs(recomputed[key] - row[key]) > tol:
            raise ValueError(f"{path} pair {row['pair_id']}: {key} {row[key]:.4f} recorded, {recomputed[key]:.4f} "
                             "from the map recomputed here: the rows were made by other code or settings; rerun "
                             "the evaluation (train.py) before drawing its figure")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"figure.py: error: {e}")
