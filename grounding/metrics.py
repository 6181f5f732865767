"""Phrase-grounding metrics: CNR, mIoU, pixel AUC-ROC (exact and 5-threshold binned), pointing game (per image;
bootstrap CIs and the tables are grounding/experiment/tables.py).

Mirrors the evaluation protocol of Vilouras et al. (MIDL 2026, Sec. 4.2) and of its predecessor (Vilouras et al.,
JBHI 2024), whose public evaluation code fixes the conventions the paper leaves open. Three protocols
(config key `metric_protocol`; README "Metric conventions"):
- "reference" (default): the predecessor code's conventions. CNR scores the boxes one after another on ONE copy of
  the map in which every box already scored is set to NaN (box k's background leaves out boxes 1..k, its inside
  loses the pixels of boxes 1..k-1); an undefined value (0/0, a box with no valid pixel) counts as 0 and is
  averaged in. The mIoU target is the union of the boxes over ALL pixels, so box pixels in the NaN band count as
  misses.
- "per_box": every box against all valid pixels outside THAT box, averaged; mIoU target = valid box pixels.
- "union": every box against the valid pixels outside ALL boxes; mIoU as "per_box".

Conventions shared by every metric here:
- `heatmap` is an (H, W) float tensor in [0, 1]; NaN pixels (the padding added when a square model-frame
  heatmap is mapped back to a non-square original image) carry no score.
- `boxes` is a list of (x, y, w, h) pixel boxes covering rows [y:y+h] and columns [x:x+w]. Float
  coordinates are rounded to the nearest pixel edge and clipped to the image.
"""
import math

import numpy as np
import torch

PAPER_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)   # mIoU binarisation thresholds (paper Sec. 4.2)
PROTOCOLS = ("reference", "per_box", "union")  # metric_protocol values; "reference" = the predecessor's code
FLOAT32_MAX = float(np.finfo(np.float32).max)  # what the reference's torch.nan_to_num makes of +-inf (x / 0)


# ---------------------------------------------------------------------------------------------------------
# masks


def _check_heatmap(heatmap):
    if not torch.is_tensor(heatmap) or heatmap.dim() != 2:
        raise ValueError(f"heatmap must be an (H, W) tensor, got {type(heatmap).__name__} "
                         f"{tuple(getattr(heatmap, 'shape', ()))}")
    return heatmap.detach().float().cpu()


def box_edges(box, shape):
    """Pixel edges (x0, y0, x1, y1) of an (x, y, w, h) box in an (H, W) image: columns x0..x1-1, rows y0..y1-1.

    The edges (not the size) are rounded so a box keeps its true extent, then clipped to the image.
    """
    H, W = shape
    x, y, w, h = (float(v) for v in box)
    return (max(int(round(x)), 0), max(int(round(y)), 0), min(int(round(x + w)), W), min(int(round(y + h)), H))


def box_mask(box, shape, allow_empty=False):
    """Boolean (H, W) mask of one (x, y, w, h) box; raises if the box has no pixel inside the image.

    allow_empty=True (the reference protocol, whose slicing yields an empty region) returns an all-False mask
    for a zero-sized box or one outside the image instead; negative sizes are an error either way.
    """
    H, W = shape
    if len(box) != 4:
        raise ValueError(f"box {box!r}: expected (x, y, w, h)")
    x, y, w, h = (float(v) for v in box)
    if w < 0 or h < 0 or (not allow_empty and (w == 0 or h == 0)):
        raise ValueError(f"box {box!r}: width and height must be positive")
    x0, y0, x1, y1 = box_edges(box, shape)
    if x1 <= x0 or y1 <= y0:
        if allow_empty:
            return torch.zeros(H, W, dtype=torch.bool)
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


def _check_protocol(protocol, fn):
    if protocol not in PROTOCOLS:
        raise ValueError(f"{fn}: protocol (config key metric_protocol) must be one of {PROTOCOLS}, got {protocol!r}")


def _contrast(a, b, signed):
    """(mu_a - mu_b) / sqrt(var_a + var_b) with POPULATION variances; NaN if a region is empty or 0/0, +-inf x/0."""
    if a.numel() == 0 or b.numel() == 0:
        return float("nan")
    diff = (a.mean() - b.mean()).item()
    denom = math.sqrt((a.var(unbiased=False) + b.var(unbiased=False)).item())
    if not signed:
        diff = abs(diff)
    if denom > 0:
        return diff / denom
    return float("nan") if diff == 0 else math.copysign(math.inf, diff)


def cnr(heatmap, boxes, signed=True, protocol="reference"):
    """Contrast-to-noise ratio (mu_in - mu_out) / sqrt(var_in + var_out) per box, averaged over the boxes.

    The variances are POPULATION variances (divide by n, as in the predecessor code).
    signed=True is what the paper reports (negative when the map is brighter outside the box; the predecessor
    code's non_absolute=True); signed=False takes |mu_in - mu_out| (its default).
    protocol (see the module docstring and README "Metric conventions"):
      "reference": boxes in the given order on ONE copy of the map; after a box is scored its pixels become NaN,
          so box k's background excludes boxes 1..k and its inside loses the pixels of boxes 1..k-1 (the order
          matters). A 0/0, an empty region or a box with no valid pixel gives 0, averaged in; x/0 gives
          +-FLOAT32_MAX (torch.nan_to_num in the reference; it needs both regions exactly constant).
      "per_box": background of a box = every valid pixel outside THAT box; NaN for a constant map.
      "union": background = every valid pixel outside ALL boxes; NaN for a constant map.
      In "per_box" / "union" a box without a valid pixel (it lies in the NaN band) cannot be scored and is left
      out of the mean; NaN if no box is left.
    """
    hm = _check_heatmap(heatmap)
    _check_protocol(protocol, "cnr")
    if len(boxes) == 0:
        raise ValueError("cnr: no boxes given: every grounding pair needs at least one box")
    values = []
    if protocol == "reference":
        work = hm.double().clone()
        for box in boxes:
            inside = box_mask(box, hm.shape, allow_empty=True)
            a = work[inside]
            a = a[~torch.isnan(a)]
            work[inside] = float("nan")                    # scored: no longer background for the next boxes
            v = _contrast(a, work[~torch.isnan(work)], signed)
            values.append(0.0 if math.isnan(v) else max(-FLOAT32_MAX, min(FLOAT32_MAX, v)))
        return float(np.mean(values))
    valid = ~torch.isnan(hm)
    union = union_mask(boxes, hm.shape)
    for box in boxes:
        inside = box_mask(box, hm.shape)
        out = ~(union if protocol == "union" else inside) & valid
        inside = inside & valid
        if inside.sum() == 0:
            continue                                       # wholly in the NaN band: nothing to score
        v = _contrast(hm[inside].double(), hm[out].double(), signed)
        values.append(v if math.isfinite(v) else float("nan"))    # zero variance: undefined
    return float(np.mean(values)) if values else float("nan")


def miou(heatmap, boxes, thresholds=PAPER_THRESHOLDS, protocol="reference"):
    """Mean over thresholds of IoU(heatmap > thr, union of boxes).

    Binarisation uses a strict `>` (a pixel equal to the threshold is background); NaN pixels are never predicted.
    protocol "reference": the target is the union of the boxes over ALL pixels, so box pixels in the NaN band
    count as misses (an IoU of 0/0, possible only with empty boxes, is 0). "per_box" / "union": the target is the
    valid (non-NaN) box pixels only; NaN if the boxes cover no valid pixel.
    """
    hm = _check_heatmap(heatmap)
    _check_protocol(protocol, "miou")
    valid = ~torch.isnan(hm)
    if protocol == "reference":
        if len(boxes) == 0:
            raise ValueError("miou: no boxes given: every grounding pair needs at least one box")
        gt = torch.zeros(hm.shape, dtype=torch.bool)
        for box in boxes:
            gt |= box_mask(box, hm.shape, allow_empty=True)
    else:
        gt = union_mask(boxes, hm.shape) & valid
        if gt.sum() == 0:
            return float("nan")
    ious = []
    for thr in thresholds:
        pred = (hm > thr) & valid          # NaN > thr is False anyway; & valid states it
        inter = (pred & gt).sum().item()
        union = (pred | gt).sum().item()
        ious.append(inter / union if union else 0.0)
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


def auc_binned5(heatmap, boxes):
    """The predecessor's pixel AUC-ROC: binned at 5 levels (0, .25, .5, .75, 1), for comparison.

    Same numbers as torcheval's binary_binned_auroc(scores, labels, threshold=5) on the flattened map: a pixel
    is called positive at level t when score >= t; the ROC runs through (0, 0) and the (FP, TP) counts from
    t = 1 down to t = 0 (trapezoids), normalised by the counts at t = 0, so NaN pixels (never >= 0) drop out.
    0.5 when either class is empty at t = 0. Coarser than `auc_roc` (exact); reported for comparison only.
    """
    hm = _check_heatmap(heatmap)
    target = torch.zeros(hm.shape, dtype=torch.bool)
    for box in boxes:
        target |= box_mask(box, hm.shape, allow_empty=True)
    tp, fp = [0], [0]
    for t in torch.linspace(0, 1, 5).flip(0):               # float32 levels, highest first
        pred = hm >= t
        tp.append(int((pred & target).sum()))
        fp.append(int((pred & ~target).sum()))
    if tp[-1] * fp[-1] == 0:
        return 0.5
    area = sum((fp[i] - fp[i - 1]) * (tp[i] + tp[i - 1]) / 2.0 for i in range(1, len(tp)))
    return float(area / (tp[-1] * fp[-1]))


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
