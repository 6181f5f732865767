"""Phrase-grounding metrics: CNR, mIoU, pixel AUC-ROC, pointing game, bootstrap CIs, per-class summary.

Mirrors the evaluation protocol of Vilouras et al. (MIDL 2026, Sec. 4.2; ../shared/PAPER.md section 7) and
of its predecessor (Vilouras et al., JBHI 2024: CNR per box then averaged, pixel AUC-ROC).

Conventions shared by every metric here:
- `heatmap` is an (H, W) float tensor in [0, 1]; NaN pixels (the padding added when a square model-frame
  heatmap is mapped back to a non-square original image) are ignored everywhere.
- `boxes` is a list of (x, y, w, h) pixel boxes covering rows [y:y+h] and columns [x:x+w]. Float
  coordinates are rounded to the nearest pixel edge and clipped to the image.
"""
import math

import numpy as np
import torch

PAPER_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)   # mIoU binarisation thresholds (paper Sec. 4.2)


# ---------------------------------------------------------------------------------------------------------
# masks


def _check_heatmap(heatmap):
    if not torch.is_tensor(heatmap) or heatmap.dim() != 2:
        raise ValueError(f"heatmap must be an (H, W) tensor, got {type(heatmap).__name__} "
                         f"{tuple(getattr(heatmap, 'shape', ()))}")
    return heatmap.detach().float().cpu()


def box_mask(box, shape):
    """Boolean (H, W) mask of one (x, y, w, h) box; raises if the box has no pixel inside the image."""
    H, W = shape
    if len(box) != 4:
        raise ValueError(f"box {box!r}: expected (x, y, w, h)")
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise ValueError(f"box {box!r}: width and height must be positive")
    # round the edges (not the size) so a box keeps its true extent, then clip to the image
    x0, y0 = max(int(round(x)), 0), max(int(round(y)), 0)
    x1, y1 = min(int(round(x + w)), W), min(int(round(y + h)), H)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box!r} lies outside the {W}x{H} image: fix the box or its transform")
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def union_mask(boxes, shape):
    """Union of the box masks (mIoU, AUC and the pointing game score against the union)."""
    if len(boxes) == 0:
        raise ValueError("no boxes given: every grounding pair needs at least one box")
    mask = torch.zeros(shape, dtype=torch.bool)
    for box in boxes:
        mask |= box_mask(box, shape)
    return mask


# ---------------------------------------------------------------------------------------------------------
# per-image metrics


def cnr(heatmap, boxes, signed=True, outside="box"):
    """Contrast-to-noise ratio (mu_in - mu_out) / sqrt(var_in + var_out), per box, averaged over boxes.

    The variances are POPULATION variances (divide by n, numpy's default, as in the predecessor code).
    signed=True is what the paper reports (negative when the map is brighter outside the box);
    signed=False takes |mu_in - mu_out|.
    outside: "box" (default, predecessor): the background of a box is every valid pixel outside THAT box;
             "union": every valid pixel outside all boxes (other boxes are not counted as background).
    Returns NaN when the denominator is 0 (a constant heatmap).
    """
    hm = _check_heatmap(heatmap)
    if outside not in ("box", "union"):
        raise ValueError(f"cnr: outside must be 'box' or 'union', got {outside!r}")
    valid = ~torch.isnan(hm)
    union = union_mask(boxes, hm.shape)
    values = []
    for box in boxes:
        inside = box_mask(box, hm.shape)
        out = ~(union if outside == "union" else inside) & valid
        inside = inside & valid
        if inside.sum() == 0 or out.sum() == 0:
            raise ValueError(f"cnr: box {box!r} has no valid pixels inside or outside it (all NaN?)")
        a, b = hm[inside].double(), hm[out].double()
        mu_in, mu_out = a.mean(), b.mean()
        var_in, var_out = a.var(unbiased=False), b.var(unbiased=False)   # population variance
        denom = torch.sqrt(var_in + var_out).item()
        diff = (mu_in - mu_out).item()
        if not signed:
            diff = abs(diff)
        values.append(diff / denom if denom > 0 else float("nan"))
    return float(np.mean(values))


def miou(heatmap, boxes, thresholds=PAPER_THRESHOLDS):
    """Mean over thresholds of IoU(heatmap > thr, union of boxes), over valid (non-NaN) pixels.

    Binarisation uses a strict `>` (a pixel equal to the threshold is background).
    """
    hm = _check_heatmap(heatmap)
    valid = ~torch.isnan(hm)
    gt = union_mask(boxes, hm.shape) & valid
    if gt.sum() == 0:
        raise ValueError(f"miou: boxes {boxes!r} cover only NaN pixels")
    ious = []
    for thr in thresholds:
        pred = (hm > thr) & valid          # NaN > thr is False anyway; & valid states it
        inter = (pred & gt).sum().item()
        union = (pred | gt).sum().item()
        ious.append(inter / union)
    return float(np.mean(ious))


def auc_roc(heatmap, boxes):
    """Pixel AUC-ROC of the heatmap as a score for "inside the union of boxes" (NaN pixels dropped).

    Rank-based (Mann-Whitney U): AUC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg),
    with tied scores given their average rank (so ties count one half). NaN if one class is empty.
    """
    hm = _check_heatmap(heatmap)
    valid = ~torch.isnan(hm)
    labels = union_mask(boxes, hm.shape)[valid].numpy()
    scores = hm[valid].double().numpy()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average rank for each run of tied scores (1-based ranks)
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def pointing_game(heatmap, boxes):
    """1.0 if the heatmap's maximum falls inside a box, else 0.0 (NaN pixels ignored).

    With several tied maxima the score is the fraction of them inside the boxes (so a constant map
    scores the box area fraction, not a free hit).
    """
    hm = _check_heatmap(heatmap)
    valid = ~torch.isnan(hm)
    if valid.sum() == 0:
        raise ValueError("pointing_game: the heatmap is all NaN")
    peak = hm[valid].max()
    at_peak = (hm == peak) & valid
    inside = union_mask(boxes, hm.shape)
    return float((at_peak & inside).sum().item() / at_peak.sum().item())


METRICS = {"cnr": cnr, "miou": miou, "auc_roc": auc_roc, "pointing_game": pointing_game}


# ---------------------------------------------------------------------------------------------------------
# confidence intervals and the paper's table


def bootstrap_ci(values, n=10000, alpha=0.05, seed=0):
    """Percentile bootstrap of the mean: (mean, lo, hi) with a (1 - alpha) interval from n resamples.

    NaN values are dropped (a constant heatmap has NaN CNR); raises if nothing is left.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        raise ValueError("bootstrap_ci: no finite values")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n, v.size))     # n resamples with replacement
    means = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)


def summarise(rows, metric_names, class_key="category", n=10000, alpha=0.05, seed=0):
    """Per-class means with bootstrap CIs and the class-averaged "Average" row (the paper's tables).

    rows: iterable of dicts holding `class_key` and each metric name.
    Returns {class: {"n": count, metric: (mean, lo, hi), ...}, ..., "Average": {...}} with classes sorted.
    "Average" = mean of the per-class means (not of all pairs); its CI comes from a stratified bootstrap
    (each class resampled within itself, then the per-class means averaged).
    """
    rows = list(rows)
    classes = sorted({r[class_key] for r in rows})
    if not classes:
        raise ValueError("summarise: no rows")
    out = {}
    per_class = {}
    for c in classes:
        sub = [r for r in rows if r[class_key] == c]
        out[c] = {"n": len(sub)}
        for m in metric_names:
            vals = np.array([r[m] for r in sub], dtype=np.float64)
            per_class[(c, m)] = vals[~np.isnan(vals)]
            out[c][m] = bootstrap_ci(vals, n=n, alpha=alpha, seed=seed)
    avg = {"n": len(rows)}
    rng = np.random.default_rng(seed)
    for m in metric_names:
        mean = float(np.mean([out[c][m][0] for c in classes]))
        boot = np.zeros(n)
        for c in classes:
            v = per_class[(c, m)]
            boot += v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
        boot /= len(classes)
        lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
        avg[m] = (mean, float(lo), float(hi))
    out["Average"] = avg
    return out


def summary_markdown(summary, metric_names, scale=None):
    """Markdown table of `summarise` output: one row per class, "mean [lo, hi]" per metric.

    scale: optional {metric: factor}, e.g. {"miou": 100} to print percentages as the paper does.
    """
    scale = scale or {}
    lines = ["| class | n | " + " | ".join(metric_names) + " |",
             "|---|---|" + "---|" * len(metric_names)]
    for c, row in summary.items():
        cells = []
        for m in metric_names:
            k = scale.get(m, 1.0)
            mean, lo, hi = (x * k for x in row[m])
            cells.append("nan" if math.isnan(mean) else f"{mean:.2f} [{lo:.2f}, {hi:.2f}]")
        lines.append(f"| {c} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
