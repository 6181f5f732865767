"""The anatomy vocabulary of the paper and its location -> Gaussian look-up table (LUT).

Mirrors Vilouras et al., MIDL 2026, Sec. 3.1 and App. D (docs/paper.md section 3):
- 27 locations: {left, right, bilateral} x {"", apical, upper, middle, lower, costophrenic, pleural, base}
  ("bilateral base" is called "bibasilar"), plus "lingular", "cardiomegaly" (the heart) and "pulmonary"
  (both lungs, used for edema);
- the 8 MS-CXR pathologies;
- the Chest ImaGenome region names each location stands for (base and pleural -> lower lung zone,
  lingular -> left mid lung zone, bilateral -> both sides);
- the LUT: every gold ImaGenome box rescaled to the paper's 512x512 frame (the LUT frame), mu = box centre, sigma = side / 6
  (the +-3 sigma rule), averaged per region name;
- Gaussian rendering (the L_loc target G) and the +-5% jitter.
The plumbing around it lives with the data: the LUT as a file (grounding/data/lut.py), the report wording of each
pathology (grounding/data/reports.py) and the nearest-Gaussian match that synthesises VinDr-CXR prompts from boxes
(grounding/data/vindr.py).
"""
import math

import torch

from grounding.geometry import box_to_model

FRAME = 512  # the LUT frame: the paper's 512x512 model input (rendering rescales it to any map or image side)

# ---------------------------------------------------------------------------------------------------
# Vocabulary

SIDES = ("left", "right", "bilateral")
ZONES = ("", "apical", "upper", "middle", "lower", "costophrenic", "pleural", "base")


def location_name(side, zone):
    """(side, zone) -> one of the 27 names; "bilateral base" is the paper's "bibasilar"."""
    if side == "bilateral" and zone == "base":
        return "bibasilar"
    return f"{side} {zone}".strip()


LOCATIONS = tuple(location_name(s, z) for s in SIDES for z in ZONES) + ("lingular", "cardiomegaly", "pulmonary")
assert len(LOCATIONS) == 27

# MS-CXR category names, in the order docs/formats.md lists them.
PATHOLOGIES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Lung Opacity", "Pleural Effusion",
               "Pneumonia", "Pneumothorax")
# The word(s) a standardised prompt uses for each pathology: the category name in lower case.
PATHOLOGY_WORDS = {p: p.lower() for p in PATHOLOGIES}

# ImaGenome region names (bbox_name) that the LUT averages.
REGIONS = ("right lung", "left lung", "right apical zone", "left apical zone", "right upper lung zone",
           "left upper lung zone", "right mid lung zone", "left mid lung zone", "right lower lung zone",
           "left lower lung zone", "right costophrenic angle", "left costophrenic angle", "cardiac silhouette")

# Zone -> region suffix; base and pleural have no ImaGenome region of their own (paper: lower lung zone).
_ZONE_REGION = {"": "lung", "apical": "apical zone", "upper": "upper lung zone", "middle": "mid lung zone",
                "lower": "lower lung zone", "costophrenic": "costophrenic angle", "pleural": "lower lung zone",
                "base": "lower lung zone"}


def regions_for(location):
    """The ImaGenome region names a location stands for (two for a bilateral location)."""
    if location == "lingular":
        return ["left mid lung zone"]
    if location == "cardiomegaly":
        return ["cardiac silhouette"]
    if location == "pulmonary":
        return ["right lung", "left lung"]
    if location == "bibasilar":
        side, zone = "bilateral", "base"
    else:
        side, _, zone = location.partition(" ")
    if location not in LOCATIONS:
        raise ValueError(f"unknown location {location!r}; the 27 locations are {list(LOCATIONS)}")
    sides = ["right", "left"] if side == "bilateral" else [side]
    return [f"{s} {_ZONE_REGION[zone]}" for s in sides]


# ---------------------------------------------------------------------------------------------------
# The LUT: {location: [[mu_x, mu_y, sigma_x, sigma_y], ...]} in 512x512 pixels

def box_gaussian(box_xyxy):
    """A box (x1, y1, x2, y2) -> (mu_x, mu_y, sigma_x, sigma_y): centre and side / 6 (+-3 sigma rule)."""
    x1, y1, x2, y2 = box_xyxy
    return ((x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 6, (y2 - y1) / 6)


def build_lut(scene_graphs, frame=FRAME, mode="crop"):
    """Average Gaussians per ImaGenome region over gold scene graphs, then map the 27 locations onto them.

    scene_graphs: records from grounding/data/imagenome.py read_scene_graph (keys `boxes` {bbox_name: (x1, y1, x2, y2)} in
    original pixels, `image_width`, `image_height`).
    mode: how a box is "rescaled to 512x512" (the paper does not say). "crop" (default) applies the model's
    own preprocessing (shortest side -> 512, centre crop) so G lands where the attention maps see the organ;
    "stretch" scales x and y independently to 512.
    Returns (lut, counts) where counts[region] is how many boxes were averaged.
    """
    sums = {r: [0.0, 0.0, 0.0, 0.0] for r in REGIONS}
    counts = {r: 0 for r in REGIONS}
    for sg in scene_graphs:
        w, h = sg["image_width"], sg["image_height"]
        for name, (x1, y1, x2, y2) in sg["boxes"].items():
            if name not in sums or x2 <= x1 or y2 <= y1:
                continue
            if mode == "crop":
                bx, by, bw, bh = box_to_model((x1, y1, x2 - x1, y2 - y1), w, h, frame, clip=False)
            elif mode == "stretch":
                bx, by, bw, bh = x1 * frame / w, y1 * frame / h, (x2 - x1) * frame / w, (y2 - y1) * frame / h
            else:
                raise ValueError(f"build_lut: mode must be 'crop' or 'stretch', got {mode!r}")
            for i, v in enumerate(box_gaussian((bx, by, bx + bw, by + bh))):
                sums[name][i] += v
            counts[name] += 1
    missing = [r for r in REGIONS if counts[r] == 0]
    if missing:
        raise ValueError(f"build_lut: no gold boxes for regions {missing}; check the scene graphs' bbox_name values")
    region_g = {r: [s / counts[r] for s in sums[r]] for r in REGIONS}
    lut = {loc: [list(region_g[r]) for r in regions_for(loc)] for loc in LOCATIONS}
    return lut, counts


# ---------------------------------------------------------------------------------------------------
# Gaussians: lookup, jitter, rendering

def gaussians_for(lut, locations):
    """All Gaussians named by a prompt's locations (a bilateral location contributes two)."""
    out = []
    for loc in locations:
        if loc not in lut:
            raise KeyError(f"location {loc!r} is not in the LUT (known: {sorted(lut)})")
        out.extend(tuple(g) for g in lut[loc])
    return out


def jitter(gaussians, frac=0.05, generator=None, frame=FRAME):
    """Shift each mu and sigma by U(-frac, frac) x the LUT frame side (paper: +-5%, i.e. +-25 px at 512)."""
    out = []
    for g in gaussians:
        d = (torch.rand(4, generator=generator) * 2 - 1) * frac * frame
        mx, my, sx, sy = (float(v) for v in torch.tensor(g, dtype=torch.float32) + d)
        out.append((mx, my, max(sx, 1.0), max(sy, 1.0)))  # a sigma must stay positive
    return out


def cell_masses(mu, sigma, edges):
    """The mass of a 1-D Gaussian (mu, sigma) in each cell [edges[k], edges[k+1]): differences of its CDF,
    Phi((e - mu) / sigma) = erfc(-(e - mu) / (sigma sqrt 2)) / 2. Taken on the tail side of each cell (erfc of a
    positive argument) in float64, so a cell far from mu keeps its tiny mass instead of 1 - 1 = 0."""
    a, b = (edges[:-1] - mu) / (sigma * math.sqrt(2)), (edges[1:] - mu) / (sigma * math.sqrt(2))
    upper = 0.5 * (torch.erfc(a) - torch.erfc(b))        # cells right of mu: a >= 0
    lower = 0.5 * (torch.erfc(-b) - torch.erfc(-a))      # cells left of (or holding) mu
    return torch.where(a >= 0, upper, lower)


def render_gaussians(gaussians, size, frame=FRAME, merge="max"):
    """Render Gaussians given in `frame` pixels on a (size, size) grid of cells; each has peak 1.

    A cell holds the Gaussian's MASS over its footprint (frame / size pixels a side), as a 512 x 512 rendering
    area-resized to the map would (docs/paper.md section 5: G "resized to 16 x 16"), not the value at its centre:
    a narrow jittered Gaussian (sigma down to 1 px, a 32-px cell at 16 x 16) between two cell centres would otherwise
    vanish, leaving an all-zero target and a step that teaches nothing.
    merge: the paper does not say how several Gaussians (e.g. "bibasilar") form one target. "max" (default)
    keeps every region at full height; "sum" adds them and rescales the peak to 1.
    """
    edges = torch.arange(size + 1, dtype=torch.float64) * (frame / size)     # cell borders in the frame
    out = torch.zeros(size, size, dtype=torch.float64)
    for mx, my, sx, sy in gaussians:
        g = cell_masses(my, sy, edges)[:, None] * cell_masses(mx, sx, edges)[None, :]   # (size, size), rows = y
        g = g / g.max().clamp_min(1e-300)                # peak exactly 1
        if merge == "max":
            out = torch.maximum(out, g)
        elif merge == "sum":
            out = out + g
        else:
            raise ValueError(f"render_gaussians: merge must be 'max' or 'sum', got {merge!r}")
    out = out / out.max().clamp_min(1e-300) if merge == "sum" else out
    return out.float()
