"""Phrase-grounding heatmaps from cross-attention during DDIM inversion, and training-time noisy latents.

Mirrors the predecessor's extraction (Vilouras et al., "Zero-Shot Medical Phrase Grounding with
Off-the-shelf Diffusion Models", JBHI 2024), reused by the MIDL 2026 paper (docs/paper.md section 6):
  1. z0 = VAE mean x scale factor;
  2. DDIM inversion over 100 "trailing" steps, guidance 0: the trajectory follows the UNCONDITIONAL ("")
     prediction while the prompt branch's cross-attention probabilities are recorded;
  3. keep the steps in the window and the chosen layers;
  4. per layer and step: mean over the prompt's tokens (BOS/EOS excluded; a joining "and" is kept, as the
     predecessor's code averages every token between BOS and EOS, although training leaves it out of
     L_div and A_sp), min-max, resize to the image; then the mean over layers and steps;
  5. Gaussian filter (sigma 2.5 px at 512, scaled with the image size), min-max, optional Otsu mask, min-max.
(Step 6, back to the original image with NaN padding, is grounding/geometry.py `to_original`.)

Step index direction (docs/paper.md section 5): the paper counts steps along the reverse process (index 0 =
noisiest). With 100 trailing steps (t = 999, 989, ..., 9), indices [40, 60) are t = 599 .. 409 and the
training indices [30, 60) are t = 699 .. 409. Windows are therefore given in TIMESTEP units, half-open
[lo, hi): test (400, 600), training (400, 700). The inversion-order reading of [30, 60) would be (300, 600).

Steps 2-3 are written twice, side by side: `record_straightforward` is the procedure as described (full
inversion, conditional + unconditional passes every step, every cross-attention layer recorded with all 77
columns, selection afterwards); `record_fast`, the marked optimisation every caller uses, gives the same maps:
the conditional pass runs only at recorded steps and stops right after the last recorded layer (UNet
stop_after), and the inversion stops at the last recorded step.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from grounding.attention_store import AttentionStore
from grounding.losses import token_average
from grounding.precision import autocast
from grounding.prompts import prompt_positions

TEST_WINDOW = (400, 600)    # reverse-process indices [40, 60) of 100 trailing steps
TRAIN_WINDOW = (400, 700)   # reverse-process indices [30, 60)

# Layer presets (cross_index), per (family, preset). MONAI CXR UNet (11 cross-attention layers: 0-3 down, 4 mid,
# 5-10 up): "tuning" = mid + first three decoder layers {4,5,6,7}, the layers prompt tuning trains and reads;
# "baseline" = the frozen baseline's {3,4,6,7} + Otsu (the predecessor's choice). All at latent/4 = 16x16. The
# phantom UNet (6 layers, all 16x16: 0-1 down, 2 mid, 3-5 up) takes the same roles: tuning {2,3,4,5}, baseline
# {1,2,4,5}.
# SD1/RoentGen and SD2 (16 layers: 0,1 @64; 2,3 @32; 4,5 @16; 6 mid @8; 7,8,9 @16; 10-12 @32; 13-15 @64):
# the SD mid layer is 8x8, so the equivalent 16x16 choice is OUR pick, not the paper's:
#   tuning   (5, 7, 8, 9): the deepest 16x16 encoder layer + the first three decoder layers;
#   baseline (4, 5, 8, 9): the two 16x16 encoder layers + the 2nd and 3rd decoder layers (as {3,(4),6,7}).
LAYER_PRESETS = {
    ("monai_cxr", "tuning"): (4, 5, 6, 7), ("monai_cxr", "baseline"): (3, 4, 6, 7),
    ("phantom", "tuning"): (2, 3, 4, 5), ("phantom", "baseline"): (1, 2, 4, 5),
    ("sd1", "tuning"): (5, 7, 8, 9), ("sd1", "baseline"): (4, 5, 8, 9),
    ("sd2", "tuning"): (5, 7, 8, 9), ("sd2", "baseline"): (4, 5, 8, 9),
}
PRESETS = ("tuning", "baseline")


@dataclass
class HeatmapConfig:
    num_steps: int = 100                 # DDIM inversion steps (predecessor)
    spacing: str = "trailing"            # timestep spacing used for the inversion (predecessor code)
    window: tuple = TEST_WINDOW          # recorded timesteps, half-open [lo, hi)
    family: str = "monai_cxr"            # picks the layer preset
    preset: str = "tuning"               # which reading: "tuning" = the layers prompt tuning trains, no Otsu (for the
                                         # tuned rows and the original ones alike, "untuned"); "baseline" = the
                                         # paper's frozen-baseline protocol (its own layers + Otsu)
    layers: Optional[tuple] = None       # cross_index list; None = LAYER_PRESETS[(family, preset)]
    otsu: Optional[bool] = None          # None = preset: Otsu mask for the frozen baseline only
    sigma: float = 2.5                   # Gaussian filter sigma in pixels at sigma_ref_size
    sigma_ref_size: int = 512            # ... scaled linearly with the image size
    resize_mode: str = "bilinear"        # map -> image resize (per-map, after min-max)
    autocast: str = "none"               # "none" | "bf16" | "fp16": text encoder + inversion under torch.autocast

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"HeatmapConfig: preset must be one of {PRESETS}, got {self.preset!r}")

    def resolved_layers(self):
        if self.layers is not None:
            return tuple(int(i) for i in self.layers)
        if (self.family, self.preset) not in LAYER_PRESETS:
            raise ValueError(f"HeatmapConfig: no layer preset for family {self.family!r}; set layers=(...) "
                             f"(presets: {sorted({f for f, _ in LAYER_PRESETS})})")
        return LAYER_PRESETS[(self.family, self.preset)]

    def resolved_otsu(self):
        return self.preset == "baseline" if self.otsu is None else bool(self.otsu)


# ---------------------------------------------------------------------------------------------------------
# schedule


def inversion_scheduler(scheduler, cfg):
    """A copy of the pipeline's DDIM scheduler with the heatmap's spacing, set to cfg.num_steps."""
    sched = type(scheduler)(dataclasses.replace(scheduler.config, timestep_spacing=cfg.spacing))
    sched.set_timesteps(cfg.num_steps)
    return sched


def window_timesteps(scheduler, lo, hi):
    """The schedule's timesteps t with lo <= t < hi, in the schedule's (descending) order."""
    ts = scheduler.timesteps
    sel = ts[(ts >= lo) & (ts < hi)]
    if sel.numel() == 0:
        raise ValueError(f"no timestep of the schedule {ts.tolist()[:5]}... lies in [{lo}, {hi})")
    return sel


# ---------------------------------------------------------------------------------------------------------
# inversion with recording


def record_straightforward(pipe, z0, cond, uncond, store, cfg):
    """The procedure as described (steps 2-3 above), written for reading, not for speed.

    DDIM-invert z0 (scaled latents, (B, C, h, w)) over every step of the schedule following the unconditional
    prediction (guidance 0); at EVERY step the conditional branch runs through the whole UNet and EVERY
    cross-attention layer is recorded with all 77 token columns. Afterwards the window's steps, `store`'s layers
    and its token columns are copied into `store` (keys: (timestep, cross_index)).
    cond may hold V contexts per image ((V * B, 77, D), variant-major): the conditional pass then sees the latents
    repeated V times (extract_heatmaps_shared), while the trajectory stays (B, ...).
    Returns (the last latent, the full store: what this procedure holds in memory).
    """
    V = cond.shape[0] // z0.shape[0]
    sched = inversion_scheduler(pipe.scheduler, cfg)
    window = set(window_timesteps(sched, *cfg.window).tolist())
    layers = store.layers if store.layers is not None else range(len(pipe.unet.cross_attention_layers()))
    uncond = uncond.expand(z0.shape[0], -1, -1)
    full = AttentionStore(None, None, keep_grad=store.keep_grad, average_heads=store.average_heads)
    z = z0
    with torch.enable_grad() if store.keep_grad else torch.no_grad():
        for t in sched.inversion_timesteps.tolist():               # ascending: clean -> noisy
            full.set_step(t)
            pipe.unet(z.repeat(V, 1, 1, 1), t, cond, store=full)   # conditional pass, full depth, all columns
            z = sched.invert_step(pipe.unet(z, t, uncond), t, z)    # the unconditional pass drives the trajectory
    for (t, layer), m in full.records.items():                        # selection afterwards
        if t in window and layer in layers:
            store.records[(t, layer)] = store.select_columns(m)
    return z, full


def record_fast(pipe, z0, cond, uncond, store, cfg):
    """OPTIMISATION of record_straightforward, same maps in `store` (tests/test_heatmap.py, benchmarks/heatmap.py):

    - the conditional pass runs only at the recorded steps and stops right after the last recorded layer
      (UNet stop_after): nothing after it can change a recorded map;
    - the inversion stops at the last recorded step: later steps are never recorded;
    - the store keeps only its layers and the prompt's token columns while recording (AttentionStore).
    Returns the last latent reached (the inversion state at the last recorded step).
    """
    V = cond.shape[0] // z0.shape[0]
    rep = (lambda z: z.repeat(V, 1, 1, 1)) if V > 1 else (lambda z: z)
    sched = inversion_scheduler(pipe.scheduler, cfg)
    window = set(window_timesteps(sched, *cfg.window).tolist())
    n_cross = len(pipe.unet.cross_attention_layers())
    layers = store.layers if store.layers is not None else list(range(n_cross))
    uncond = uncond.expand(z0.shape[0], -1, -1)
    z = z0
    with torch.enable_grad() if store.keep_grad else torch.no_grad():
        t_last = max(window)
        for t in sched.inversion_timesteps.tolist():             # ascending: clean -> noisy
            if t in window:
                store.set_step(t)
                # the prompt branch only needs to reach the last recorded layer
                pipe.unet(rep(z), t, cond, store=store, stop_after=max(layers))
            if t == t_last:
                break                                              # later steps are never recorded
            z = sched.invert_step(pipe.unet(z, t, uncond), t, z)
    return z


def invert_and_record(pipe, z0, cond, uncond, store, cfg, fast=True):
    """Record the window's maps of store.layers into `store` during the inversion of z0; returns the last latent.
    fast=True: record_fast (what every caller uses); fast=False: record_straightforward."""
    if fast:
        return record_fast(pipe, z0, cond, uncond, store, cfg)
    return record_straightforward(pipe, z0, cond, uncond, store, cfg)[0]


def training_latents(pipe, z0, timesteps, mode="inversion", generator=None, uncond=None, cfg=None):
    """Noisy latents (T, B, C, h, w) at `timesteps` (order kept) for prompt tuning (docs/paper.md section 5).

    mode "inversion" (default; the paper does not say, and the test-time procedure inverts): DDIM inversion
        following the "" prompt; the latent returned for t is the one the test-time procedure feeds to the
        UNet at t (the inversion state just before its step to t).
    mode "noise": forward noising q(z_t | z0) with fresh Gaussian noise from `generator`.
    """
    timesteps = [int(t) for t in timesteps]
    if mode == "noise":
        noise = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
        return torch.stack([pipe.scheduler.add_noise(z0, noise, t) for t in timesteps])
    if mode != "inversion":
        raise ValueError(f"training_latents: mode must be 'inversion' or 'noise', got {mode!r}")
    cfg = cfg or HeatmapConfig()
    sched = inversion_scheduler(pipe.scheduler, cfg)
    schedule = sched.inversion_timesteps.tolist()
    missing = sorted(set(timesteps) - set(schedule))
    if missing:
        raise ValueError(f"training_latents: timesteps {missing[:5]} are not on the {cfg.num_steps}-step "
                         f"{cfg.spacing} schedule; pick them with window_timesteps")
    if uncond is None:
        uncond = pipe.text_encoder(pipe.tokenizer([""]))
    uncond = uncond.expand(z0.shape[0], -1, -1)
    wanted, out, z = set(timesteps), {}, z0
    with torch.no_grad():
        for t in schedule:
            if t in wanted:
                out[t] = z
            if t == max(wanted):
                break
            z = sched.invert_step(pipe.unet(z, t, uncond), t, z)
    return torch.stack([out[t] for t in timesteps])


# ---------------------------------------------------------------------------------------------------------
# maps -> heatmap


def minmax(x, dims=(-2, -1)):
    """(x - min) / (max - min) over `dims`; a constant map becomes 0."""
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def _reflect_index(n, r):
    """Indices -r .. n+r-1 folded back into [0, n) the way scipy.ndimage's mode "reflect" does
    (d c b a | a b c d | d c b a: the edge pixel is repeated), for any radius."""
    i = torch.arange(-r, n + r) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def gaussian_filter(x, sigma, truncate=4.0):
    """Separable Gaussian blur of (B, H, W), like scipy.ndimage.gaussian_filter (mode reflect, 4 sigma)."""
    if sigma <= 0:
        return x
    r = int(truncate * sigma + 0.5)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    B, H, W = x.shape
    x = x[:, :, _reflect_index(W, r).to(x.device)]                     # pad columns
    x = F.conv1d(x.reshape(B * H, 1, -1), k.view(1, 1, -1)).reshape(B, H, W)
    x = x.transpose(1, 2)[:, :, _reflect_index(H, r).to(x.device)]     # pad rows (as columns)
    x = F.conv1d(x.reshape(B * W, 1, -1), k.view(1, 1, -1)).reshape(B, W, H)
    return x.transpose(1, 2)


def otsu_threshold(x, nbins=256):
    """Otsu's threshold of one map: 256 bins over [min, max], the split that maximises the between-class
    variance, returned as the CENTRE of the last lower-class bin, as skimage's threshold_otsu and
    threshold_multiotsu (2 classes) return it: the authors' convention, so the pixels of that bin above its centre
    count as foreground (`x > threshold`)."""
    x = x.detach().flatten().double().cpu()          # a 256-bin histogram: cheap anywhere
    lo, hi = x.min(), x.max()
    if hi <= lo:
        return lo.item()
    hist = torch.histc(x, bins=nbins, min=lo.item(), max=hi.item())
    width = (hi - lo) / nbins
    centres = lo + width * (torch.arange(nbins, dtype=torch.float64) + 0.5)
    w1 = hist.cumsum(0)                                   # pixels at or below each bin
    w2 = hist.flip(0).cumsum(0).flip(0)                   # pixels at or above each bin
    m1 = (hist * centres).cumsum(0) / w1.clamp_min(1e-12)
    m2 = ((hist * centres).flip(0).cumsum(0) / w2.flip(0).clamp_min(1e-12)).flip(0)
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2    # split after bin k; ties: the first k (as np.argmax)
    return centres[int(between.argmax())].item()


def heatmap_from_maps(maps, image_size, cfg=None, token_mask=None):
    """Recorded maps -> (B, H, W) heatmaps in [0, 1] (steps 4-5 of the procedure).

    maps: an AttentionStore (every stored (step, layer) is used) or a tensor (T, L, B, N, S).
    token_mask (B, S): the real prompt tokens (taken from the store when it has one).
    """
    cfg = cfg or HeatmapConfig()
    if isinstance(maps, AttentionStore):
        if token_mask is None and maps.columns is not None:
            token_mask = maps.token_mask()
        items = [maps.records[k] for k in maps.keys()]
    else:
        items = list(maps.flatten(0, 1))
    if not items:
        raise ValueError("heatmap_from_maps: no maps (nothing recorded?)")
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    acc = None
    for m in items:                                           # m: (B, N, S)
        if m.dim() != 3:
            raise ValueError(f"heatmap_from_maps: expected (B, N, S) maps (heads averaged), got {tuple(m.shape)}")
        mask = None if token_mask is None else token_mask.expand(m.shape[0], -1)
        a = token_average(m, mask)                            # mean over the prompt's tokens, (B, N)
        side = math.isqrt(a.shape[-1])
        a = minmax(a.reshape(-1, 1, side, side).float())
        kw = {"align_corners": False} if cfg.resize_mode in ("bilinear", "bicubic") else {}
        a = F.interpolate(a, size=(H, W), mode=cfg.resize_mode, **kw)[:, 0]
        acc = a if acc is None else acc + a
    hm = minmax(gaussian_filter(acc / len(items), cfg.sigma * H / cfg.sigma_ref_size))
    if cfg.resolved_otsu():
        mask = torch.stack([h > otsu_threshold(h) for h in hm]).to(hm)
        hm = minmax(hm * mask)
    return hm


# ---------------------------------------------------------------------------------------------------------
# end to end


def prompt_contexts(pipe, texts, prompts=None):
    """((B, 77, D) contexts, per-item token positions between BOS and EOS) from LearnablePrompts or the plain
    text encoder."""
    if prompts is not None:
        # every token between BOS and EOS, the joining "and" included: the predecessor's heatmap averages them all
        return prompts.encode(texts), [prompts.token_positions(t, include_join=True) for t in texts]
    ids = pipe.tokenizer(texts).to(pipe.unet.conv_in.weight.device)
    positions = [prompt_positions(pipe.tokenizer, t) for t in texts]   # after BOS, before EOS
    return pipe.text_encoder(ids), positions


@torch.no_grad()
def extract_heatmaps(pipe, images, texts, cfg=None, prompts=None, fast=True):
    """Model-frame images (B, C, H, W) in the family's range and one prompt each -> (B, H, W) heatmaps in [0, 1]
    (float32, on the CPU): the procedure of this file's docstring, step by step. prompts: a LearnablePrompts (tuned
    model) or None (plain text encoder); with cfg None, the layers, steps and window a rows file recorded are the
    default (grounding/experiment/rows.py). The B images are inverted together (one UNet call per step for the whole
    batch); every per-image operation (min-max, filter, Otsu) stays per image."""
    settings = getattr(prompts, "heatmap_settings", None) or {}          # {} for the frozen encoder or older rows
    cfg = cfg or HeatmapConfig(family=getattr(pipe, "family", "monai_cxr"),
                               preset="tuning" if prompts is not None else "baseline", **settings)
    device = pipe.unet.conv_in.weight.device
    images = images.to(device, pipe.unet.conv_in.weight.dtype)
    if len(texts) != images.shape[0]:
        raise ValueError(f"extract_heatmaps: {len(texts)} prompts for {images.shape[0]} images")
    z0 = pipe.vae.encode(images) * pipe.scale_factor                      # 1. (B, C, h, w) scaled latents
    with autocast(device, cfg.autocast):                                  # the recorded maps stay float32
        cond, positions = prompt_contexts(pipe, list(texts), prompts)     # (B, 77, D), each prompt's token columns
        uncond = pipe.text_encoder(pipe.tokenizer([""]).to(device))       # (1, 77, D): the trajectory follows ""
        store = AttentionStore(cfg.resolved_layers(), positions)          # keeps (B, N, S) per (step, layer)
        invert_and_record(pipe, z0, cond, uncond, store, cfg, fast=fast)  # 2-3. invert, record the window's maps
    return heatmap_from_maps(store, tuple(images.shape[-2:]), cfg).float().cpu()   # 4-5. maps -> (B, H, W)


# ---------------------------------------------------------------------------------------------------------
# one inversion, many prompt variants (evaluation of several models and of the swap test)


@torch.no_grad()
def extract_heatmaps_shared(pipe, images, variants, fast=True):
    """Heatmaps of several prompt variants on the SAME images from ONE inversion: extract_heatmaps, shared.

    The inversion follows the "" prompt (guidance 0), so its trajectory does not depend on the prompt or on the
    learned rows: it is computed once, and at every recorded step ONE conditional UNet call runs every variant's
    context on the repeated latents. A variant is (texts, prompts, cfgs): B prompts (one per image), a
    LearnablePrompts or None (plain text encoder), and one or more HeatmapConfigs read from the same recorded maps
    (e.g. the frozen baseline and the "untuned" reading share the original embeddings and differ only in layers
    and Otsu; the union of their layers is recorded once).
    Returns, per variant, a list with one (B, H, W) heatmap tensor per cfg: the same maps as extract_heatmaps called
    per (variant, cfg) (tests/test_swap.py checks it), about V times fewer inversions.
    """
    cfgs = [c for _, _, cs in variants for c in cs]
    key = lambda c: (c.num_steps, c.spacing, tuple(c.window), c.autocast)
    for c in cfgs[1:]:
        if key(c) != key(cfgs[0]):
            raise ValueError("extract_heatmaps_shared: every cfg must share num_steps, spacing, window and autocast "
                             "(one inversion serves them all)")
    device = pipe.unet.conv_in.weight.device
    images = images.to(device, pipe.unet.conv_in.weight.dtype)
    B = images.shape[0]
    z0 = pipe.vae.encode(images) * pipe.scale_factor   # one VAE pass, in full precision: it starts the trajectory
    with autocast(device, cfgs[0].autocast):            # the recorded probabilities stay float32 (ldm/attention.py)
        conds, positions = [], []
        for texts, prompts, _ in variants:
            if len(texts) != B:
                raise ValueError(f"extract_heatmaps_shared: {len(texts)} prompts for {B} images")
            cond, pos = prompt_contexts(pipe, list(texts), prompts)
            conds.append(cond)
            positions += pos
        layers = sorted({l for c in cfgs for l in c.resolved_layers()})
        store = AttentionStore(layers, positions)                # batch = V * B, variant-major
        uncond = pipe.text_encoder(pipe.tokenizer([""]).to(device))
        # the conditional branch sees the V variants stacked on the batch axis, the trajectory stays (B, ...)
        invert_and_record(pipe, z0, torch.cat(conds), uncond, store, cfgs[0], fast=fast)
    out = []
    for v, (_, _, cs) in enumerate(variants):
        sl = slice(v * B, (v + 1) * B)
        maps_v = []
        for c in cs:
            sub = AttentionStore(c.resolved_layers(), positions[sl])
            sub.records = {k: m[sl] for k, m in store.records.items() if k[1] in sub.layers}
            # the shared store pads every prompt to the longest of ALL variants: slice its mask, do not rebuild it
            maps_v.append(heatmap_from_maps(sub, tuple(images.shape[-2:]), c, token_mask=store.token_mask()[sl])
                          .float().cpu())
        out.append(maps_v)
    return out

