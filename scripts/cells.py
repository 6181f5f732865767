"""Run a percent-cell script (`# %%` code cells, `# %% [markdown]` prose cells: the format Jupyter and VS Code open
as a notebook) cell by cell, and write it out as one Markdown page: each prose cell's text, each code cell's source,
what it printed and the figures it saved. tour.py -> docs/tour.md is its one user:

    python tour.py [--fast] [--out DIR]          # DIR/tour.md and DIR/tour/*.png (default DIR: docs)

The cells run in one namespace, as a notebook's do, with FAST and OUT set in it; a traceback points at the script's
own line numbers. Figures are drawn with PIL (`figure`), so no plotting package is needed.
"""
import argparse
import contextlib
import io
import os
import re
import sys

import numpy as np
from PIL import Image, ImageDraw

_SAVED = []  # (file name, caption) of the figures the running cell saved


def split_cells(source):
    """[(kind "code" | "markdown", first line number, text)] of a percent-cell script (text before the first cell
    marker is left out)."""
    cells, lines = [], source.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("# %%")] + [len(lines)]
    for a, b in zip(starts, starts[1:]):
        kind = "markdown" if "[markdown]" in lines[a] else "code"
        cells.append((kind, a + 2, "\n".join(lines[a + 1:b]).strip("\n")))
    return cells


def figure(name, rows, caption, out="docs", labels=None, scale=3):
    """Save a grid of (H, W) arrays in [0, 1] (grey) or (H, W, 3) RGB uint8 tiles as out/tour/<name>.png, with one
    label above each column; the page shows it with its caption."""
    tiles = [[Image.fromarray(t if t.dtype == np.uint8 else (np.clip(t, 0, 1) * 255).astype(np.uint8)) for t in r]
             for r in rows]
    tiles = [[t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in r] for r in tiles]
    w, h, pad, head = max(t.width for r in tiles for t in r), max(t.height for r in tiles for t in r), 4, 14
    cols = max(len(r) for r in tiles)
    sheet = Image.new("RGB", (cols * (w + pad) + pad, head + len(tiles) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(labels or []):
        draw.text((pad + c * (w + pad), 2), str(label)[:w // 6], fill=(0, 0, 0))
    for r, row in enumerate(tiles):
        for c, t in enumerate(row):
            sheet.paste(t.convert("RGB"), (pad + c * (w + pad), head + pad + r * (h + pad)))
    os.makedirs(os.path.join(out, "tour"), exist_ok=True)
    sheet.save(os.path.join(out, "tour", f"{name}.png"))
    _SAVED.append((f"{name}.png", caption))


class _Tee(io.StringIO):
    """Keeps what a cell prints and still shows it on the terminal."""

    def write(self, s):
        sys.__stdout__.write(s)
        return super().write(s)


def run_cells(path, argv=()):
    """Run the cells of `path` with the command line `argv`, write OUT/<name>.md; returns 0 (for sys.exit)."""
    p = argparse.ArgumentParser(prog=os.path.basename(path), description="run the cells, write OUT/<name>.md")
    p.add_argument("--fast", action="store_true", help="the short run the tests use (fewer steps)")
    p.add_argument("--out", default="docs", help="folder of <name>.md and its figures (default: docs)")
    args = p.parse_args(argv)
    out = args.out
    ns = {"__name__": "cells", "FAST": args.fast, "OUT": out}
    page = []
    for kind, line, text in split_cells(open(path, encoding="utf-8").read()):
        if kind == "markdown":
            page.append(re.sub(r"^# ?", "", text, flags=re.M))
            continue
        if "run_cells(" in text:    # the cell that started this run
            continue
        _SAVED.clear()
        printed = _Tee()
        with contextlib.redirect_stdout(printed):
            exec(compile("\n" * (line - 1) + text, path, "exec"), ns)
        page.append(f"```python\n{text}\n```")
        if printed.getvalue().strip():
            page.append(f"```\n{printed.getvalue().rstrip()}\n```")
        page += [f"![{cap}](tour/{name})\n\n*{cap}*" for name, cap in _SAVED]
    name = os.path.splitext(os.path.basename(path))[0]
    with open(os.path.join(out, f"{name}.md"), "w", encoding="utf-8") as f:
        script = os.path.basename(path)
        f.write(f"<!-- written by `python {script}`: edit {script}, not this page -->\n\n" + "\n\n".join(page) + "\n")
    return 0
