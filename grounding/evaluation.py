"""Phrase-grounding evaluation: heatmaps for (image, prompt, boxes) pairs, per-pair metrics, per-class tables.

The paper's protocol (PAPER.md sections 6-7): the heatmap is extracted in the model frame, mapped back to the
original image (shortest side, NaN padding), and scored against the expert boxes in ORIGINAL pixels with CNR
(signed, per box, averaged), mIoU over thresholds 0.1..0.5 against the union of boxes, plus pixel AUC-ROC (exact, and
the predecessor's 5-threshold binned one) and the pointing game. `protocol` (config key metric_protocol) picks how
several boxes and the NaN band are counted: grounding/metrics.py, README "Metric conventions". Rows are appended to
a JSONL file as they are computed, so an interrupted run resumes without
redoing finished pairs (only rows made by the same weights/prompts/settings/code: grounding/provenance.py); under
torchrun each rank takes every world_size-th pair and rank 0 gathers.
"""
import json
import os

import torch
from tqdm import tqdm

from grounding import provenance
from grounding.heatmap import extract_heatmaps
from grounding.metrics import auc_binned5, auc_roc, cnr, miou, pointing_game, summarise, summary_markdown
from grounding.preprocess import preprocess, to_original

METRICS = ("cnr", "miou", "auc", "auc_binned5", "pointing")


def score(heatmap, boxes, protocol="reference"):
    """All metrics of one original-frame heatmap against its boxes."""
    return {"cnr": cnr(heatmap, boxes, signed=True, protocol=protocol),
            "miou": miou(heatmap, boxes, protocol=protocol), "auc": auc_roc(heatmap, boxes),
            "auc_binned5": auc_binned5(heatmap, boxes), "pointing": pointing_game(heatmap, boxes)}


def read_rows(path):
    """Rows already written (resume); a torn last line from an interrupted run is ignored."""
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                rows[row["pair_id"]] = row
    return rows


def evaluate_pairs(pipe, pairs, cfg, prompts=None, rows_path=None, batch_size=16, rank=0, world_size=1,
                   overlay_dir=None, n_overlays=0, desc="pairs", record=None, on_mismatch="error",
                   protocol="reference"):
    """Score every pair; returns the list of rows (this rank's share). Appends to rows_path as it goes.

    record: what makes these rows (provenance.rows_record); rows already in rows_path are resumed only when they
    were made by the same (else on_mismatch: "error" stops, "fresh" moves them aside). A lock file keeps a second
    process from writing the same rows file at the same time.
    """
    lock = provenance.acquire_lock(rows_path + ".lock") if rows_path else None
    if rows_path and record is not None:  # rows scored under another metric_protocol are never resumed
        provenance.check_rows(rows_path, {**record, "metric_protocol": protocol}, on_mismatch)
    done = read_rows(rows_path) if rows_path else {}
    if done:  # drop a torn last line (an interrupted write) before appending: rewrite the complete rows
        tmp = rows_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in done.values())
        os.replace(tmp, rows_path)
    mine = [p for i, p in enumerate(pairs) if i % world_size == rank]
    todo = [p for p in mine if p["pair_id"] not in done]
    if done:
        print(f"resuming: {len(mine) - len(todo)} of {len(mine)} pairs already scored in {rows_path}")
    out = open(rows_path, "a") if rows_path else None
    overlays = 0
    for start in tqdm(range(0, len(todo), batch_size), desc=desc, disable=not todo, mininterval=5):
        chunk = todo[start:start + batch_size]
        images = torch.stack([preprocess(p["image_path"], pipe.image) for p in chunk])
        heatmaps = extract_heatmaps(pipe, images, [p["prompt"] for p in chunk], cfg, prompts)
        for p, hm in zip(chunk, heatmaps):
            full = to_original(hm, p["image_width"], p["image_height"])
            row = {"pair_id": p["pair_id"], "category": p["category"], "prompt": p["prompt"], "protocol": protocol,
                   **score(full, p["boxes"], protocol)}
            done[p["pair_id"]] = row
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
            if overlay_dir and overlays < n_overlays:
                save_overlay(p, full, os.path.join(overlay_dir, f"{p['pair_id']}.png"))
                overlays += 1
    if out:
        out.close()
    provenance.release_lock(lock)
    return [done[p["pair_id"]] for p in mine]


def save_overlay(pair, heatmap, path):
    """The original image with the heatmap (red) and the ground-truth boxes (green)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from grounding.preprocess import load_image

    grey = (load_image(pair["image_path"]) * 255).astype(np.uint8)
    hm = torch.nan_to_num(heatmap, nan=0.0).numpy()
    rgb = np.stack([grey] * 3, -1).astype(np.float32)
    rgb[..., 0] = np.clip(rgb[..., 0] * 0.6 + 255 * hm * 0.7, 0, 255)
    rgb[..., 1:] *= 0.6 + 0.4 * (1 - hm[..., None])
    im = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for x, y, w, h in pair["boxes"]:
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(0, 255, 0))
    draw.text((3, 3), pair["prompt"], fill=(255, 255, 0))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    im.save(path)


def summary_table(rows, n_boot=10000, seed=0):
    """Per-class means with 95% bootstrap CIs and the class average (paper layout; mIoU in %)."""
    summary = summarise(rows, list(METRICS), n=n_boot, seed=seed)
    return summary, summary_markdown(summary, list(METRICS), scale={"miou": 100})


def comparison_markdown(summaries, metrics=("cnr", "miou")):
    """One table with a column pair per model: {"frozen": summary, "tuned": summary} -> Markdown."""
    names = list(summaries)
    classes = list(next(iter(summaries.values())))
    head = "| class | n | " + " | ".join(f"{m} {n}" for n in names for m in metrics) + " |"
    lines = [head, "|---|---|" + "---|" * (len(names) * len(metrics))]
    for c in classes:
        cells = []
        for n in names:
            for m in metrics:
                mean, lo, hi = summaries[n][c][m]
                k = 100 if m == "miou" else 1
                cells.append(f"{mean * k:.2f} [{lo * k:.2f}, {hi * k:.2f}]")
        lines.append(f"| {c} | {summaries[names[0]][c]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
