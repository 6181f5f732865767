"""AUROC of a binary classifier's scores, its bootstrap CI, the mIoU halves and the one-sided high-minus-low test.

Used by the grounded classification experiment (paper App. K, Table 6; grounding/experiment/classify.py): pneumothorax cases
(positives) against "No Finding" images (negatives), AUROC reported overall and in a low and a high half of the
positives split by their heatmap's mIoU, with 95% bootstrap CIs, plus a one-sided test that the high half's AUROC
exceeds the low half's (the paper reports +0.118, p = 0.046 for the tuned heatmaps).

Everything is written with one matrix: C[i, j] = 1 if pos_i > neg_j, 0.5 if equal, 0 if below (the Mann-Whitney
kernel), so AUROC = mean(C). A resample or a bin is a count (or 0/1) vector over positives and one over negatives,
and its AUROC is (w_pos @ C @ w_neg) / (sum w_pos * sum w_neg): exact, tie-aware, and vectorised over 10k resamples.
"""
import numpy as np


def _kernel(pos, neg):
    """(n_pos, n_neg) Mann-Whitney kernel: 1 / 0.5 / 0 for pos above / equal to / below neg."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if pos.ndim != 1 or neg.ndim != 1 or pos.size == 0 or neg.size == 0:
        raise ValueError(f"auroc: need 1-D non-empty positive and negative scores, got {pos.shape} and {neg.shape}")
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("auroc: NaN scores (count and drop them before computing the AUROC)")
    d = pos[:, None] - neg[None, :]
    return (d > 0) + 0.5 * (d == 0)


def auroc(pos, neg):
    """P(score of a random positive > that of a random negative), ties counting one half."""
    return float(_kernel(pos, neg).mean())


def _weighted_auroc(C, w_pos, w_neg):
    """AUROC of (B, n_pos) / (B, n_neg) count vectors over the kernel C: one value per row."""
    num = np.einsum("bi,ij,bj->b", w_pos, C, w_neg)
    return num / (w_pos.sum(1) * w_neg.sum(1))


def bootstrap_auroc(pos, neg, n=10000, alpha=0.05, seed=0):
    """(auroc, lo, hi): percentile bootstrap, positives and negatives resampled separately (stratified, so every
    resample keeps both classes and their sizes)."""
    C = _kernel(pos, neg)
    rng = np.random.default_rng(seed)
    n_pos, n_neg = C.shape
    w_pos = rng.multinomial(n_pos, np.full(n_pos, 1.0 / n_pos), size=n).astype(np.float64)
    w_neg = rng.multinomial(n_neg, np.full(n_neg, 1.0 / n_neg), size=n).astype(np.float64)
    lo, hi = np.quantile(_weighted_auroc(C, w_pos, w_neg), [alpha / 2, 1 - alpha / 2])
    return float(C.mean()), float(lo), float(hi)


def miou_halves(miou):
    """Boolean "high" mask splitting the positives into a low and a high half by mIoU.

    Sorted by mIoU (stable: ties keep the case order); the lower floor(n/2) are "low", the rest "high" (an odd
    count puts the middle case in the high half)."""
    m = np.asarray(miou, dtype=np.float64)
    if m.ndim != 1 or m.size < 2 or np.isnan(m).any():
        raise ValueError(f"miou_halves: need at least 2 finite mIoU values, got {m.size} (NaN: {np.isnan(m).sum()})")
    high = np.zeros(m.size, dtype=bool)
    high[np.argsort(m, kind="stable")[m.size // 2:]] = True
    return high


def bin_aurocs(pos, neg, pos_high, neg_high=None):
    """(auroc_low, auroc_high). neg_high None: every negative is in both bins; else a mask over the negatives."""
    pos, neg, pos_high = np.asarray(pos, float), np.asarray(neg, float), np.asarray(pos_high, bool)
    if neg_high is None:
        return auroc(pos[~pos_high], neg), auroc(pos[pos_high], neg)
    neg_high = np.asarray(neg_high, bool)
    return auroc(pos[~pos_high], neg[~neg_high]), auroc(pos[pos_high], neg[neg_high])


def high_minus_low_test(pos, neg, pos_high, neg_high=None, method="permutation", n=10000, seed=0):
    """One-sided test of AUROC(high half) - AUROC(low half) > 0. Returns (delta, p).

    neg_high: None = every negative in both bins ("all"); a mask = the negatives split with their paired positive
    ("paired": pos_high and neg_high must then be equal, one unit = one positive and its paired negative).
    method "permutation" (default): the bin labels are shuffled over the units (the positives for "all", the
        (positive, negative) pairs for "paired"), keeping the bin sizes; p = (1 + #{delta* >= delta}) / (1 + n),
        the null being that the heatmap's mIoU has nothing to do with how well a case is classified.
    method "bootstrap": positives and negatives are resampled within each bin (stratified), delta* recomputed;
        p = the share of delta* <= 0 (a percentile-bootstrap one-sided p-value).
    """
    C = _kernel(pos, neg)
    pos_high = np.asarray(pos_high, bool)
    n_pos, n_neg = C.shape
    if pos_high.shape != (n_pos,) or pos_high.all() or not pos_high.any():
        raise ValueError(f"high_minus_low_test: pos_high must be a ({n_pos},) mask with both halves non-empty")
    if neg_high is not None:
        neg_high = np.asarray(neg_high, bool)
        if neg_high.shape != (n_neg,) or neg_high.all() or not neg_high.any():
            raise ValueError(f"high_minus_low_test: neg_high must be a ({n_neg},) mask with both halves non-empty")
        if method == "permutation" and not (n_pos == n_neg and np.array_equal(neg_high, pos_high)):
            raise ValueError("high_minus_low_test: a paired permutation test needs negative i paired with positive "
                             "i (equal counts, the same bins)")
    ones = np.ones(n_neg)
    nh = ones if neg_high is None else neg_high.astype(float)
    nl = ones if neg_high is None else (~neg_high).astype(float)
    ph, pl = pos_high.astype(float), (~pos_high).astype(float)
    delta = float(_weighted_auroc(C, ph[None], nh[None])[0] - _weighted_auroc(C, pl[None], nl[None])[0])
    rng = np.random.default_rng(seed)
    if method == "permutation":
        perm_h = np.stack([rng.permutation(pos_high) for _ in range(n)]).astype(float)    # (n, n_pos)
        neg_h = np.broadcast_to(ones, (n, n_neg)) if neg_high is None else perm_h
        neg_l = np.broadcast_to(ones, (n, n_neg)) if neg_high is None else 1 - perm_h
        d = _weighted_auroc(C, perm_h, neg_h) - _weighted_auroc(C, 1 - perm_h, neg_l)
        return delta, float((1 + np.sum(d >= delta - 1e-12)) / (1 + n))
    if method == "bootstrap":
        def resample(mask):   # counts over the full index set, drawn only from the mask's members
            idx = np.flatnonzero(mask)
            w = np.zeros((n, mask.size))
            w[:, idx] = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size), size=n)
            return w
        d = (_weighted_auroc(C, resample(pos_high), resample(nh > 0))
             - _weighted_auroc(C, resample(~pos_high), resample(nl > 0)))
        return delta, float(np.mean(d <= 0))
    raise ValueError(f"high_minus_low_test: method must be 'permutation' or 'bootstrap', got {method!r}")
