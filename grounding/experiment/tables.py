"""Bootstrap confidence intervals, per-class summaries and the paper's Markdown tables, from the per-pair rows of an
evaluation (grounding/experiment/evaluation.py) or of the location-swap test (swap.py)."""
import math

import numpy as np


def bootstrap_ci(values, n=10000, alpha=0.05, seed=0):
    """Percentile bootstrap of the mean: (mean, lo, hi) with a (1 - alpha) interval from n resamples.

    NaN values are dropped (a constant heatmap has NaN CNR); (nan, nan, nan) when nothing is left.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n, v.size))     # n resamples with replacement
    means = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)


def summarise(rows, metric_names, class_key="category", n=10000, alpha=0.05, seed=0):
    """Per-class means with bootstrap CIs and the class-averaged "Average" row (the paper's tables).

    rows: iterable of dicts holding `class_key` and each metric name.
    Returns {class: {"n": count, metric: (mean, lo, hi), ..., "dropped": {metric: NaN values}}, ..., "Average": {...}}
    with classes sorted. NaN values (e.g. the CNR of a constant map) are left out of a mean and counted in
    "dropped"; a class with no finite value of a metric gets (nan, nan, nan) there and is left out of its Average.
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
        out[c] = {"n": len(sub), "dropped": {}}
        for m in metric_names:
            vals = np.array([r[m] for r in sub], dtype=np.float64)
            per_class[(c, m)] = vals[~np.isnan(vals)]
            out[c]["dropped"][m] = int(np.isnan(vals).sum())
            out[c][m] = bootstrap_ci(vals, n=n, alpha=alpha, seed=seed)
    avg = {"n": len(rows), "dropped": {m: sum(out[c]["dropped"][m] for c in classes) for m in metric_names}}
    rng = np.random.default_rng(seed)
    for m in metric_names:
        scored = [c for c in classes if per_class[(c, m)].size]   # classes with at least one finite value
        if not scored:
            avg[m] = (math.nan, math.nan, math.nan)
            continue
        mean = float(np.mean([out[c][m][0] for c in scored]))
        boot = np.zeros(n)
        for c in scored:
            v = per_class[(c, m)]
            boot += v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
        boot /= len(scored)
        lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
        avg[m] = (mean, float(lo), float(hi))
    out["Average"] = avg
    return out


def summary_markdown(summary, metric_names, labels=None, scale=None):
    """Markdown table of `summarise` output: one row per class, "mean [lo, hi]" per metric.

    labels: optional {metric: column label}; scale: optional {metric: factor} (e.g. 100 to print a fraction in %).
    """
    labels, scale = labels or {}, scale or {}
    lines = ["| class | n | " + " | ".join(labels.get(m, m) for m in metric_names) + " |",
             "|---|---|" + "---|" * len(metric_names)]
    for c, row in summary.items():
        cells = []
        for m in metric_names:
            k = scale.get(m, 1.0)
            mean, lo, hi = (x * k for x in row[m])
            dropped = row.get("dropped", {}).get(m, 0)   # NaN values left out of this mean
            cells.append("nan" if math.isnan(mean) else f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"
                         + (f" ({row['n'] - dropped} of {row['n']})" if dropped else ""))
        lines.append(f"| {c} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def models_markdown(summaries, metric_names, labels=None, scale=None):
    """One Markdown table with a column per (model, metric): {"frozen": summary, "tuned": summary} of `summarise`.

    labels: optional {metric: column label}; scale: optional {metric: factor} (e.g. 100 to print a fraction in %).
    """
    labels, scale = labels or {}, scale or {}
    names = list(summaries)
    classes = list(next(iter(summaries.values())))
    head = "| class | n | " + " | ".join(f"{labels.get(m, m)} {n}" for n in names for m in metric_names) + " |"
    lines = [head, "|---|---|" + "---|" * (len(names) * len(metric_names))]
    for c in classes:
        cells = []
        for n in names:
            for m in metric_names:
                k = scale.get(m, 1)
                mean, lo, hi = summaries[n][c][m]
                cells.append(f"{mean * k:.2f} [{lo * k:.2f}, {hi * k:.2f}]")
        lines.append(f"| {c} | {summaries[names[0]][c]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
