"""What ground.py writes per image: maps as .npy (original frame), overlays, a grid picture and result.json.

    <out>/<image>/result.json                 every setting, the words and their tokens, per map: peak, side shares,
                                              CNR / mIoU against --box, the files
    <out>/<image>/<reading>/phrase.npy|.png   the phrase map (frozen / untuned / tuned readings, grounder.py)
    <out>/<image>/<reading>/word2-lower.npy   one per word (word index in the prompt, from 1), and on request per
                                              token (word2-token1-...) and special token (special-eos, ...)
    <out>/<image>/<reading>/swapped/...       the same for the left/right-swapped prompt
    <out>/<image>/grid.png                    readings x prompts as rows, the phrase and each word as columns

A .npy is float32 in the ORIGINAL frame: the model's centre crop mapped back (grounding/geometry.py to_original),
NaN where the crop cut the image away (--npy model: the S x S model-frame map instead, placed by result.json's
crop_window). Overlays use the same colour scale as the viewer (jet, 0 = blue, 1 = red), at most 1024 pixels
on the long side.
"""
import json
import os
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from grounding.geometry import to_original
from grounding.experiment.grounder import describe

OVERLAY_MAX = 1024      # long side of an overlay PNG, pixels
TILE = 150              # height of a grid tile, pixels


def jet(v):
    """Values in [0, 1] (..., ) -> RGB in [0, 1] (..., 3): the classic jet scale (blue, cyan, yellow, red); the
    viewer's JavaScript computes the same three lines."""
    v = np.clip(v, 0.0, 1.0)[..., None]
    return np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def overlay(grey, heatmap, alpha=0.5, box=None, scale=1.0):
    """grey (H, W) in [0, 1] + heatmap (H, W) (NaN = no map) -> RGB PIL image scaled by `scale`, box in green."""
    rgb = np.repeat(grey[..., None], 3, -1)
    if heatmap is not None:
        hm = np.asarray(heatmap, dtype=np.float32)
        valid = ~np.isnan(hm)
        rgb[valid] = (1 - alpha) * rgb[valid] + alpha * jet(hm[valid])
    im = Image.fromarray((rgb * 255).round().astype(np.uint8))
    if scale != 1.0:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    if box is not None:
        x, y, w, h = (v * scale for v in box)
        ImageDraw.Draw(im).rectangle([x, y, x + w - 1, y + h - 1], outline=(0, 255, 0), width=max(1, round(scale)))
    return im


def font(size=13):
    """PIL's built-in font at `size` (the labels of every picture the project draws: grids, figures, sample sheets)."""
    try:
        return ImageFont.load_default(size=size)     # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError):                     # older Pillow, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def stem(unit):
    """File name (no extension) of a unit's map."""
    text = unit.name.split(":")[-1] if unit.kind == "token" else (unit.text or unit.name)
    slug = re.sub(r"[^a-z0-9]+", "-", text.replace("</w>", "").lower()).strip("-") or "x"
    if unit.kind == "phrase":
        return "phrase"
    if unit.kind == "special":
        return "special-" + unit.name.strip("<>")
    if unit.kind == "token":
        j = int(unit.name.split("[")[1].split("]")[0])
        return f"word{unit.word + 1}-token{j + 1}-{slug}"
    return f"word{unit.word + 1}-{slug}"


def write_image_outputs(folder, image, pw, result, reads, npy="original"):
    """Write one image's maps (npy + overlay PNGs) and grid.png under `folder`.

    image: {"grey": (H, W) array in [0, 1], "width", "height", "box": (x, y, w, h) or None}; pw: its PromptWords;
    result: its grounder.ground_batch entry. Returns {(reading, which, unit name): grounder.describe's numbers +
    the files written (paths relative to folder)}."""
    W, H, box = image["width"], image["height"], image["box"]
    scale = min(1.0, OVERLAY_MAX / max(W, H))
    entries = {}
    for (reading, which), maps in result["maps"].items():
        sub = os.path.join(reading, "swapped") if which == "swapped" else reading
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        p = pw if which == "prompt" else pw.swapped
        for unit in p.units:
            if unit.name not in maps:
                continue
            full = to_original(maps[unit.name], W, H)                  # (H, W), NaN outside the crop
            entry = describe(maps[unit.name], full, W, H, box, p.side)
            base = os.path.join(sub, stem(unit))
            if npy != "none":
                arr = maps[unit.name] if npy == "model" else full
                np.save(os.path.join(folder, base + ".npy"), arr.numpy().astype(np.float32))
                entry["npy"] = base + ".npy"
            overlay(image["grey"], full.numpy(), box=box, scale=scale).save(os.path.join(folder, base + ".png"),
                                                                            compress_level=1)   # speed over size
            entry["png"] = base + ".png"
            entries[(reading, which, unit.name)] = entry
    grid(image, pw, result, reads, entries).save(os.path.join(folder, "grid.png"), compress_level=1)
    return entries


def note(entry):
    """The one line a grid tile carries: CNR / mIoU against the box, else the share on the named side, else the
    side of the peak."""
    if "cnr" in entry:
        return f"CNR {entry['cnr']:.2f}  mIoU {entry['miou_percent']:.0f}%"
    if "named side" in entry["mass_share"]:
        return f"named side {entry['mass_share']['named side']:.2f}"
    return f"peak: {entry['peak']['side']}"


def grid(image, pw, result, reads, entries):
    """Rows: each reading for the prompt (and for the swapped prompt); columns: the image, the phrase, each word.
    Under each tile its note(); a colour bar closes the picture."""
    W, H = image["width"], image["height"]
    s = TILE / H
    tw = max(1, round(W * s))
    small_grey = np.asarray(Image.fromarray((image["grey"] * 255).astype(np.uint8)).resize((tw, TILE), Image.BILINEAR),
                            dtype=np.float32) / 255
    box = None if image["box"] is None else tuple(v * s for v in image["box"])
    f, small = font(13), font(11)
    rows = [(r, w) for w in ("prompt", "swapped") for r in reads if (r.name, w) in result["maps"]]
    cols = ["image", "phrase"] + [u.name for u in pw.words()]
    label_w, head_h, foot_h, col_w = 200, 22, 34, max(tw, 120) + 6
    sheet = Image.new("RGB", (label_w + len(cols) * col_w, head_h + len(rows) * (TILE + 18) + foot_h), "white")
    d = ImageDraw.Draw(sheet)
    for j, c in enumerate(cols):
        d.text((label_w + j * col_w + 2, 4), c[:col_w // 7], fill="black", font=f)
    for i, (r, which) in enumerate(rows):
        y0 = head_h + i * (TILE + 18)
        p = pw if which == "prompt" else pw.swapped
        d.text((4, y0 + 4), r.name + (", swapped prompt" if which == "swapped" else ""), fill="black", font=f)
        d.text((4, y0 + 22), _wrap(p.text, 30), fill=(60, 60, 60), font=small)
        d.text((4, y0 + TILE - 14), f"layers {r.cfg.resolved_layers()}" + (" + Otsu" if r.cfg.resolved_otsu() else ""),
               fill=(60, 60, 60), font=small)
        names = ["phrase"] + [u.name for u in p.words()]
        sheet.paste(overlay(small_grey, None, box=box), (label_w, y0))
        for j, name in enumerate(names, start=1):
            if name not in result["maps"][(r.name, which)]:
                continue
            x0 = label_w + j * col_w
            tile_map = to_original(result["maps"][(r.name, which)][name], tw, TILE).numpy()   # the tile's frame
            sheet.paste(overlay(small_grey, tile_map, box=box), (x0, y0))
            if name != cols[j]:   # the swapped prompt's word in this column ("left" under "right")
                d.text((x0 + 3, y0 + 2), name, fill="white", font=small, stroke_width=2, stroke_fill="black")
            d.text((x0 + 2, y0 + TILE + 2), note(entries[(r.name, which, name)]), fill="black", font=small)
    # the colour scale: every map is min-max normalised to [0, 1] (grounding/heatmap.py)
    y0, bar_w = sheet.height - foot_h + 8, 200
    bar = (jet(np.linspace(0, 1, bar_w))[None].repeat(10, 0) * 255).astype(np.uint8)
    sheet.paste(Image.fromarray(bar), (label_w, y0))
    d.text((label_w - 12, y0 - 2), "0", fill="black", font=small)
    d.text((label_w + bar_w + 4, y0 - 2), "1   heatmap, each map min-max normalised; green: the --box",
           fill="black", font=small)
    return sheet


def _wrap(text, n):
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > n:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join((lines + [line])[:4])


def write_json(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)
