"""Grounded disease classification with the frozen LDM (paper App. K, Table 6): a diffusion classifier whose
noise-prediction error is weighted by the class prompt's grounding heatmap.

For an image with scaled latent z0 and a class prompt c, the frozen LDM's grounded error is
    err_c = E_{t, eps} [ sum_p h_c(p) e_c(p) / sum_p h_c(p) ],   e_c(p) = sum_channels (eps - eps_theta(z_t, t, c))^2
at every latent pixel p, z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, and h_c the heatmap of prompt c (the
grounding evaluation's extraction, grounding/heatmap.py, in the model frame). The score of "pneumothorax" against
"No acute cardiopulmonary process" is err_normal - err_pneumothorax (higher = more pneumothorax).

Choices the paper leaves open (each a ClassifyConfig key):
- e_c is the SQUARED error summed over the latent channels (error_norm "squared"): the diffusion classifier's
  (Li et al. 2023; Clark & Jaini 2023) per-pixel term of the denoising loss, so a uniform heatmap gives exactly the
  classic unweighted zero-shot diffusion classifier (the paper's AUROC 0.52 row). "l2" takes its square root.
- v-prediction models (MONAI CXR, phantom): the error is on eps, as the formula says. The v output is turned into
  eps_theta = sqrt(abar_t) v_theta + sqrt(1 - abar_t) z_t (ldm scheduler `pred_eps`). Since eps - eps_theta =
  sqrt(abar_t) (v - v_theta), the two differ by a per-timestep factor abar_t (squared): an error on v would weight
  the noisiest timesteps more than the eps formula does.
- (t, eps) draws: n_draws per image (the paper does not state it), t stratified over [0, T): one uniform t in each of
  n_draws equal strata (lower variance than i.i.d. t), eps ~ N(0, I); all from a generator seeded by (draw_seed,
  case id), so a case's draws do not depend on batching, and the SAME draws serve every prompt of the image (a
  paired estimate: the noise cancels in err_normal - err_pneumothorax as far as it can).
- The expectation sits outside the ratio, but h_c does not depend on (t, eps), so it equals the weighted mean of
  the per-pixel error averaged over the draws: one (h, w) error map per prompt is all that is kept.
- The heatmap (model frame, S x S) goes to the latent grid (S/f x S/f) by area averaging (F.interpolate "area":
  each latent pixel gets the mean of the heatmap over the f x f image pixels it encodes).
"""
import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from grounding.experiment.config import check_values

NORMAL_PROMPT = "No acute cardiopulmonary process"

# heatmap sources of Table 6: name -> (model whose heatmaps weight the error, which pneumothorax prompt).
# model None = uniform weights (the unweighted zero-shot diffusion classifier).
SOURCES = {
    "unweighted": (None, "fixed"),
    "unweighted-std": (None, "standardised"),
    "frozen": ("frozen", "fixed"),
    "frozen-std": ("frozen", "standardised"),
    "tuned": ("tuned", "standardised"),
}


@dataclass
class ClassifyConfig:
    category: str = "Pneumothorax"          # the MS-CXR-loc class scored against "No Finding"
    fixed_prompt: str = "pneumothorax"      # the class prompt without a location (frozen, fixed prompt)
    normal_prompt: str = NORMAL_PROMPT      # the "No Finding" class prompt
    n_draws: int = 32                       # (t, eps) draws per image (paper: not stated)
    draw_seed: int = 0                      # seeds every case's draws (with the case id) and the normal pairing
    error_norm: str = "squared"             # "squared" (diffusion loss) | "l2" (its square root) per latent pixel
    unet_batch: int = 128                   # latents per UNet call (draws x images x prompts are chunked)
    batch: int = 8                          # images per heatmap extraction call
    normal_bins: str = "paired"             # "paired": each normal follows its paired case's mIoU bin | "all"
    test: str = "permutation"               # one-sided high-minus-low test: "permutation" | "bootstrap"
    n_boot: int = 10000                     # bootstrap resamples for the AUROC CIs (and the bootstrap test)
    n_perm: int = 10000                     # permutations for the permutation test
    chexpert_csv: str = ""                  # real data: mimic-cxr-2.0.0-chexpert.csv or -negbio.csv
    normal_views: list[str] = field(default_factory=lambda: ["PA", "AP"])  # frontal "No Finding" images only
    n_normals: int = 0                      # 0 = as many as the pneumothorax pairs (the paper)
    limit: int = 0                          # score only the first N pneumothorax pairs (0 = all)
    sources: list[str] = field(default_factory=lambda: list(SOURCES))

    def __post_init__(self):  # checked when loaded: a bad value is named before the model and data load
        check_values(self, positive=("n_draws", "unet_batch", "batch", "n_boot", "n_perm"),
                     non_negative=("n_normals", "limit"),
                     choices={"error_norm": ("squared", "l2"), "normal_bins": ("paired", "all"),
                              "test": ("permutation", "bootstrap")})
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown or not self.sources:
            raise ValueError(f"config key 'sources': {self.sources!r}; choose one or more of {list(SOURCES)}")


def case_generator(seed, case_id):
    """A CPU generator seeded from (seed, case id): the same draws whatever the batch or the rank."""
    digest = hashlib.sha1(f"{seed}/{case_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def draw(generator, n_draws, num_train_timesteps, latent_shape):
    """(t (K,) long, eps (K, C, h, w)): one uniform timestep per stratum [k T / K, (k + 1) T / K), Gaussian noise."""
    K, T = n_draws, num_train_timesteps
    u = torch.rand(K, generator=generator, dtype=torch.float64)
    t = ((torch.arange(K, dtype=torch.float64) + u) * T / K).floor().long().clamp(0, T - 1)
    eps = torch.randn((K, *latent_shape), generator=generator)
    return t, eps


@torch.no_grad()
def error_maps(pipe, z0, contexts, t, eps, norm="squared", unet_batch=128):
    """Per-pixel noise-prediction error averaged over the draws.

    z0 (B, C, h, w) scaled latents; contexts: list of P text contexts (B, L, D), one prompt per image each;
    t (B, K) timesteps and eps (B, K, C, h, w) noise, shared by the P prompts. Returns (P, B, h, w).
    """
    if norm not in ("squared", "l2"):
        raise ValueError(f"error_norm must be 'squared' or 'l2', got {norm!r}")
    B, K = t.shape
    device, dtype = z0.device, z0.dtype
    t_flat = t.reshape(-1).to(device)                                    # (B K,)
    eps_flat = eps.reshape(B * K, *eps.shape[2:]).to(device, dtype)
    z_t = pipe.scheduler.add_noise(z0.repeat_interleave(K, 0), eps_flat, t_flat)
    out = []
    for ctx in contexts:
        ctx = ctx.repeat_interleave(K, 0)                                # (B K, L, D): image b's prompt, K times
        err = []
        for s in range(0, B * K, unet_batch):
            sl = slice(s, s + unet_batch)
            pred = pipe.unet(z_t[sl], t_flat[sl], ctx[sl])
            eps_hat = pipe.scheduler.pred_eps(pred, t_flat[sl], z_t[sl])  # v -> eps for v-prediction models
            e = (eps_flat[sl].float() - eps_hat.float()).pow(2).sum(1)    # (b, h, w): summed over channels
            err.append(e.sqrt() if norm == "l2" else e)
        out.append(torch.cat(err).view(B, K, *z0.shape[-2:]).mean(1))
    return torch.stack(out).cpu()


def latent_weights(heatmaps, latent_hw):
    """(B, S, S) model-frame heatmaps -> (B, h, w) on the latent grid by area averaging."""
    return F.interpolate(heatmaps[:, None].float(), size=tuple(latent_hw), mode="area")[:, 0]


def weighted_error(err, weights=None):
    """sum(w * err) / sum(w) over the last two dims; weights None = uniform (the plain mean).

    err, weights: (..., h, w). A weight map summing to 0 (a constant heatmap min-max normalises to all zeros)
    gives NaN: the caller counts it and says what it did."""
    if weights is None:
        return err.mean(dim=(-2, -1))
    if weights.shape[-2:] != err.shape[-2:]:
        raise ValueError(f"weighted_error: weights {tuple(weights.shape)} and errors {tuple(err.shape)} differ in size")
    total = weights.sum(dim=(-2, -1))
    return (weights * err).sum(dim=(-2, -1)) / torch.where(total > 0, total, torch.nan)


def scores(err_normal, err_class, w_normal=None, w_class=None):
    """Grounded diffusion-classifier score err_normal - err_class (B,), from (B, h, w) error maps and weights."""
    return weighted_error(err_normal, w_normal) - weighted_error(err_class, w_class)


# ---------------------------------------------------------------------------------------------------------
# cases -> rows (heatmaps, error maps, scores)


def _needed(ccfg):
    """{heatmap model: [pneumothorax prompt kinds]} and the prompt kinds the error maps need."""
    unknown = [s for s in ccfg.sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"classify: unknown sources {unknown}; choose from {list(SOURCES)}")
    models = {}
    for s in ccfg.sources:
        model, kind = SOURCES[s]
        if model is not None and kind not in models.setdefault(model, []):
            models[model].append(kind)
    return models, sorted({SOURCES[s][1] for s in ccfg.sources})


def score_batch(pipe, cases, ccfg, prompts=None, hcfgs=None, protocol="reference"):
    """Rows for a batch of cases (dicts with pair_id, image_path, prompt, label, boxes, image size).
    hcfgs: {"frozen": HeatmapConfig, "tuned": HeatmapConfig} (classify.py passes its run's evaluation settings);
    default the family's presets with the paper's 100 steps. protocol: the mIoU's metric_protocol
    (grounding/metrics.py), the run's config key.

    Each row: pair_id, label, unit, prompt, score {source: err_normal - err_class}, miou_percent {source: mIoU of
    the class heatmap in percent, positives only}, fallback [sources whose heatmap was constant, scored unweighted]."""
    from grounding.heatmap import HeatmapConfig, extract_heatmaps_shared, prompt_contexts
    from grounding.metrics import miou
    from grounding.data.images import preprocess
    from grounding.geometry import to_original

    B = len(cases)
    images = torch.stack([preprocess(c["image_path"], pipe.image) for c in cases])
    texts = {"normal": [ccfg.normal_prompt] * B, "fixed": [ccfg.fixed_prompt] * B,
             "standardised": [c["prompt"] for c in cases]}
    models, kinds = _needed(ccfg)
    if "tuned" in models and prompts is None:
        raise ValueError("classify: the 'tuned' source needs learned rows (--prompts)")
    # every (model, prompt kind) heatmap of the batch from ONE inversion (it follows "", so it is shared)
    keys = [(model, k) for model, model_kinds in models.items() for k in ["normal"] + model_kinds]
    hcfgs = hcfgs or {m: HeatmapConfig(family=pipe.family, preset="tuning" if m == "tuned" else "baseline")
                     for m in ("frozen", "tuned")}
    variants = [(texts[k], prompts if model == "tuned" else None, [hcfgs[model]]) for model, k in keys]
    heat = {}                                                     # (model, kind) -> (B, S, S) model-frame heatmaps
    if variants:
        heat = {key: maps[0] for key, maps in zip(keys, extract_heatmaps_shared(pipe, images, variants))}
    # error maps: the FROZEN model's prediction for each prompt text, the same (t, eps) draws for all of them
    device = pipe.unet.conv_in.weight.device
    z0 = pipe.vae.encode(images.to(device, pipe.unet.conv_in.weight.dtype)) * pipe.scale_factor
    draws = [draw(case_generator(ccfg.draw_seed, c["pair_id"]), ccfg.n_draws,
                  pipe.scheduler.config.num_train_timesteps, z0.shape[1:]) for c in cases]
    t, eps = torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws])
    err_kinds = ["normal"] + kinds
    contexts = [prompt_contexts(pipe, texts[k])[0] for k in err_kinds]
    errs = dict(zip(err_kinds, error_maps(pipe, z0, contexts, t, eps, ccfg.error_norm, ccfg.unet_batch)))
    latent_hw = z0.shape[-2:]
    rows = []
    for i, c in enumerate(cases):
        row = dict(pair_id=c["pair_id"], label=c["label"], unit=c["unit"], prompt=c["prompt"], score={},
                   miou_percent={}, fallback=[])
        for s in ccfg.sources:
            model, kind = SOURCES[s]
            w_n = w_c = None
            if model is not None:
                w_n = latent_weights(heat[(model, "normal")][i:i + 1], latent_hw)[0]
                w_c = latent_weights(heat[(model, kind)][i:i + 1], latent_hw)[0]
                if w_n.sum() <= 0 or w_c.sum() <= 0:          # a constant heatmap: no weighting possible
                    row["fallback"].append(s)
                    w_n = None if w_n.sum() <= 0 else w_n
                    w_c = None if w_c.sum() <= 0 else w_c
                if c["label"] == 1:
                    full = to_original(heat[(model, kind)][i], c["image_width"], c["image_height"])
                    row["miou_percent"][s] = 100 * miou(full, c["boxes"], protocol=protocol)
            row["score"][s] = float(scores(errs["normal"][i], errs[kind][i], w_n, w_c))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# rows -> Table 6


def bins_source(source, present):
    """Which heatmap's mIoU splits a source's cases: its own; the unweighted rows borrow the heatmap of the same
    prompt (tuned for the standardised prompt when it ran), as a control for "the high half is just easier"."""
    if SOURCES[source][0] is not None:
        return source
    if SOURCES[source][1] == "standardised":
        return "tuned" if "tuned" in present else "frozen-std"
    return "frozen"


def classification_summary(rows, ccfg):
    """{source: {...}} with AUROC overall and per mIoU half (95% bootstrap CIs), the halves' mean mIoU (in percent),
    and the one-sided high-minus-low test."""
    from grounding.auroc import bin_aurocs, bootstrap_auroc, high_minus_low_test, miou_halves
    import numpy as np

    pos = sorted((r for r in rows if r["label"] == 1), key=lambda r: r["unit"])
    neg = sorted((r for r in rows if r["label"] == 0), key=lambda r: r["unit"])
    if ccfg.normal_bins not in ("paired", "all"):
        raise ValueError(f"normal_bins must be 'paired' or 'all', got {ccfg.normal_bins!r}")
    paired = ccfg.normal_bins == "paired"
    if paired and [r["unit"] for r in pos] != [r["unit"] for r in neg]:
        raise ValueError(f"normal_bins=paired needs one normal per pneumothorax pair ({len(pos)} vs {len(neg)}); "
                         "set n_normals=0 or normal_bins=all")
    present = [s for s in ccfg.sources if all(s in r["score"] for r in rows)]
    out = {}
    for s in present:
        sp = np.array([r["score"][s] for r in pos])
        sn = np.array([r["score"][s] for r in neg])
        b = bins_source(s, present)
        if b not in present or any(b not in r["miou_percent"] for r in pos):
            out[s] = dict(n_pos=len(sp), n_neg=len(sn), all=bootstrap_auroc(sp, sn, ccfg.n_boot, seed=ccfg.draw_seed))
            continue
        m = np.array([r["miou_percent"][b] for r in pos])
        high = miou_halves(m)
        neg_high = high if paired else None
        lo_neg, hi_neg = (sn[~high], sn[high]) if paired else (sn, sn)
        delta, p = high_minus_low_test(sp, sn, high, neg_high, method=ccfg.test,
                                       n=ccfg.n_perm if ccfg.test == "permutation" else ccfg.n_boot,
                                       seed=ccfg.draw_seed)
        assert abs(delta - np.subtract(*bin_aurocs(sp, sn, high, neg_high)[::-1])) < 1e-9
        out[s] = dict(n_pos=len(sp), n_neg=len(sn), bins_from=b, all=bootstrap_auroc(sp, sn, ccfg.n_boot, seed=ccfg.draw_seed),
                      low=bootstrap_auroc(sp[~high], lo_neg, ccfg.n_boot, seed=ccfg.draw_seed),
                      high=bootstrap_auroc(sp[high], hi_neg, ccfg.n_boot, seed=ccfg.draw_seed),
                      miou_percent_low=float(m[~high].mean()), miou_percent_high=float(m[high].mean()),
                      miou_percent_split=float(m[high].min()), delta=delta, p=p, test=ccfg.test,
                      fallback=sum(s in r["fallback"] for r in rows))
    return out


def summary_markdown(summary, ccfg):
    """Table 6's layout: one row per heatmap source, AUROC [95% CI] in the low and high mIoU halves."""
    prompt = {"fixed": f'"{ccfg.fixed_prompt}"', "standardised": '"{location} ' + ccfg.fixed_prompt + '"'}
    f = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"    # noqa: E731
    lines = [f"| heatmap (weights) | class prompt | n pos/neg | mIoU % low / high (bins from) | AUROC all | "
             f"AUROC low mIoU | AUROC high mIoU | high - low | p ({ccfg.test}, one-sided) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s, v in summary.items():
        model, kind = SOURCES[s]
        name = "none (unweighted)" if model is None else f"{model} LDM heatmap"
        if "low" not in v:
            lines.append(f"| {name} | {prompt[kind]} | {v['n_pos']}/{v['n_neg']} | - | {f(v['all'])} | - | - | - | - |")
            continue
        halves = f"{v['miou_percent_low']:.1f} / {v['miou_percent_high']:.1f} ({v['bins_from']})"
        lines.append(f"| {name} | {prompt[kind]} | {v['n_pos']}/{v['n_neg']} | {halves} | {f(v['all'])} | "
                     f"{f(v['low'])} | {f(v['high'])} | "
                     f"{v['delta']:+.3f} | {v['p']:.3f} |")
    return "\n".join(lines)
