"""Phrase-grounding evaluation: heatmaps for (image, prompt, boxes) pairs, per-pair metrics, per-class tables.

The paper's protocol (docs/paper.md sections 6-7): the heatmap is extracted in the model frame, mapped back to the
original image (shortest side, NaN padding), and scored against the expert boxes in ORIGINAL pixels with CNR
(signed, per box, averaged), mIoU over thresholds 0.1..0.5 against the union of boxes, plus pixel AUC-ROC (exact, and
the predecessor's 5-threshold binned one) and the pointing game. mIoU has one unit wherever a row or a table holds
it: percent, as the paper reports it, under keys that say so (`miou_percent`; the tables' column is "miou"; the
metric function grounding/metrics.py `miou` returns the fraction). `protocol` (config key metric_protocol) picks how
several boxes and the NaN band are counted: grounding/metrics.py, README "Metric conventions". Rows are appended to
a JSONL file as they are computed, so an interrupted run resumes without redoing finished pairs (only rows made by
the same weights/prompts/settings/code: grounding/experiment/provenance.py); under torchrun each rank takes every
world_size-th pair and rank 0 gathers.
"""
import dataclasses
import hashlib
import json
import os

import torch
from tqdm import tqdm

from grounding.experiment import distributed, provenance
from grounding.heatmap import HeatmapConfig, extract_heatmaps_shared
from grounding.metrics import auc_binned5, auc_roc, cnr, miou, pointing_game
from grounding.experiment.tables import models_markdown, summarise, summary_markdown
from grounding.data.images import preprocess
from grounding.geometry import to_original
from grounding.experiment.swap import (prompt_side, swap_caption, swap_markdown, swap_pairs, swap_row, swap_sides,
                                       swap_summary)

ROW_METRICS = ("cnr", "miou_percent", "auc", "auc_binned5", "pointing")
LABELS = {"miou_percent": "miou"}   # the tables' column names (in percent, as the paper's)


def score(heatmap, boxes, protocol="reference"):
    """All metrics of one original-frame heatmap against its boxes (mIoU in percent)."""
    return {"cnr": cnr(heatmap, boxes, signed=True, protocol=protocol),
            "miou_percent": 100 * miou(heatmap, boxes, protocol=protocol), "auc": auc_roc(heatmap, boxes),
            "auc_binned5": auc_binned5(heatmap, boxes), "pointing": pointing_game(heatmap, boxes)}


def pair_digest(pair):
    """What a row was scored on: the image's bytes and recorded size, the boxes, the prompt and the class (sha256,
    16 hex digits). A row whose pair has another digest now (data edited in place) is not resumed."""
    what = [provenance.file_digest_cached(pair["image_path"]), pair.get("image_width"), pair.get("image_height"),
            [list(map(float, b)) for b in pair["boxes"]], pair["prompt"], pair["category"]]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def read_rows(path):
    """Rows already written (resume); a torn last line from an interrupted run is ignored, and a row written when
    mIoU was kept as a fraction is read in percent (`percent_row`)."""
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                rows[row["pair_id"]] = percent_row(row)
    return rows


OLD_FRACTION_KEYS = ("miou", "miou_true", "miou_swap", "miou_drop")   # rows of older versions: mIoU in [0, 1]


def percent_row(row):
    """A row of an older version, whose mIoU keys (`miou`, the swap test's `miou_true` ...; classify.py's `miou`
    {source: value}) held fractions, with those keys in percent under `<key>_percent`: 100 * the fraction, the very
    number this version computes, so old rows resume as they are. A current row is returned unchanged."""
    for key in OLD_FRACTION_KEYS:
        if key in row and f"{key}_percent" not in row:
            old = row.pop(key)
            row[f"{key}_percent"] = {k: 100 * v for k, v in old.items()} if isinstance(old, dict) else 100 * old
    return row


@dataclasses.dataclass
class Model:
    """One column of an evaluation: a name, learned rows (None = the frozen text encoder) and heatmap settings,
    with where its rows go and what made them (provenance.rows_record)."""
    name: str
    prompts: object = None
    cfg: HeatmapConfig = None
    rows_path: str = None
    record: dict = None
    overlay_dir: str = None


def _resume(rows_path):
    """Rows already in rows_path, the file rewritten without a torn last line (an interrupted write)."""
    done = read_rows(rows_path)
    if done:
        tmp = rows_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in done.values())
        os.replace(tmp, rows_path)
    return done


def evaluate_models(pipe, pairs, models, batch_size=16, rank=0, world_size=1, swap=False, n_overlays=0,
                    desc="pairs", on_mismatch="error", protocol="reference"):
    """Score every pair under every model; returns {model name: rows} (this rank's share).

    The inversion follows the "" prompt, so ONE inversion per image batch serves every model (and, with swap=True,
    the left/right-swapped prompts of grounding/experiment/swap.py): grounding/heatmap.py extract_heatmaps_shared. Rows are
    appended to each model's rows_path as they are computed; rows already there are resumed only when they were made
    by the same things (model.record; else on_mismatch: "error" stops, "fresh" moves them aside), and a lock file
    keeps a second process from writing the same rows file at the same time; rows scored under another metric
    `protocol` (grounding/metrics.py) or without the swap columns are never resumed. With swap=True, rows of pairs whose
    prompt names one side also hold the swap test's columns (grounding/experiment/swap.py swap_row).
    """
    paths = [m.rows_path for m in models if m.rows_path]
    locks = [provenance.acquire_lock(path + ".lock") for path in paths]
    try:
        mine = [p for i, p in enumerate(pairs) if i % world_size == rank]
        done = {}
        for m in models:
            if m.rows_path and m.record is not None:
                provenance.check_rows(m.rows_path, {**m.record, "metric_protocol": protocol, "swap": swap},
                                      on_mismatch)
            done[m.name] = _resume(m.rows_path) if m.rows_path else {}
            # a row counts only for the pair as it is now: the data record names the files by path, not what they
            # hold, so a pair whose image bytes, size, boxes, prompt or class changed since is scored again
            stale = [p["pair_id"] for p in mine if p["pair_id"] in done[m.name]
                     and done[m.name][p["pair_id"]].get("pair_digest") != pair_digest(p)]
            if stale:
                print(f"{m.rows_path}: {len(stale)} rows were scored on another version of their pair (its image, "
                      f"boxes, prompt or class changed since, e.g. {stale[0]}): scoring them again")
            for pair_id in stale:
                del done[m.name][pair_id]
            n_done = sum(p["pair_id"] in done[m.name] for p in mine)
            if n_done:
                print(f"resuming: {n_done} of {len(mine)} pairs already scored in {m.rows_path}")
        # only the models that miss rows run, on the pairs that any of them misses
        running = [m for m in models if any(p["pair_id"] not in done[m.name] for p in mine)]
        todo = [p for p in mine if any(p["pair_id"] not in done[m.name] for m in running)]
        groups = {}                   # models that share learned rows share one conditional pass
        for m in running:
            groups.setdefault(id(m.prompts), (m.prompts, []))[1].append(m)
        groups = list(groups.values())
        outs = {m.name: open(m.rows_path, "a") for m in running if m.rows_path}
        overlays = 0
        for start in tqdm(range(0, len(todo), batch_size), desc=desc, disable=not todo, mininterval=5):
            chunk = todo[start:start + batch_size]
            images = torch.stack([preprocess(p["image_path"], pipe.image) for p in chunk])
            texts = [p["prompt"] for p in chunk]
            variants = [(texts, prompts, [m.cfg for m in ms]) for prompts, ms in groups]
            if swap:
                variants += [([swap_sides(t) for t in texts], prompts, [m.cfg for m in ms]) for prompts, ms in groups]
            maps = extract_heatmaps_shared(pipe, images, variants)   # [variant][cfg] -> (B, S, S)
            for g, (_, ms) in enumerate(groups):
                for k, m in enumerate(ms):
                    for i, p in enumerate(chunk):
                        row = _score_pair(p, maps[g][k][i], maps[len(groups) + g][k][i] if swap else None, protocol)
                        done[m.name][p["pair_id"]] = row
                        if m.name in outs:
                            outs[m.name].write(json.dumps(row) + "\n")
                            outs[m.name].flush()
                        if m.overlay_dir and overlays + i < n_overlays:
                            full = to_original(maps[g][k][i], p["image_width"], p["image_height"])
                            save_overlay(p, full, os.path.join(m.overlay_dir, f"{p['pair_id']}.png"))
            overlays += len(chunk)
        for f in outs.values():
            f.close()
    finally:
        for lock in locks:
            provenance.release_lock(lock)
    return {m.name: [done[m.name][p["pair_id"]] for p in mine] for m in models}


def compare_models(pipe, pairs, models, batch_size=16, swap=False, n_boot=10000, rank=0, world_size=1,
                   n_overlays=0, desc="evaluation", on_mismatch="error", protocol="reference"):
    """The frozen-vs-tuned comparison (train.py's final evaluation and evaluate.py): every Model scored on the same
    pairs by evaluate_models (one inversion per image batch serves them all), the rows of every rank gathered in
    pair order, and the tables.

    Returns (rows {name: [row]}, summaries {name: summary}, tables {name: per-class Markdown}, the location-swap
    Markdown (swap=True, else None), the comparison Markdown (None for one model)); on ranks other than 0 only
    this rank's rows, and empty tables.
    """
    rows = evaluate_models(pipe, pairs, models, batch_size=batch_size, rank=rank, world_size=world_size, swap=swap,
                           n_overlays=n_overlays, desc=desc, on_mismatch=on_mismatch, protocol=protocol)
    if world_size > 1:
        rows = {name: distributed.gather_rows(r, world_size) for name, r in rows.items()}
    if rank != 0:
        return rows, {}, {}, None, None
    order = {pair["pair_id"]: i for i, pair in enumerate(pairs)}
    summaries, tables = {}, {}
    for m in models:
        rows[m.name].sort(key=lambda r: order[r["pair_id"]])   # the same order as a single-process run
        summaries[m.name], tables[m.name] = summary_table(rows[m.name], n_boot=n_boot)
    swap_md = None
    if swap:
        _, excluded = swap_pairs(pairs)
        if any("true_side" in r for m in models for r in rows[m.name]):
            swap_md = (f"Location-swap test ({swap_caption(excluded)}):\n"
                       + swap_markdown({m.name: swap_summary(rows[m.name], n_boot=n_boot) for m in models}))
        else:  # e.g. a few eval_pairs, none of whose prompts names one side
            swap_md = f"Location-swap test: no pair takes part ({swap_caption(excluded)})"
    comparison = comparison_markdown(summaries) if len(summaries) > 1 else None
    return rows, summaries, tables, swap_md, comparison


def _score_pair(pair, heatmap, swapped=None, protocol="reference"):
    """One pair's row from its model-frame heatmap (and the swapped prompt's, for the swap test)."""
    for h in (heatmap, swapped):
        if h is not None and torch.isnan(h).any():   # min-max keeps a constant map finite: NaN came from the model
            raise ValueError(f"pair {pair['pair_id']} ({pair['image_path']}): its heatmap holds NaN values, i.e. the "
                             "model's forward produced NaN (autocast fp16 overflow? try autocast: bf16 or none)")
    full = to_original(heatmap, pair["image_width"], pair["image_height"])
    row = {"pair_id": pair["pair_id"], "category": pair["category"], "prompt": pair["prompt"], "protocol": protocol,
           **score(full, pair["boxes"], protocol), "pair_digest": pair_digest(pair)}
    side, _ = prompt_side(pair["prompt"])
    if swapped is not None and side is not None:
        swapped = to_original(swapped, pair["image_width"], pair["image_height"])
        row.update(swap_row({**pair, "side": side, "swapped_prompt": swap_sides(pair["prompt"])}, full, swapped,
                            row["miou_percent"], 100 * miou(swapped, pair["boxes"], protocol=protocol)))
    return row


def evaluate_pairs(pipe, pairs, cfg, prompts=None, rows_path=None, batch_size=16, rank=0, world_size=1,
                   overlay_dir=None, n_overlays=0, desc="pairs", record=None, on_mismatch="error",
                   protocol="reference"):
    """Score every pair under one model (evaluate_models with one Model); returns this rank's rows."""
    model = Model("model", prompts, cfg, rows_path, record, overlay_dir)
    return evaluate_models(pipe, pairs, [model], batch_size, rank, world_size, n_overlays=n_overlays, desc=desc,
                           on_mismatch=on_mismatch, protocol=protocol)["model"]


def save_overlay(pair, heatmap, path):
    """The original image with the heatmap (red) and the ground-truth boxes (green)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from grounding.data.images import load_image

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
    summary = summarise(rows, list(ROW_METRICS), n=n_boot, seed=seed)
    return summary, summary_markdown(summary, list(ROW_METRICS), labels=LABELS)


def comparison_markdown(summaries, metrics=("cnr", "miou_percent")):
    """One table with a column pair per model: {"frozen": summary, "tuned": summary} -> Markdown (mIoU in %)."""
    return models_markdown(summaries, metrics, labels=LABELS)
