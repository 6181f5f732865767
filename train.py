"""Anatomy-grounded weakly supervised prompt tuning (Vilouras et al., MIDL 2026): the training script.

    python train.py --config tune.yaml [key=value ...]                    # prompt tuning (the paper), default world
    python train.py --config tune.yaml --resume                           # continue from out_dir/ckpt.pt
    python train.py --config tune.yaml --resume --force lr=1e-3           # ... with changed settings (named, kept apart)
    python train.py --config tune.yaml --overwrite                        # start over in an out_dir with a checkpoint
    python train.py --config configs/mimic_monai.yaml --check             # every input read at once, one report

A flat loop in the spirit of nanoGPT's train.py. Every setting is a field of TrainConfig
(grounding/experiment/config.py) with its default and a comment; YAML files and key=value overrides fill it (unknown
keys and wrong types are errors). The whole LDM is frozen; only the anatomy rows of the prompt codebook learn, from
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
from grounding.experiment.config import check_layers, load_config, TrainConfig
from grounding.experiment.evaluation import Model, compare_models, evaluate_pairs
from grounding.experiment.rows import save_rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file with TrainConfig keys (tune.yaml, configs/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt (same settings)")
    p.add_argument("--force", action="store_true", help="with --resume: continue even though settings changed")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an out_dir that holds a checkpoint")
    p.add_argument("--check", action="store_true", help="read every configured input, print one report of what is "
                   "found and missing, write nothing; exit 1 if anything is missing (preflight.py)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    args = p.parse_intermixed_args(argv)
    try:
        return load_config(TrainConfig, args.config, args.overrides), args
    except (ValueError, FileNotFoundError) as e:  # a bad key or value: its message, not a traceback
        p.error(str(e))


# ---------------------------------------------------------------------------------------------------------------
# checkpoints, optimiser, noisy latents


def save_checkpoint(path, prompts, opt, scaler, step, cfg):
    """Atomic: write a temporary file, then rename over the old checkpoint (a crash never leaves half a file)."""
    tmp = path + ".tmp"
    torch.save({"prompts": prompts.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "config": dataclasses.asdict(cfg)}, tmp)  # the settings that made it: --resume compares them
    os.replace(tmp, path)


def make_optimizer(cfg, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ValueError(f"config key 'optimizer': expected adamw | adam | sgd, got {cfg.optimizer!r}")



@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    """The order of the n tuning samples in `epoch`: a function of (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch))


def sample_index(step, k, global_batch, n, seed):
    """The tuning sample of item k of step's global batch: the items of all steps form one stream of epochs, each
    epoch a fresh permutation, so every sample is seen once per epoch whatever the batch size."""
    epoch, pos = divmod(step * global_batch + k, n)
    return int(epoch_order(n, seed, epoch)[pos])


def draw_seed(step, k, global_batch, seed):
    """The seed of item k's random draws (noise, timestep subset, jitter): distinct for every (step, k)."""
    return (seed * 1_000_003 + step) * max(64, global_batch) + k


def noisy_latents(pipe, data, indices, train_ts, cfg, hcfg, uncond, gen=None):
    """(T, B, C, h, w) noisy latents of the samples `indices` at the training timesteps (docs/paper.md section 5).

    "inversion": DDIM inversion following the "" context `uncond`, the images of `indices` together (one UNet call
    per step for the whole chunk), as at test time. "noise": fresh forward noise from `gen` (the paper's other reading).
    """
    device = torch.device(cfg.device)
    with torch.no_grad():
        x = torch.stack([data.image(data.samples[i], pipe.image) for i in indices]).to(device)
        z0 = pipe.vae.encode(x) * pipe.scale_factor
        if cfg.noisy_latents == "noise":
            return training_latents(pipe, z0, train_ts, mode="noise", generator=gen)
        with autocast(device, cfg.autocast):
            return training_latents(pipe, z0, train_ts, mode="inversion", uncond=uncond, cfg=hcfg)


# ---------------------------------------------------------------------------------------------------------------
# prompt tuning


def tune(cfg, resume=False, run=None):
    rank, world = distributed.setup(cfg.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    device = torch.device(cfg.device)
    pipe = load_pipeline(cfg.weights, device=cfg.device)
    layers = list(cfg.layers) or list(LAYER_PRESETS[(pipe.family, True)])   # checked before any data is read
    check_layers("layers", layers, len(pipe.unet.cross_attention_layers()), f"{cfg.weights} (family {pipe.family})")
    data = sources.load(cfg, image_size=pipe.image["size"], write_lut=False)
    if cfg.batch_size * world > len(data.samples):  # every step would see samples twice over: hours per step
        raise ValueError(f"config key 'batch_size': {cfg.batch_size}" + (f" x {world} processes" if world > 1 else "")
                         + f" is larger than the tuning set ({len(data.samples)} samples); use at most "
                         f"{len(data.samples) // world} (the paper uses 1)")
    if run is not None:  # the model and the data checked out: the run begins (config.yaml written)
        run.start()
    if rank == 0:
        data.save_lut()  # a LUT built from the gold boxes goes into the run folder (out_dir/lut.json)
    say(f"model: {cfg.weights} (family {pipe.family}); data: {data.description}")
    say(data.report)
    if rank == 0:  # the curated tuning set as used (image, view, prompt of every sample), for inspection
        with open(os.path.join(cfg.out_dir, "tuning_set.jsonl"), "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in data.samples)
    say(f"tuning samples: {len(data.samples)}; validation pairs: {len(data.val_pairs)}; test pairs: {len(data.test_pairs)}")
    if cfg.val_every:
        say(data.val_note)

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
    step0 = 0
    if resume and os.path.exists(ckpt_path):
        ckpt = provenance.read_checkpoint(ckpt_path, map_location=device)
        prompts.load_state_dict(ckpt["prompts"])
        opt.load_state_dict(ckpt["opt"])
        if ckpt.get("scaler") and scaler.is_enabled():  # fp16: the loss scale reached so far
            scaler.load_state_dict(ckpt["scaler"])
        for group in opt.param_groups:  # the config's lr and decay, not the saved ones (--resume --force may change them)
            group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
        step0 = ckpt["step"]
        say(f"resumed from {ckpt_path} at step {step0}")
        if step0 >= cfg.max_steps:
            say(f"the run is already past max_steps ({step0} steps done >= max_steps {cfg.max_steps}): no tuning "
                f"step; the rows are those of step {step0} (raise max_steps to tune further)")

    # T timesteps of the training window (paper: steps [30, 60) of a 100-step DDIM schedule, reverse order)
    hcfg = HeatmapConfig(num_steps=cfg.num_inference_steps, family=pipe.family, tuned=True, layers=tuple(layers),
                         autocast=cfg.autocast)
    sched = inversion_scheduler(pipe.scheduler, hcfg)
    train_ts = window_timesteps(sched, *cfg.train_window)
    say(f"training timesteps ({len(train_ts)}): {train_ts.tolist()}; layers {layers}; noisy latents by {cfg.noisy_latents}")
    with torch.no_grad(), autocast(device, cfg.autocast):
        uncond = pipe.text_encoder(pipe.tokenizer([""]).to(device))      # the "" context the inversion follows
    # Cache every sample's inversion up front, in chunks, when it fits in cfg.latent_cache_mb (the phantom world);
    # at MIMIC scale (6,480 x 30 latents of 3x64x64) it does not, and each step inverts its own image.
    h = pipe.image["size"] // pipe.vae.downscale_factor
    cache_mb = len(data.samples) * len(train_ts) * pipe.vae.config.latent_channels * h * h * 4 / 2**20
    latent_cache = {}  # sample index -> (T, 1, C, h, w): inversion is deterministic, so it is computed once
    if cfg.noisy_latents == "inversion" and cache_mb <= cfg.latent_cache_mb:
        for start in tqdm(range(0, len(data.samples), 32), desc="inverting the tuning images", disable=rank != 0):
            chunk = list(range(start, min(start + 32, len(data.samples))))
            for i, z in zip(chunk, noisy_latents(pipe, data, chunk, train_ts, cfg, hcfg, uncond).unbind(1)):
                latent_cache[i] = z[:, None]

    global_batch = cfg.batch_size * world
    n = len(data.samples)
    bar = tqdm(range(step0, cfg.max_steps), desc="prompt tuning", disable=rank != 0, mininterval=2)
    t0, ema = time.time(), None
    for step in bar:
        # the data order and every random draw depend only on (seed, step, place in the global batch): resuming,
        # or splitting the batch over ranks, reproduces the same run
        total = 0.0
        for k in range(rank, global_batch, world):                        # this rank's slice of the global batch
            i = sample_index(step, k, global_batch, n, cfg.seed)
            gen = torch.Generator().manual_seed(draw_seed(step, k, global_batch, cfg.seed))
            sample = data.samples[i]
            z = latent_cache[i] if i in latent_cache else \
                noisy_latents(pipe, data, [i], train_ts, cfg, hcfg, uncond, gen)   # (T, 1, C, h, w)
            ts = train_ts
            if cfg.timesteps_per_step:                                     # a random subset of the T steps
                keep = torch.randperm(len(ts), generator=gen)[:cfg.timesteps_per_step].sort().values
                z, ts = z[keep], ts[keep]
            gaussians = jitter(gaussians_for(data.lut, sample["locations"]), cfg.jitter, gen)
            loss, parts = tuning_loss(pipe, prompts, sample["prompt"], z, ts, layers, gaussians, merge=cfg.merge,
                                      weights=(cfg.w_div, cfg.w_loc), alpha=cfg.alpha, eps=cfg.eps,
                                      autocast_mode=cfg.autocast)
            scaler.scale(loss / global_batch).backward()
            total += loss.item() / global_batch
        if world > 1:  # data parallel: sum the per-rank gradients (each already divided by the global batch)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
            t = torch.tensor([total], device=device)                      # nccl reduces CUDA tensors only
            dist.all_reduce(t)
            total = t.item()
        if not math.isfinite(total):
            last = f"The last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else \
                "No checkpoint was written yet (a lower lr?)"
            raise SystemExit(f"step {step}: loss is {total}; stopping. {last}")
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
            rows = evaluate_pairs(pipe, data.val_pairs[:cfg.val_pairs], hcfg, prompts, batch_size=cfg.eval_batch, desc="validation",
                                  protocol=cfg.metric_protocol)
            say(f"\nstep {done}: validation CNR {sum(r['cnr'] for r in rows) / len(rows):.3f}, "
                f"mIoU {100 * sum(r['miou'] for r in rows) / len(rows):.1f}% on {len(rows)} MS-CXR-loc pairs "
                f"({data.val_note})")
    say(f"tuning done: {max(0, cfg.max_steps - step0)} steps in {time.time() - t0:.0f}s")
    if rank == 0 and not cfg.n_ctx and not prompts.drift().any():  # e.g. zero loss weights: no gradient reached them
        say("note: the learned rows are EXACTLY their starting embeddings: tuning changed nothing (check lr, alpha, "
            "w_div / w_loc and the loss in the progress bar)")
    if rank == 0:
        save_rows(prompts, os.path.join(cfg.out_dir, "learned_rows.safetensors"),   # + the settings they are read with
                  provenance.eval_heatmap_config(cfg, pipe.family, True), cfg.train_window)
        say("nearest real tokens of each learned row:")
        for token, near in prompts.nearest_tokens(k=3).items():
            say(f"  {token!r:>14} -> {near}")
    if cfg.eval_at_end and rank == 0:
        final_evaluation(cfg, pipe, prompts, data)
    distributed.teardown(world)
    return prompts


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
                  provenance.rows_record(pipe, cfg.weights, hcfgs[name], p, split="mscxr-loc", data=data.description))
            for name, p, _ in models]
    # one inversion per image batch serves all three columns and their left/right-swapped prompts
    _, summaries, tables, swap_md, table = compare_models(pipe, pairs, cols, batch_size=cfg.eval_batch,
                                                          swap=cfg.eval_swap, on_mismatch="fresh",
                                                          protocol=cfg.metric_protocol)
    for name, md in tables.items():
        with open(os.path.join(cfg.out_dir, f"eval_{name}.md"), "w") as f:
            f.write(f"{head}Heatmaps: {heatmaps}\n\n{md}\n")
    if swap_md:
        table += f"\n\n{swap_md}"
    with open(os.path.join(cfg.out_dir, "eval_frozen_vs_tuned.md"), "w") as f:
        f.write(f"{head}Heatmaps:\n{heatmaps}\n\n{table}\n")
    print(table)
    return summaries


def main(argv=None):
    cfg, args = parse_args(argv)
    if args.check:
        sys.exit(preflight.main(cfg, args.config, "train.py"))
    # the checks and the out_dir lock; nothing is written until the model and data load (run.start() in tune)
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
