"""Ground any image: one DDIM inversion per image batch, every word's map for every model, reading and prompt.

What ground.py computes (README "Ground your own image"). The inversion follows the "" prompt (guidance 0), so its
trajectory depends on the image only (grounding/heatmap.py): at each recorded step ONE conditional UNet call runs
every model's context on the repeated latents, V = models x prompts variants:

    models   "frozen" (the original token embeddings) and, with learned rows, "tuned" (grounding/prompts.py)
    prompts  the prompt, and the same prompt with left and right exchanged when it names one side (swap test)

and the store keeps ALL 77 columns of the recorded layers, so that every word, token and special token is a
slice of the same maps: no extra UNet call per word. Each model is then read as evaluate.py reads it:

    frozen   the original embeddings at the paper's baseline reading (the family's baseline layers + Otsu mask)
    untuned  the original embeddings at the tuned-layer reading (the rows' layers, no Otsu)
    tuned    the learned rows at the tuned-layer reading        (tuned - untuned = what the rows alone bring)

A map is grounding/heatmap.py heatmap_from_maps of the unit's columns, so the phrase map equals extract_heatmaps'
(tests/test_ground.py checks it). `raw` keeps, per unit, the token-averaged probabilities of every recorded
(step, layer) at the attention resolution, NOT min-maxed: the viewer's per-layer / per-step maps and its hover
ranking ("which word attends to this pixel most") read them.
"""
import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from grounding.attention_store import AttentionStore
from grounding.geometry import box_to_original, frame_params
from grounding.heatmap import HeatmapConfig, heatmap_from_maps
from grounding.metrics import cnr, miou
from grounding.experiment.swap import side_masses

PROMPTS = ("prompt", "swapped")


@dataclass
class Reading:
    name: str                 # "frozen" | "untuned" | "tuned"
    model: str                # whose contexts: "frozen" (original embeddings) | "tuned" (learned rows)
    cfg: HeatmapConfig
    about: str                # one line for result.json and the page


def readings(family, num_steps, window, layers=None, tuned=True):
    """The three readings of evaluate.py (two without learned rows). layers: the tuned-layer reading's (None = the
    family's tuned preset); the frozen reading keeps the baseline preset and its Otsu mask."""
    base = HeatmapConfig(num_steps=num_steps, window=tuple(window), family=family, preset="baseline")
    mine = HeatmapConfig(num_steps=num_steps, window=tuple(window), family=family, preset="tuning",
                         layers=tuple(layers) if layers else None)
    out = [Reading("frozen", "frozen", base, f"original embeddings, the paper's baseline reading: layers "
                   f"{base.resolved_layers()} + Otsu mask"),
           Reading("untuned", "frozen", mine, f"original embeddings, the tuned-layer reading: layers "
                   f"{mine.resolved_layers()}, no Otsu")]
    if tuned:
        out.append(Reading("tuned", "tuned", mine, f"learned rows, the tuned-layer reading: layers "
                           f"{mine.resolved_layers()}, no Otsu"))
    return out


@contextlib.contextmanager
def _timed(timings, key, device):
    """Add the seconds spent in the block to timings[key] (benchmarks/ground.py's profile); no-op without timings."""
    if timings is None:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# recording


@torch.no_grad()
def record_maps(pipe, z0, cond, cfg, layers, timings=None):
    """DDIM-invert z0 (B, C, h, w) over cfg's schedule following "" and, at the window's steps, record the
    conditional pass of `cond` ((V * B, 77, D), variant-major) at `layers`, every column kept.

    The same loop as grounding/heatmap.py's fast path: the conditional pass stops after the last recorded layer and
    the inversion stops at the last recorded step. Returns (maps (T, L, V * B, N, 77), the T timesteps).
    """
    device = z0.device
    sched = type(pipe.scheduler)(dataclasses.replace(pipe.scheduler.config, timestep_spacing=cfg.spacing))
    sched.set_timesteps(cfg.num_steps)
    schedule = sched.inversion_timesteps.tolist()                  # ascending: clean -> noisy
    window = [t for t in schedule if cfg.window[0] <= t < cfg.window[1]]
    if not window:
        raise ValueError(f"no timestep of the {cfg.num_steps}-step {cfg.spacing} schedule lies in the window "
                         f"[{cfg.window[0]}, {cfg.window[1]})")
    V = cond.shape[0] // z0.shape[0]
    with _timed(timings, "text", device):
        uncond = pipe.text_encoder(pipe.tokenizer([""]).to(device)).expand(z0.shape[0], -1, -1)
    store = AttentionStore(layers, None)                          # None: all 77 columns
    z = z0
    for t in schedule:
        if t in window:
            store.set_step(t)
            with _timed(timings, "unet conditional", device):
                pipe.unet(z.repeat(V, 1, 1, 1), t, cond, store=store, stop_after=max(layers))
        if t == window[-1]:
            break
        with _timed(timings, "unet unconditional", device):
            z = sched.invert_step(pipe.unet(z, t, uncond), t, z)
    return store.maps(window, sorted(layers)), window


def _contexts(pipe, rows, variants, batch):
    """(V * B, 77, D) contexts, variant-major: for (model, which) the B prompts (or their swapped forms)."""
    device = pipe.unet.conv_in.weight.device
    out = []
    for model, which in variants:
        texts = [pw.text if which == "prompt" or pw.swapped is None else pw.swapped.text for pw in batch]
        out.append(rows.encode(texts) if model == "tuned" else pipe.text_encoder(pipe.tokenizer(texts).to(device)))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# maps


@torch.no_grad()
def ground_batch(pipe, images, batch, rows=None, reads=None, timings=None):
    """Every unit's heatmap for every reading and prompt, from one inversion of `images` (B, C, S, S) (model frame,
    the family's range); batch: B PromptWords (grounding/experiment/words.py); rows: LearnablePrompts or None.

    Returns one dict per image: {"maps": {(reading, which): {unit name: (S, S) heatmap in [0, 1]}},
    "raw": {(model, which): {unit name: (T, L, N) token-averaged probabilities}}, "timesteps": [T], "layers": [L]}.
    """
    device = pipe.unet.conv_in.weight.device
    reads = reads or readings(pipe.family, 100, (400, 600), tuned=rows is not None)
    cfg0 = reads[0].cfg
    if any((r.cfg.num_steps, r.cfg.spacing, tuple(r.cfg.window)) != (cfg0.num_steps, cfg0.spacing, tuple(cfg0.window))
           for r in reads):
        raise ValueError("ground_batch: every reading must share num_steps, spacing and window (one inversion)")
    models = list(dict.fromkeys(r.model for r in reads))
    variants = [(m, w) for w in PROMPTS for m in models if w == "prompt" or any(pw.swapped for pw in batch)]
    layers = sorted({l for r in reads for l in r.cfg.resolved_layers()})
    B, S = images.shape[0], images.shape[-1]
    with _timed(timings, "vae", device):
        z0 = pipe.vae.encode(images.to(device, pipe.unet.conv_in.weight.dtype)) * pipe.scale_factor
    with _timed(timings, "text", device):
        cond = _contexts(pipe, rows, variants, batch)
    maps, timesteps = record_maps(pipe, z0, cond, cfg0, layers, timings)   # (T, L, V * B, N, 77)
    n_ctx = {"frozen": 0, "tuned": getattr(rows, "n_ctx", 0)}
    out = []
    with _timed(timings, "heatmaps", device):
        for i, pw in enumerate(batch):
            res = {"maps": {}, "raw": {}, "timesteps": timesteps, "layers": layers}
            for v, (model, which) in enumerate(variants):
                p = pw if which == "prompt" else pw.swapped
                if p is None:
                    continue
                cols = {u.name: u.columns(p.n_tokens, n_ctx[model], pipe.tokenizer.max_length) for u in p.units}
                cols = {name: c for name, c in cols.items() if c}         # e.g. no padding left in a full context
                # the U units as a batch: their columns padded to the longest and masked, (T, L, U, N, C)
                C = max(len(c) for c in cols.values())
                index = torch.tensor([c + c[:1] * (C - len(c)) for c in cols.values()], device=maps.device)
                mask = torch.tensor([[True] * len(c) + [False] * (C - len(c)) for c in cols.values()])
                m = maps[:, :, v * B + i][..., index].permute(0, 1, 3, 2, 4)
                w = mask.to(m)[None, None, :, None, :]
                raw = ((m * w).sum(-1) / w.sum(-1)).float().cpu()          # token-averaged, (T, L, U, N)
                res["raw"][(model, which)] = {name: raw[:, :, u] for u, name in enumerate(cols)}
                for r in reads:
                    if r.model != model:
                        continue
                    sel = [layers.index(l) for l in r.cfg.resolved_layers()]
                    hm = heatmap_from_maps(m[:, sel], (S, S), r.cfg, token_mask=mask.to(m.device)).float().cpu()
                    res["maps"][(r.name, which)] = {name: hm[u] for u, name in enumerate(cols)}
            out.append(res)
    return out


# ---------------------------------------------------------------------------------------------------------
# what a map says


def describe(heatmap, full, width, height, box=None, side=None):
    """Numbers of one map: its peak (original pixels, the centre of the model pixel), the mass on each image half
    (radiological convention: the image's right half is the patient's left; midline x = W / 2, NaN ignored), the
    share on the side the prompt names, and CNR / mIoU (%) against a box (x, y, w, h) in original pixels."""
    S = heatmap.shape[-1]
    k = int(torch.argmax(heatmap))
    x, y, w, h = box_to_original((k % S, k // S, 1, 1), width, height, S)
    left, right = side_masses(full)                    # image halves
    total = max(left + right, 1e-12)
    out = {"peak": {"x": round(x + w / 2, 1), "y": round(y + h / 2, 1),
                    "side": "patient left" if x + w / 2 > width / 2 else "patient right"},
           "mass_share": {"image left (patient right)": round(left / total, 4),
                          "image right (patient left)": round(right / total, 4)}}
    if side is not None:
        out["mass_share"]["named side"] = round((right if side == "left" else left) / total, 4)
    if box is not None:
        out["cnr"] = round(float(cnr(full, [box], signed=True)), 4)
        out["miou_percent"] = round(100 * float(miou(full, [box])), 2)
    return out


def pixel_cell(x, y, width, height, size, side):
    """The attention cell (row, column) of a side x side map under ORIGINAL pixel (x, y) (its centre), or None
    outside the model's centre crop. The viewer does the same with the frame parameters it is given."""
    sx, sy, left, top = frame_params(width, height, size)
    mx, my = (x + 0.5) * sx - left, (y + 0.5) * sy - top
    if not (0 <= mx < size and 0 <= my < size):
        return None
    return math.floor(my * side / size), math.floor(mx * side / size)   # as the page: Math.floor(a / b)


def rank_words(raw, names, cell, steps, layers):
    """[(unit name, attention)] at an attention cell, highest first: the token-averaged probability of each unit,
    averaged over the chosen step and layer indices, summed in the viewer's order (steps outer, layers inner) so
    the browser's ranking is the same to the last bit."""
    side = int(round(next(iter(raw.values())).shape[-1] ** 0.5))
    n = cell[0] * side + cell[1]
    scores = []
    for k, name in enumerate(names):
        m = raw[name]
        total = 0.0
        for t in steps:
            for l in layers:
                total += float(m[t, l, n])
        scores.append((-total / (len(steps) * len(layers)), k, name))
    return [(name, -s) for s, _, name in sorted(scores)]
