"""Anatomy-grounded weakly supervised prompt tuning (Vilouras et al., MIDL 2026): the training script.

    python train.py --config tune.yaml [key=value ...]                    # prompt tuning (the paper), default world
    python train.py --config tune.yaml --resume                           # continue from out_dir/ckpt.pt
    python train.py --config tune.yaml --resume --force lr=1e-3           # ... with changed settings (named, kept apart)
    python train.py --config tune.yaml --overwrite                        # start over in an out_dir with a checkpoint
    python train.py --config configs/mimic_monai.yaml --check             # every input read at once, one report

A flat loop in the spirit of nanoGPT's train.py. Every setting is a field of TrainConfig
(grounding/experiment/config.py) with its default and a comment (`--help` lists them); YAML files and key=value
overrides fill it (unknown keys and wrong types are errors). The run folder (out_dir) receives the config, checkpoint,
learned rows, final tables, per-pair rows, overlays and report.html; the run ends by listing them (the Outputs block). The whole LDM is frozen; only the anatomy rows of the prompt codebook learn, from
L_div + L_loc on the cross-attention maps of the chosen layers (`layers`; the paper: 4) at T timesteps
(docs/paper.md section 5; one image's loss is grounding/tuning.py `tuning_loss`). The tiny phantom base LDM is pretrained by its own script:
python scripts/pretrain_phantom.py --config configs/phantom_pretrain.yaml --overwrite (docs/phantom.md).
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from ldm.weights.folder import load_pipeline
from grounding.anatomy import gaussians_for, jitter
from grounding.heatmap import LAYER_PRESETS, HeatmapConfig, inversion_scheduler, training_latents, window_timesteps
from grounding.precision import autocast, grad_scaler
from grounding.prompts import LearnablePrompts
from grounding.tuning import tuning_loss
from grounding.data.curation import class_counts
from grounding.experiment import distributed, preflight, provenance, sources
from grounding.experiment.config import check_layers, keys_help, load_config, TrainConfig
from grounding.experiment.evaluation import Model, compare_models, evaluate_pairs
from grounding.experiment.outputs import outputs_block
from grounding.experiment.report import write_evaluation_report
from grounding.experiment.rows import save_rows

REPORT_OVERLAYS = 8  # overlay PNGs per model in out_dir/overlays/ (evaluate.py's --overlays default)


def parse_args(argv=None):
    keys = ("config keys, set in the --config YAML file or as key=value (key: default, then what it sets: the field\n"
            "comments of TrainConfig in grounding/experiment/config.py). The defaults follow the paper where it gives\n"
            "a value; tune.yaml (the quickstart) changes a few, each with its reason in its comments.\n\n"
            + keys_help(TrainConfig))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=keys,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file with TrainConfig keys (tune.yaml, configs/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt (same settings)")
    p.add_argument("--force", action="store_true", help="with --resume: continue even though settings changed")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an out_dir that holds a checkpoint")
    p.add_argument("--check", action="store_true", help="read every configured input, print one report of what is "
                   "found and missing, write nothing; exit 1 if anything is missing (preflight.py)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of config keys (listed below)")
    args = p.parse_intermixed_args(argv)
    try:
        return load_config(TrainConfig, args.config, args.overrides), args
    except (ValueError, FileNotFoundError) as e:  # a bad key or value: its message, not a traceback
        p.error(str(e))


# ---------------------------------------------------------------------------------------------------------------
# prompt tuning: the paper's loop (docs/paper.md section 5)


def tune(cfg, resume=False, run=None):
    """Tune the anatomy rows of the prompt codebook on the curated samples; returns the LearnablePrompts.

    One step (single process, batch 1): pick a sample -> its noisy latents z_t at the T training timesteps -> the
    cross-attention maps of the prompt at the chosen layers -> L = w_div L_div + w_loc L_loc (grounding/tuning.py
    `tuning_loss`) -> AdamW step on the anatomy rows only. Data parallelism, resuming, the latent cache, fp16 loss
    scaling and the NaN stop are the named helpers below; with one process and fp32 each is a no-op.
    """
    rank, world = distributed.setup(cfg.device)                          # (0, 1) without torchrun
    say = print if rank == 0 else (lambda *a, **k: None)
    device = torch.device(cfg.device)
    pipe = load_pipeline(cfg.weights, device=cfg.device)
    layers = list(cfg.layers) or list(LAYER_PRESETS[(pipe.family, "tuning")])   # checked before any data is read
    check_layers("layers", layers, len(pipe.unet.cross_attention_layers()), f"{cfg.weights} (family {pipe.family})")
    data = load_data(cfg, pipe, say, world, run, write=rank == 0)   # run.start(): the run folder is written from here

    # the learnable anatomy rows; everything else frozen (docs/paper.md section 4)
    for module in (pipe.text_encoder, pipe.unet, pipe.vae):
        module.eval().requires_grad_(False)
    prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens=cfg.shared_tokens,
                               n_ctx=cfg.n_ctx).to(device)
    say(prompts.format_codebook())
    params = [p for p in prompts.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params)
    scaler = grad_scaler(device, cfg.autocast)  # fp16 only: scales the loss so small gradients do not underflow
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    step0 = resume_checkpoint(ckpt_path, prompts, opt, scaler, cfg, say) if resume else 0

    # T timesteps of the training window (paper: steps [30, 60) of a 100-step DDIM schedule, reverse order)
    hcfg = HeatmapConfig(num_steps=cfg.num_inference_steps, family=pipe.family, layers=tuple(layers),
                         autocast=cfg.autocast)
    train_ts = window_timesteps(inversion_scheduler(pipe.scheduler, hcfg), *cfg.train_window)   # (T,) descending
    say(f"training timesteps ({len(train_ts)}): {train_ts.tolist()}; layers {layers}; noisy latents by {cfg.noisy_latents}")
    latents = TrainingLatents(pipe, data, train_ts, cfg, hcfg, progress=rank == 0)

    global_batch, n = cfg.batch_size * world, len(data.samples)
    say(f"progress bar: loss = moving average of w_div * div + w_loc * loc (w_div {cfg.w_div:g}, w_loc {cfg.w_loc:g}); "
        f"div = L_div (Eq. 2)\n  and loc = L_loc (Eq. 4) of the step's last image; drift = how far tuning has moved "
        f"the {len(prompts.anatomy_ids)} learned rows:\n  the mean of |row - start| / |start| (0 = not at all)")
    bar = tqdm(range(step0, cfg.max_steps), desc="prompt tuning", disable=rank != 0, mininterval=2)
    t0, ema = time.time(), None
    for step in bar:
        total = 0.0
        for k in range(rank, global_batch, world):     # this rank's items of the global batch (one process: all)
            i = sample_index(step, k, global_batch, n, cfg.seed)                              # which sample
            gen = torch.Generator().manual_seed(draw_seed(step, k, global_batch, cfg.seed))   # its random draws
            sample = data.samples[i]
            z, ts = latents.get(i, gen)                 # z (T, 1, C, h, w) noisy latents at the timesteps ts (T,)
            z, ts = subset_timesteps(z, ts, cfg.timesteps_per_step, gen)       # all T unless timesteps_per_step
            # G's Gaussians: the LUT entries of the prompt's locations, mu and sigma jittered by +-5% (paper Sec. 3.2)
            gaussians = jitter(gaussians_for(data.lut, sample["locations"]), cfg.jitter, gen)
            loss, parts = tuning_loss(pipe, prompts, sample["prompt"], z, ts, layers, gaussians, merge=cfg.merge,
                                      weights=(cfg.w_div, cfg.w_loc), alpha=cfg.alpha, eps=cfg.eps,
                                      autocast_mode=cfg.autocast)
            scaler.scale(loss / global_batch).backward()   # the batch mean; = (loss / B).backward() unless fp16
            total += loss.item() / global_batch
        total = all_reduce_gradients(params, total, world, device)       # data parallel only
        stop_if_not_finite(total, step, ckpt_path)
        scaler.step(opt)                                                   # = opt.step() unless fp16
        scaler.update()
        opt.zero_grad(set_to_none=True)

        ema = total if ema is None else 0.95 * ema + 0.05 * total
        bar.set_postfix(loss=f"{ema:.4f}", div=f"{parts['div'].item():.3f}", loc=f"{parts['loc'].item():.3f}",
                        drift=f"{prompts.drift().mean().item():.3f}")
        done = step + 1
        if rank == 0 and (done % cfg.ckpt_every == 0 or done == cfg.max_steps):
            save_checkpoint(ckpt_path, prompts, opt, scaler, done, cfg)
        if rank == 0 and cfg.val_every and done % cfg.val_every == 0 and data.val_pairs:
            validate(cfg, pipe, prompts, data, hcfg, done, say)
    say(f"tuning done: {max(0, cfg.max_steps - step0)} steps in {time.time() - t0:.0f}s")
    if rank == 0 and not cfg.n_ctx and not prompts.drift().any():  # e.g. zero loss weights: no gradient reached them
        say("note: the learned rows are EXACTLY their starting embeddings: tuning changed nothing (check lr, alpha, "
            "w_div / w_loc and the loss in the progress bar)")
    if rank == 0:
        save_rows(prompts, os.path.join(cfg.out_dir, "learned_rows.safetensors"),   # + the settings they are read with
                  provenance.eval_heatmap_config(cfg, pipe.family, True), cfg.train_window)
        say("nearest real tokens of each learned row (cosine similarity to the frozen input embedding of each token of "
            "the\n  vocabulary; its own token first: the row still points closest to where it started):")
        for token, near in prompts.nearest_tokens(k=3).items():
            say(f"  {token!r:>14} -> " + ", ".join(f"{t} {cos:.3f}" for t, cos in near))
    if cfg.eval_at_end and rank == 0:
        final_evaluation(cfg, pipe, prompts, data)
    if rank == 0:
        say("\n" + outputs_block(cfg.out_dir, next_steps(cfg, data)))
    distributed.teardown(world)
    return prompts


# ---------------------------------------------------------------------------------------------------------------
# the sample stream and its random draws: a function of (seed, step, place in the global batch) only, so that
# resuming, or splitting the batch over ranks, reproduces the same run


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    """The order of the n tuning samples in `epoch`: a function of (seed, epoch) only.

    7919 (the 1,000th prime) spreads the epochs' generator seeds: seed + 7919 * epoch gives every epoch of a run its
    own permutation, and two runs' seeds collide only when their seeds differ by a multiple of 7919."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch))


def sample_index(step, k, global_batch, n, seed):
    """The tuning sample of item k of step's global batch: the items of all steps form one stream of epochs, each
    epoch a fresh permutation, so every sample is seen once per epoch whatever the batch size."""
    epoch, pos = divmod(step * global_batch + k, n)
    return int(epoch_order(n, seed, epoch)[pos])


def draw_seed(step, k, global_batch, seed):
    """The seed of item k's random draws (noise, timestep subset, jitter): distinct for every (step, k).

    Each step owns max(64, global_batch) consecutive seeds, item k the k-th of them: never shared, because k <
    global_batch. The floor of 64 keeps item k's seed the same for every batch size up to 64. 1_000_003 (a prime
    above a million) is the stride between run seeds: runs with other seeds draw other numbers for their first
    million steps."""
    return (seed * 1_000_003 + step) * max(64, global_batch) + k


def subset_timesteps(z, ts, keep, gen):
    """A random `keep` of the T timesteps (sorted, drawn from gen), or all of them when keep is 0 (the paper)."""
    if not keep:
        return z, ts
    idx = torch.randperm(len(ts), generator=gen)[:keep].sort().values
    return z[idx], ts[idx]


# ---------------------------------------------------------------------------------------------------------------
# data and noisy latents


def load_data(cfg, pipe, say, world=1, run=None, write=True):
    """The tuning samples, LUT and evaluation pairs of the config (grounding/experiment/sources.py), with the data
    report printed and the curated tuning set as used written to out_dir/tuning_set.jsonl (for inspection).
    Nothing is written before the model and the data have checked out: then `run.start()` writes config.yaml."""
    data = sources.load(cfg, image_size=pipe.image["size"], write_lut=False)
    if cfg.batch_size * world > len(data.samples):  # every step would see samples twice over: hours per step
        raise ValueError(f"config key 'batch_size': {cfg.batch_size}" + (f" x {world} processes" if world > 1 else "")
                         + f" is larger than the tuning set ({len(data.samples)} samples); use at most "
                         f"{len(data.samples) // world} (the paper uses 1)")
    if run is not None:  # the run begins (config.yaml, the lock's run folder)
        run.start()
    if write:
        data.save_lut()  # a LUT built from the gold boxes goes into the run folder (out_dir/lut.json)
    say(f"model: {cfg.weights} (family {pipe.family}); data: {data.description}")
    say(data.report)
    if write:
        with open(os.path.join(cfg.out_dir, "tuning_set.jsonl"), "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in data.samples)
    say(f"tuning samples: {len(data.samples)}; validation pairs: {len(data.val_pairs)}; test pairs: {len(data.test_pairs)}")
    if cfg.val_every:
        say(data.val_note)
    return data


class TrainingLatents:
    """The noisy latents z_t (T, 1, C, h, w) of a tuning sample at the training timesteps (docs/paper.md section 5).

    noisy_latents "noise": q(z_t | z_0) with fresh noise from the item's generator, every time.
    noisy_latents "inversion": DDIM inversion following the "" prompt, as at test time; the latent for t is the
    inversion state at the next smaller timestep, the one the inversion step to t feeds the UNet. Inversion is
    deterministic, so when every sample's latents fit in latent_cache_mb (the phantom world) they are computed once,
    up front, 32 images per UNet call; at MIMIC scale (6,480 x 30 latents of 3x64x64) each step inverts its image.
    """

    def __init__(self, pipe, data, train_ts, cfg, hcfg, progress=True):
        self.pipe, self.data, self.train_ts, self.cfg, self.hcfg = pipe, data, train_ts, cfg, hcfg
        self.device = torch.device(cfg.device)
        with torch.no_grad(), autocast(self.device, cfg.autocast):
            self.uncond = pipe.text_encoder(pipe.tokenizer([""]).to(self.device))   # (1, 77, D): "" context
        h = pipe.image["size"] // pipe.vae.downscale_factor
        cache_mb = len(data.samples) * len(train_ts) * pipe.vae.config.latent_channels * h * h * 4 / 2**20
        self.cache = {}  # sample index -> (T, 1, C, h, w)
        if cfg.noisy_latents == "inversion" and cache_mb <= cfg.latent_cache_mb:
            for start in tqdm(range(0, len(data.samples), 32), desc="inverting the tuning images",
                              disable=not progress):
                chunk = list(range(start, min(start + 32, len(data.samples))))
                for i, z in zip(chunk, self.compute(chunk).unbind(1)):
                    self.cache[i] = z[:, None]

    def get(self, i, gen):
        """(z (T, 1, C, h, w), the timesteps (T,)) of sample i; gen draws the noise in "noise" mode."""
        z = self.cache[i] if i in self.cache else self.compute([i], gen)
        return z, self.train_ts

    def compute(self, indices, gen=None):
        """(T, B, C, h, w) noisy latents of the samples `indices` (B images encoded together)."""
        pipe, cfg = self.pipe, self.cfg
        with torch.no_grad():
            x = torch.stack([self.data.image(self.data.samples[i], pipe.image) for i in indices]).to(self.device)
            z0 = pipe.vae.encode(x) * pipe.scale_factor                 # (B, C, h, w) scaled latents
            if cfg.noisy_latents == "noise":
                return training_latents(pipe, z0, self.train_ts, mode="noise", generator=gen)
            with autocast(self.device, cfg.autocast):
                return training_latents(pipe, z0, self.train_ts, mode="inversion", uncond=self.uncond, cfg=self.hcfg)


# ---------------------------------------------------------------------------------------------------------------
# optimiser, checkpoints, data parallelism, the NaN stop, validation


def make_optimizer(cfg, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ValueError(f"config key 'optimizer': expected adamw | adam | sgd, got {cfg.optimizer!r}")


def save_checkpoint(path, prompts, opt, scaler, step, cfg):
    """Atomic: write a temporary file, then rename over the old checkpoint (a crash never leaves half a file)."""
    tmp = path + ".tmp"
    torch.save({"prompts": prompts.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "config": dataclasses.asdict(cfg)}, tmp)  # the settings that made it: --resume compares them
    os.replace(tmp, path)


def resume_checkpoint(path, prompts, opt, scaler, cfg, say):
    """--resume: load the rows, optimiser state and fp16 loss scale of `path`; returns the step to continue from (0
    when there is no checkpoint yet). grounding/experiment/provenance.py has already checked the settings."""
    if not os.path.exists(path):
        return 0
    ckpt = provenance.read_checkpoint(path, map_location=torch.device(cfg.device))
    prompts.load_state_dict(ckpt["prompts"])
    opt.load_state_dict(ckpt["opt"])
    if ckpt.get("scaler") and scaler.is_enabled():  # fp16: the loss scale reached so far
        scaler.load_state_dict(ckpt["scaler"])
    for group in opt.param_groups:  # the config's lr and decay, not the saved ones (--resume --force may change them)
        group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    say(f"resumed from {path} at step {ckpt['step']}")
    if ckpt["step"] >= cfg.max_steps:
        say(f"the run is already past max_steps ({ckpt['step']} steps done >= max_steps {cfg.max_steps}): no tuning "
            f"step; the rows are those of step {ckpt['step']} (raise max_steps to tune further)")
    return ckpt["step"]


def all_reduce_gradients(params, total, world, device):
    """Data parallel (torchrun): sum the per-rank gradients (each already divided by the global batch) and the loss;
    returns the step's loss. One process: nothing to do."""
    if world == 1:
        return total
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    t = torch.tensor([total], device=device)                              # nccl reduces CUDA tensors only
    dist.all_reduce(t)
    return t.item()


def stop_if_not_finite(total, step, ckpt_path):
    """A NaN or infinite loss stops the run before the optimiser step, so the last checkpoint stays good."""
    if not math.isfinite(total):
        last = f"The last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else \
            "No checkpoint was written yet (a lower lr?)"
        raise SystemExit(f"step {step}: loss is {total}; stopping. {last}")


def validate(cfg, pipe, prompts, data, hcfg, done, say):
    """The short validation every val_every steps: CNR and mIoU of the current rows on a few MS-CXR-loc pairs."""
    rows = evaluate_pairs(pipe, data.val_pairs[:cfg.val_pairs], hcfg, prompts, batch_size=cfg.eval_batch,
                          desc="validation", protocol=cfg.metric_protocol)
    say(f"\nstep {done}: validation CNR {sum(r['cnr'] for r in rows) / len(rows):.3f}, "
        f"mIoU {sum(r['miou_percent'] for r in rows) / len(rows):.1f}% on {len(rows)} MS-CXR-loc pairs "
        f"({data.val_note})")


# ---------------------------------------------------------------------------------------------------------------
# the final table


def final_evaluation(cfg, pipe, prompts, data):
    """Frozen baseline vs tuned prompts on the held-out split (the paper's table, phantom or real).

    "frozen" is the paper's baseline (its own layers + Otsu mask); "untuned" reads the tuned model's layers without
    Otsu but with the ORIGINAL embeddings, so that tuned - untuned is what the learned rows alone bring.
    """
    pairs = data.test_pairs[:cfg.eval_pairs] if cfg.eval_pairs else data.test_pairs
    head = (f"Data: {data.description}\nWeights: {cfg.weights}\n"
            f"MS-CXR-loc (mscxr_split: {cfg.mscxr_split}), pairs per class: {class_counts(pairs)}"
            + (f" (the first {len(pairs)} of {len(data.test_pairs)}: eval_pairs)" if len(pairs) < len(data.test_pairs)
               else "") + "\n")
    print(f"\nevaluating on {len(pairs)} pairs ({data.description})\n{head}")
    models = [("frozen", None, False)] + [("untuned", None, True)] * cfg.eval_untuned + [("tuned", prompts, True)]
    hcfgs = {name: provenance.eval_heatmap_config(cfg, pipe.family, tuned) for name, _, tuned in models}
    notes = {"frozen": " (baseline preset)", "untuned": " (tuning layers)", "tuned": " (tuning layers)"}
    heatmaps = "\n".join(provenance.describe_heatmap(name, hcfgs[name], notes[name]) for name in hcfgs)
    print(heatmaps)
    cols = [Model(name, p, hcfgs[name], os.path.join(cfg.out_dir, f"eval_{name}.jsonl"),
                  provenance.rows_record(pipe, cfg.weights, hcfgs[name], p, split="mscxr-loc", data=data.description),
                  os.path.join(cfg.out_dir, "overlays", name))
            for name, p, _ in models]
    # one inversion per image batch serves all three columns and their left/right-swapped prompts
    rows, summaries, tables, swap_md, table = compare_models(pipe, pairs, cols, batch_size=cfg.eval_batch,
                                                             swap=cfg.eval_swap, on_mismatch="fresh",
                                                             protocol=cfg.metric_protocol, n_overlays=REPORT_OVERLAYS)
    for name, md in tables.items():
        with open(os.path.join(cfg.out_dir, f"eval_{name}.md"), "w") as f:
            f.write(f"{head}Heatmaps: {heatmaps}\n\n{md}\n")
    if swap_md:
        table += f"\n\n{swap_md}"
    with open(os.path.join(cfg.out_dir, "eval_frozen_vs_tuned.md"), "w") as f:
        f.write(f"{head}Heatmaps:\n{heatmaps}\n\n{table}\n")
    print(table)
    # the page evaluate.py writes too: the tables and, per class, the best and worst pairs under every model
    path = os.path.join(cfg.out_dir, "report.html")
    size = write_evaluation_report(path, pipe, f"{head}Heatmaps:\n{heatmaps}\n",
                                   [(m.name, m.cfg, m.prompts) for m in cols], summaries, rows, pairs,
                                   batch=cfg.eval_batch, swap=cfg.eval_swap,
                                   title=f"Phrase grounding, MS-CXR-loc (mscxr_split: {cfg.mscxr_split}): train.py's "
                                         "final table")
    print(f"\nwrote {path} ({size / 1e6:.1f} MB)")
    return summaries


def next_steps(cfg, data):
    """What to open or run after this run (the end of its Outputs block): its report, one held-out image through
    ground.py with these rows, and evaluate.py on a split the final table did not score."""
    rows, config = os.path.join(cfg.out_dir, "learned_rows.safetensors"), os.path.join(cfg.out_dir, "config.yaml")
    steps = []
    if os.path.exists(os.path.join(cfg.out_dir, "report.html")):
        steps.append(f"open {os.path.join(cfg.out_dir, 'report.html')} in a browser: the table with the best and worst "
                     "pairs of each class, frozen beside tuned")
    if data.test_pairs:  # a held-out pair the table scored: every word's map, frozen / untuned / tuned, swapped
        p = data.test_pairs[0]
        box = ",".join(f"{v:g}" for v in p["boxes"][0])
        steps.append(f'python ground.py {p["image_path"]} --prompt "{p["prompt"]}" --box {box} --weights '
                     f"{cfg.weights} --prompts {rows}   # one held-out image, word by word")
    split, n = ("vindr", len(data.vindr)) if data.vindr else ("mscxr", len(data.mscxr))
    if n:
        steps.append(f"python evaluate.py --split {split} --config {config} --baseline --prompts {rows} --swap   "
                     f"# another split ({n} pairs), into runs/eval_{split}/")
    return steps


def main(argv=None):
    cfg, args = parse_args(argv)
    if args.check:
        sys.exit(preflight.main(cfg, args.config, "train.py"))
    # the checks and the out_dir lock; nothing is written until the model and data load (run.start() in load_data)
    run = provenance.prepare_run_dir(cfg, resume=args.resume, force=args.force, overwrite=args.overwrite,
                                     write=int(os.environ.get("RANK", "0")) == 0)
    try:
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        tune(cfg, resume=args.resume, run=run)
    finally:
        run.close()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: its message, not a traceback
        sys.exit(f"train.py: error: {e}")
