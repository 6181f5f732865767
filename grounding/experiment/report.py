"""One self-contained page per evaluation: report.html next to evaluate.py's tables.

Researchers look at heatmaps before they trust a number. The page holds, with no external scripts, styles or images
(every picture is an inline base64 PNG thumbnail):
  - the header (data, weights, prompts, code version);
  - the per-class table with 95% bootstrap CIs for every model evaluated;
  - per class, a grid of overlays for the best and the worst pairs by tuned-minus-frozen mIoU (by the one model's
    mIoU when only one ran): the image with its boxes, then one column per model, plus any extra column a caller
    adds (e.g. the swapped-prompt heatmap of a location-swap test: a Column with its own prompt function).
Columns compute heatmaps only for the few pairs shown, all columns from one inversion per image batch, so the page
costs a handful of extra inversions. evaluate.py and train.py's final table both write it: write_evaluation_report.
"""
import base64
import html
import io
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from grounding.data.images import load_image


@dataclass
class Column:
    name: str                                   # column header, e.g. "frozen", "tuned", "swapped"
    heatmaps: Callable                          # list of pairs -> list of (H, W) ORIGINAL-frame heatmaps (NaN = pad)
    prompt: Optional[Callable] = None           # pair -> the prompt this column used (default pair["prompt"])


def model_columns(pipe, models, batch=16, swap=False):
    """The report's Columns for the models an evaluation scored, [(name, HeatmapConfig, prompts or None)]: one per
    model and, with swap, the last model's map of the left/right-swapped prompt. Every column's heatmaps come from
    ONE inversion per image batch (grounding/heatmap.py extract_heatmaps_shared), computed on the first column's
    request and kept for the others."""
    from grounding.experiment.swap import swap_sides
    from grounding.heatmap import extract_heatmaps_shared
    from grounding.data.images import preprocess
    from grounding.geometry import to_original

    specs = [(name, hcfg, prompts, None) for name, hcfg, prompts in models]
    if swap:
        name, hcfg, prompts = models[-1]
        specs.append((f"{name}, swapped prompt", hcfg, prompts, lambda p: swap_sides(p["prompt"])))
    done = {}                                   # pair ids -> [column][pair] original-frame heatmaps

    def heatmaps(pairs, k):
        key = tuple(p["pair_id"] for p in pairs)
        if key not in done:
            done[key] = [[] for _ in specs]
            for s in range(0, len(pairs), batch):
                chunk = pairs[s:s + batch]
                images = torch.stack([preprocess(p["image_path"], pipe.image) for p in chunk])
                variants = [([(text or (lambda p: p["prompt"]))(p) for p in chunk], prompts, [hcfg])
                            for _, hcfg, prompts, text in specs]
                for c, (maps,) in enumerate(extract_heatmaps_shared(pipe, images, variants)):   # (B, S, S) each
                    done[key][c] += [to_original(h, p["image_width"], p["image_height"]) for p, h in zip(chunk, maps)]
        return done[key][k]
    return [Column(name, lambda pairs, k=k: heatmaps(pairs, k), text) for k, (name, _, _, text) in enumerate(specs)]


def write_evaluation_report(path, pipe, header, models, summaries, rows, pairs, batch=16, swap=False, n_show=2,
                            title="Phrase grounding"):
    """report.html of an evaluation (evaluate.py and train.py's final table): the header, the tables and, per
    class, the best and worst pairs under every model in `models` [(name, HeatmapConfig, prompts)] (+ the swapped
    prompt's column with swap). Returns the page's size in bytes."""
    return write_report(path, header, summaries, rows, pairs, model_columns(pipe, models, batch, swap),
                        n_show=n_show, title=title)


# ---------------------------------------------------------------------------------------------------------
# pictures


def overlay(pair, heatmap=None, thumb=160):
    """The original image, downscaled to `thumb` pixels wide, with the heatmap in red (if given) and the boxes in
    green -> base64 PNG string."""
    grey = load_image(pair["image_path"])
    rgb = np.stack([grey * 255] * 3, -1).astype(np.float32)
    if heatmap is not None:
        hm = torch.nan_to_num(heatmap.float(), nan=0.0).numpy()
        rgb[..., 0] = np.clip(rgb[..., 0] * 0.6 + 255 * hm * 0.7, 0, 255)
        rgb[..., 1:] *= 0.6 + 0.4 * (1 - hm[..., None])
    im = Image.fromarray(rgb.astype(np.uint8))
    scale = thumb / im.width
    im = im.resize((thumb, max(1, round(im.height * scale))), Image.LANCZOS)
    draw = ImageDraw.Draw(im)
    for x, y, w, h in pair["boxes"]:
        draw.rectangle([x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1], outline=(0, 255, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64, alt):
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


# ---------------------------------------------------------------------------------------------------------
# selection and tables


def select_pairs(pairs, rows, n_show=2, a="tuned", b="frozen"):
    """{class: [(pair, tag, delta)]}: per class the n_show best and n_show worst pairs by mIoU(a) - mIoU(b)
    (by mIoU of the only model when one ran); tag "best" / "worst"."""
    names = [m for m in (a, b) if m in rows]
    if not names:
        names = list(rows)[:1]
    by_id = [{r["pair_id"]: r for r in rows[m]} for m in names]
    out = {}
    for c in sorted({p["category"] for p in pairs}):
        scored = []
        for p in pairs:
            if p["category"] != c or any(p["pair_id"] not in d for d in by_id):
                continue
            v = [d[p["pair_id"]]["miou_percent"] for d in by_id]
            scored.append((v[0] - v[1] if len(v) == 2 else v[0], p))
        scored.sort(key=lambda x: x[0], reverse=True)
        best = scored[:n_show]
        worst = [s for s in scored[::-1][:n_show] if s not in best]
        out[c] = [(p, "best", d) for d, p in best] + [(p, "worst", d) for d, p in worst]
    return out


def summary_html(summaries, metrics=("cnr", "miou_percent", "auc", "pointing")):
    """Per-class table, one column per (model, metric): "mean [lo, hi]", mIoU in %."""
    names = list(summaries)
    classes = list(next(iter(summaries.values())))
    label = {"miou_percent": "mIoU %"}
    head = "".join(f"<th>{html.escape(label.get(m, m))}<br>{html.escape(n)}</th>" for n in names for m in metrics)
    lines = [f'<table class="summary"><tr><th>class</th><th>n</th>{head}</tr>']
    for c in classes:
        cells = []
        for n in names:
            for m in metrics:
                if m not in summaries[n][c]:
                    cells.append("<td>-</td>")
                    continue
                mean, lo, hi = summaries[n][c][m]
                cells.append(f"<td>{mean:.2f} <small>[{lo:.2f}, {hi:.2f}]</small></td>")
        lines.append(f"<tr><td>{html.escape(str(c))}</td><td>{summaries[names[0]][c]['n']}</td>{''.join(cells)}</tr>")
    return "\n".join(lines + ["</table>"])


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}pre{background:#f4f4f4;padding:.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top}
table.grid td{text-align:center}table.grid img{display:block;margin:auto}small{color:#666}"""


def write_report(path, header, summaries, rows, pairs, columns, n_show=2, thumb=160, title="Phrase grounding"):
    """Write the page. summaries {model: summarise() output}; rows {model: per-pair rows}; pairs the evaluated
    grounding pairs; columns a list of Column (models first, extra columns after). Returns the page's size in bytes."""
    chosen = select_pairs(pairs, rows, n_show)
    flat = [p for c in chosen.values() for p, _, _ in c]
    maps = {col.name: dict(zip([p["pair_id"] for p in flat], col.heatmaps(flat))) for col in columns}
    miou = {m: {r["pair_id"]: r["miou_percent"] for r in rs} for m, rs in rows.items()}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             f"<pre>{html.escape(header)}</pre>", "<h2>Per-class results (95% bootstrap CIs)</h2>",
             summary_html(summaries)]
    for c, items in chosen.items():
        parts.append(f"<h2>{html.escape(str(c))}</h2><table class='grid'><tr><th>pair</th><th>image + boxes</th>"
                     + "".join(f"<th>{html.escape(col.name)}</th>" for col in columns) + "</tr>")
        for p, tag, delta in items:
            cells = [f"<td>{tag}<br><small>{html.escape(p['pair_id'])}<br>&Delta;mIoU {delta:+.1f}</small></td>",
                     f"<td>{_img(overlay(p, None, thumb), 'image')}<small>{html.escape(p['prompt'])}</small></td>"]
            for col in columns:
                text = col.prompt(p) if col.prompt else p["prompt"]
                score = miou.get(col.name, {}).get(p["pair_id"])
                note = f"<br>mIoU {score:.1f}%" if score is not None else ""
                cells.append(f"<td>{_img(overlay(p, maps[col.name][p['pair_id']], thumb), col.name)}"
                             f"<small>{html.escape(text)}{note}</small></td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    page = "\n".join(parts).encode("utf-8")
    with open(path, "wb") as f:
        f.write(page)
    return len(page)
