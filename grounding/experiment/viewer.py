"""viewer.html: one self-contained page per ground.py run to explore the maps (no file or script fetched).

The page (grounding/experiment/viewer_template.html, its JavaScript inline) shows each image with one canvas per
reading side by side (frozen, untuned, tuned: grounder.py) and selectors for the word (the phrase, each word,
tokens and special tokens when asked for), the prompt (as written, or with left and right swapped), the layer and
the timestep (or "average"), and the opacity. Hovering a pixel ranks the words by their attention there, under
each reading.

What it is given, per image (JSON inside the page):
  maps   the reading's heatmaps as ground.py writes them (min-max, filtered, Otsu for the frozen reading), uint8,
         at most MAP_MAX pixels a side: shown when layer and timestep are both "average";
  raw    per model and prompt, per unit, the token-averaged attention probabilities of every recorded (step,
         layer) at the attention resolution, float32 (T, L, N), NOT normalised: a chosen layer / timestep is drawn
         from them (each map min-max normalised, averaged, normalised again: heatmap_from_maps' steps without the
         filter), and the hover ranking averages them as they are, so that words compare on one scale. The ranking
         is grounder.rank_words' to the last bit (tests/test_viewer.py checks it in Chromium).
  frame  the model frame's parameters (grounding/geometry.py frame_params) to find a pixel's attention cell.
"""
import base64
import html
import io
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from grounding.geometry import crop_window, frame_params

IMAGE_MAX = 420     # displayed image, long side in pixels
MAP_MAX = 128       # heatmaps (the "average" view) are stored at most this many pixels a side
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "viewer_template.html")


def _b64(array):
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _png(grey):
    buf = io.BytesIO()
    Image.fromarray((np.clip(grey, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _small(heatmap):
    """(S, S) heatmap -> uint8 (s, s), s = min(S, MAP_MAX) (antialiased bilinear when shrunk)."""
    h = heatmap.float()
    if h.shape[-1] > MAP_MAX:
        h = F.interpolate(h[None, None], size=(MAP_MAX, MAP_MAX), mode="bilinear", antialias=True,
                          align_corners=False)[0, 0]
    return (h.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def ranked_units(pw):
    """The units the hover ranks: the words, and the special tokens when they were asked for (not the phrase, not
    the tokens of a word: they would repeat it)."""
    return [u.name for u in pw.units if u.kind in ("word", "special")]


def image_entry(name, image, pw, result, reads, size, entries):
    """The page's data for one image (see the file notes)."""
    W, H = image["width"], image["height"]
    scale = min(1.0, IMAGE_MAX / max(W, H)) if max(W, H) > IMAGE_MAX else IMAGE_MAX / max(W, H)
    shown = Image.fromarray((image["grey"] * 255).round().astype(np.uint8))
    shown = shown.resize((max(1, round(W * scale)), max(1, round(H * scale))), Image.BILINEAR)
    sx, sy, left, top = frame_params(W, H, size)
    layers = result["layers"]
    prompts = {}
    for which in ("prompt", "swapped"):
        p = pw if which == "prompt" else pw.swapped
        if p is None or not any(k[1] == which for k in result["maps"]):
            continue
        prompts[which] = {"text": p.text, "units": [{"name": u.name, "kind": u.kind} for u in p.units
                                                     if u.name in result["maps"][(reads[0].name, which)]],
                          "ranked": ranked_units(p)}
    raw = next(iter(next(iter(result["raw"].values())).values()))
    return {
        "name": name, "width": W, "height": H, "scale": shown.width / W, "image": _png(np.asarray(shown) / 255.0),
        "box": list(image["box"]) if image["box"] is not None else None,
        "frame": {"size": size, "sx": sx, "sy": sy, "left": left, "top": top, "crop": list(crop_window(W, H, size))},
        "timesteps": result["timesteps"], "layers": layers, "side": int(round(raw.shape[-1] ** 0.5)),
        "readings": [{"name": r.name, "model": r.model, "about": r.about,
                      "layers": [layers.index(l) for l in r.cfg.resolved_layers()]} for r in reads],
        "prompts": prompts,
        "maps": {f"{r}|{w}": {u: _b64(_small(m)) for u, m in maps.items()} for (r, w), maps in result["maps"].items()},
        "map_side": int(min(size, MAP_MAX)),
        "raw": {f"{m}|{w}": {u: _b64(t.numpy().astype("<f4")) for u, t in units.items()}
                for (m, w), units in result["raw"].items()},
        "notes": {f"{r}|{w}|{u}": _note(e) for (r, w, u), e in entries.items()},
    }


def _note(entry):
    bits = [f"peak ({entry['peak']['x']:g}, {entry['peak']['y']:g}), {entry['peak']['side']}",
            "mass image left / right {:.2f} / {:.2f}".format(*list(entry["mass_share"].values())[:2])]
    if "named side" in entry["mass_share"]:
        bits.append(f"on the named side {entry['mass_share']['named side']:.2f}")
    if "cnr" in entry:
        bits.append(f"CNR {entry['cnr']:.2f}, mIoU {entry['miou_percent']:.1f}%")
    return "; ".join(bits)


def write_viewer(path, title, header, images):
    """Write the page: `images` is a list of image_entry dicts; header: lines naming weights, rows, settings."""
    with open(TEMPLATE, encoding="utf-8") as f:
        page = f.read()
    data = json.dumps({"title": title, "header": header, "images": images}, separators=(",", ":"))
    page = (page.replace("__TITLE__", html.escape(title))
                .replace("__DATA__", data.replace("</", "<\\/")))     # no "</script>" inside the JSON
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(path + ".tmp", path)
    return os.path.getsize(path)
