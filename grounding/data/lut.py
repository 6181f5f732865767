"""The anatomy LUT as a file: save_lut writes it (JSON, atomically), load_lut reads it back and checks every entry.

The LUT itself (27 locations -> Gaussians in the 512x512 frame, paper Sec. 3.1) is built by grounding/anatomy.py
`build_lut`; this file only stores it (docs/formats.md: {"frame": 512, "lut": {location: [[mu_x, mu_y, sigma_x,
sigma_y], ...]}, ...provenance}, or a bare {location: [...]} dict).
"""
import json
import math
import os

from grounding.anatomy import FRAME, LOCATIONS


def save_lut(lut, path, **provenance):
    """Write the LUT as JSON (docs/formats.md: {location: [[mu_x, mu_y, sigma_x, sigma_y], ...]}, 512 frame).

    provenance: extra JSON keys kept beside it (e.g. source, boxes_per_region); load_lut ignores them."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"      # written whole, then renamed: a reader never sees half a LUT
    with open(tmp, "w") as f:
        json.dump({"frame": FRAME, "lut": lut, **provenance}, f, indent=1)
    os.replace(tmp, path)


def _is_gaussian(g):
    """[mu_x, mu_y, sigma_x > 0, sigma_y > 0]: four finite numbers."""
    return (isinstance(g, list) and len(g) == 4 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in g) and
            g[2] > 0 and g[3] > 0)


def load_lut(path):
    """Read a LUT written by save_lut (or a bare {location: [...]} dict) and check every entry."""
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError, or bytes that are not text
        raise ValueError(f"{path}: not a JSON LUT ({e}); delete it to rebuild the LUT from the gold boxes") from None
    lut = data.get("lut", data) if isinstance(data, dict) else None
    frame = data.get("frame", FRAME) if isinstance(data, dict) else FRAME
    if frame != FRAME:  # every consumer (jitter, rendering, the VinDr match) assumes the 512 frame
        raise ValueError(f"{path}: LUT in a {frame}-px frame, expected {FRAME}; rebuild it with anatomy.build_lut")
    if not isinstance(lut, dict):
        raise ValueError(f"{path}: expected a JSON object {{location: [[mu_x, mu_y, sigma_x, sigma_y], ...]}}")
    for loc, gs in lut.items():
        if not isinstance(gs, list) or not gs or not all(_is_gaussian(g) for g in gs):
            raise ValueError(f"{path}: entry {loc!r} must be a non-empty list of [mu_x, mu_y, sigma_x>0, sigma_y>0] "
                             f"(four finite numbers each), got {gs!r}; delete the file to rebuild the LUT from the "
                             "gold boxes")
    missing = [loc for loc in LOCATIONS if loc not in lut]
    if missing:
        raise ValueError(f"{path}: LUT lacks locations {missing}; rebuild it with anatomy.build_lut")
    return {loc: [[float(v) for v in g] for g in gs] for loc, gs in lut.items()}
