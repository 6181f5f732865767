"""Drawing the phantom chest X-rays: one sampled case (grounding/phantom/world.py) -> image + ground-truth boxes.

A procedural, numpy-only renderer of an attenuation-like map (air ~0, soft tissue ~0.55, bone/heart brighter):
body, two lungs with ribs and vascular markings, mediastinum, heart, domed diaphragm with sharp costophrenic
angles, clavicles; per-patient size, position, rotation and contrast come from the case. Each of the 8 MS-CXR
findings has a distinct look in its lung zones, and its boxes are measured on what was drawn; anatomy boxes
(ImaGenome names) are measured on the rendered masks. Rendering is a pure function of the case: all randomness
was drawn in grounding/phantom/world.py's sample_case, with seeds stored in the case.

Convention: radiological view, so the patient's RIGHT lung is on the image LEFT.
"""
import numpy as np
from PIL import Image

# zone -> (v0, v1, u0, u1) in lung coordinates: v from apex (0) to costophrenic angle (1), u medial (0) -> lateral (1)
_BANDS = {"apical": (0.0, 0.2, 0, 1), "upper": (0.12, 0.42, 0, 1), "middle": (0.38, 0.66, 0, 1),
          "lower": (0.62, 1.0, 0, 1), "costophrenic": (0.8, 1.0, 0.55, 1)}


def _smooth_noise(rng, H, W, cells):
    """Low-frequency noise in [-1, 1]: a random cells x cells grid, bilinearly upsampled (PIL: fast)."""
    g = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(g, mode="F").resize((W, H), Image.BILINEAR))


def _blur(img, sigma):
    """Separable Gaussian blur with edge padding (numpy only)."""
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)  # float32 throughout: rendering speed is what the world build costs
    p = np.pad(img, r, mode="edge")
    p = sum(k[i] * p[:, i:i + img.shape[1]] for i in range(2 * r + 1))
    return sum(k[i] * p[i:i + img.shape[0], :] for i in range(2 * r + 1))


def _geometry(a, heart_scale=(1.0, 1.0)):
    """Rotated pixel grid, per-lung (u, v, mask) and the heart mask."""
    W, H = a["W"], a["H"]
    X, Y = np.meshgrid(np.arange(W, dtype=np.float32) + 0.5, np.arange(H, dtype=np.float32) + 0.5)
    cy = a["top"] + a["lung_h"] / 2
    c, s = np.cos(a["rot"]), np.sin(a["rot"])
    Xr, Yr = a["cx"] + (X - a["cx"]) * c + (Y - cy) * s, cy - (X - a["cx"]) * s + (Y - cy) * c
    lungs = {}
    for side, sign in (("right", -1), ("left", 1)):  # patient's right lung = image left
        width = a["half"] - a["gap"]
        u = sign * (Xr - (a["cx"] + sign * a["gap"])) / width
        v = (Yr - a["top"]) / a["lung_h"]
        # rounded apex, straight walls, domed diaphragm meeting the lateral wall at a sharp costophrenic angle
        mask = (u >= 0) & (u <= 1) & (v >= 0) & (np.abs(u - 0.5) <= 0.5 * np.sqrt(np.clip(v / 0.3, 0, 1)))
        mask &= v <= 0.8 + 0.2 * u ** 2
        lungs[side] = dict(u=u, v=v, mask=mask, width=width)
    hx, hy = a["cx"] + 0.05 * W, a["top"] + 0.74 * a["lung_h"]
    heart = ((Xr - hx) / (a["heart_rx"] * heart_scale[0])) ** 2 + ((Yr - hy) / (a["heart_ry"] * heart_scale[1])) ** 2 <= 1
    return Xr, Yr, lungs, heart


def _region(lung, zone):
    v0, v1, u0, u1 = _BANDS.get(zone, (0.0, 1.0, 0.0, 1.0))
    return lung["mask"] & (lung["v"] >= v0) & (lung["v"] <= v1) & (lung["u"] >= u0) & (lung["u"] <= u1)


def _bbox(mask):
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))  # cheaper than np.nonzero(mask)
    return (int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1))


def _draw_finding(f, a, Xr, Yr, lungs, add, texture_keep):
    """Add one finding's density to `add` (in place); returns its ground-truth boxes (x, y, w, h)."""
    rng = np.random.default_rng(f["seed"])
    p, boxes = f["pathology"], []
    for side, zone in f["zones"]:
        lung, m = lungs[side], np.zeros_like(add)
        reg = _region(lung, zone)
        ys, xs = np.nonzero(reg)

        def pick():  # a random point of the zone, in rotated coordinates
            k = int(rng.integers(len(ys)))
            return Xr[ys[k], xs[k]], Yr[ys[k], xs[k]]
        lw, lh = lung["width"], a["lung_h"]
        if p == "Lung Opacity":  # faint soft blob
            mx, my = pick()
            m = 0.18 * np.exp(-0.5 * (((Xr - mx) / (0.22 * lw)) ** 2 + ((Yr - my) / (0.1 * lh)) ** 2))
        elif p == "Pneumonia":  # patchy: a cluster of small dense blobs
            cx0, cy0 = pick()
            for _ in range(int(rng.integers(6, 10))):
                mx, my = cx0 + rng.normal(0, 0.15 * lw), cy0 + rng.normal(0, 0.06 * lh)
                r = rng.uniform(0.05, 0.09) * lw
                m += 0.3 * np.exp(-0.5 * ((Xr - mx) ** 2 + (Yr - my) ** 2) / r ** 2)
            m = np.minimum(m, 0.42)
        elif p == "Consolidation":  # dense homogeneous lobar opacity filling most of the zone
            lat = rng.uniform(0.0, 0.3)
            m = 0.4 * (reg & (lung["u"] >= lat))
        elif p == "Atelectasis":  # plate-like band, slightly oblique
            v0, v1 = _BANDS[zone][:2]  # centred in the zone (kept above the dome), across the lung's middle
            mx = a["cx"] + (-1 if side == "right" else 1) * (a["gap"] + 0.5 * lw)
            my = a["top"] + lh * min(rng.uniform(0.3, 0.7) * (v1 - v0) + v0, 0.78)
            ang = rng.uniform(-0.25, 0.25)
            along = (Xr - mx) * np.cos(ang) + (Yr - my) * np.sin(ang)
            across = -(Xr - mx) * np.sin(ang) + (Yr - my) * np.cos(ang)
            m = 0.45 * ((np.abs(along) < 0.38 * lw) & (np.abs(across) < 0.035 * lh))
        elif p == "Pleural Effusion":  # basal meniscus: fluid level rising laterally, denser at the bottom
            level = rng.uniform(0.88, 0.93) if zone == "costophrenic" else rng.uniform(0.66, 0.82)
            depth = lung["v"] - (level - 0.15 * lung["u"])
            m = 0.45 * np.clip(depth / 0.05, 0, 1) * lung["mask"]
        elif p == "Pneumothorax":  # lucent rim without lung markings, thin visceral pleural line
            gap_u, gap_v = rng.uniform(0.2, 0.3), rng.uniform(0.08, 0.14)
            vmax = 0.35 if zone == "apical" else 0.62
            d = np.maximum((lung["u"] - (1 - gap_u)) * lw, (gap_v - lung["v"]) * lh)  # > 0 outside collapsed lung
            inside = lung["mask"] & (lung["v"] <= vmax)
            rim, line = inside & (d > 1.0), inside & (np.abs(d) <= 1.0)
            m = -0.1 * rim + 0.2 * line
            texture_keep[rim] = 0.0
            reg = rim | line
        elif p == "Edema":  # perihilar haze, fading to the periphery
            mx = a["cx"] + (-1 if side == "right" else 1) * (a["gap"] + 0.3 * lw)
            my = a["top"] + 0.5 * lh
            m = 0.26 * np.exp(-0.5 * (((Xr - mx) / (0.45 * lw)) ** 2 + ((Yr - my) / (0.3 * lh)) ** 2)) * lung["mask"]
        if p != "Pneumothorax":
            m = m * lung["mask"]
            reg = m > 0.15 * m.max()
        add += m
        boxes.append(_bbox(reg))
    return boxes


def render_case(case, with_findings=True):
    """Case -> (image float32 (H, W) in [0, 1], info {"boxes": [[(x, y, w, h)] per finding], "anatomy": ...})."""
    a = case["anat"]
    cardio = with_findings and any(f["pathology"] == "Cardiomegaly" for f in case["findings"])
    Xr, Yr, lungs, heart = _geometry(a, (1.45, 1.2) if cardio else (1.0, 1.0))
    W, H = a["W"], a["H"]
    rng = np.random.default_rng(a["tex_seed"])
    body_w = a["half"] * 1.25 * (0.8 + 0.2 * np.clip(Yr / (a["top"] + 0.3 * a["lung_h"]), 0, 1))
    img = np.where(np.abs(Xr - a["cx"]) <= body_w, 0.52 + 0.08 * Yr / H, 0.03)
    lung_any = lungs["right"]["mask"] | lungs["left"]["mask"]
    vessels = 0.05 * _smooth_noise(rng, H, W, 12) * lung_any
    ribs = np.zeros((H, W), np.float32)
    for lung in lungs.values():  # posterior ribs: bands curving down laterally
        phase = (lung["v"] - 0.1 * lung["u"] ** 2) * 9
        ribs += a["ribs"] * ((phase % 1) < 0.22) * lung["mask"]
    for sign in (-1, 1):  # clavicles
        t = (Xr - a["cx"]) * sign
        yline = a["top"] + 0.06 * a["lung_h"] - 0.12 * t
        ribs += 0.1 * ((np.abs(Yr - yline) < 0.02 * H) & (t > a["gap"]) & (t < a["half"] * 1.05))
    spine = 0.08 * (np.abs(Xr - a["cx"]) < 0.035 * W)
    add, keep = np.zeros((H, W), np.float32), np.ones((H, W), np.float32)
    info = {"boxes": [], "anatomy": anatomy_boxes(lungs, heart)}
    for f in case["findings"]:
        if f["pathology"] == "Cardiomegaly":
            info["boxes"].append([_bbox(heart)])
        else:
            info["boxes"].append(_draw_finding(f, a, Xr, Yr, lungs, add if with_findings else np.zeros_like(add), keep))
    if not with_findings:
        keep[:] = 1.0
    img = img - a["lung_dens"] * lung_any + vessels * keep + ribs + spine
    img = np.where(heart, np.maximum(img, 0.66), img) + add
    img = _blur(img, max(0.6, W / 200))
    img = np.clip(np.clip(img, 0, 1) ** a["gamma"] * a["contrast"], 0, 1)
    img = img + np.random.default_rng(case["noise_seed"]).normal(0, a["noise"], img.shape)
    if a["border"]:
        b = a["border"]
        img[:, :b], img[:, -b:] = 0.0, 0.0
    return np.clip(img, 0, 1).astype(np.float32), info


def anatomy_boxes(lungs, heart):
    """ImaGenome-named anatomy boxes (x1, y1, x2, y2) in pixels, measured on the rendered masks."""
    out = {}
    for side, lung in lungs.items():
        for name, zone in (("lung", None), ("apical zone", "apical"), ("upper lung zone", "upper"),
                           ("mid lung zone", "middle"), ("lower lung zone", "lower"),
                           ("costophrenic angle", "costophrenic")):
            x, y, w, h = _bbox(_region(lung, zone) if zone else lung["mask"])
            out[f"{side} {name}"] = (x, y, x + w, y + h)
    x, y, w, h = _bbox(heart)
    out["cardiac silhouette"] = (x, y, x + w, y + h)
    return out
