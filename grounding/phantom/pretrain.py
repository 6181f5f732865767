"""Pretraining of the tiny phantom LDM: VAE first, then CLIP-style text encoder + UNet, from scratch.

    python scripts/pretrain_phantom.py --config configs/phantom_pretrain.yaml --overwrite [key=value ...]

The embedded default world (docs/phantom.md) needs a base model that, like the paper's MONAI CXR LDM, denoises chest
X-ray latents conditioned on report text, and whose cross-attention is only loosely tied to anatomy. Same code as
the big models (ldm/), small configs: 64x64 one-channel images in [0, 1], 32x32x3 latents, a two-level UNet whose six
cross-attention layers 0-5 all sit at 16x16 (prompt tuning reads 2-5), v-prediction with the MONAI CXR noise schedule, a BPE vocabulary learned
from the phantom captions. Lessons from docs/phantom.md: the text must be needed to denoise, so
the captions name the finding's location, and training runs long enough (thousands of steps); the result is
committed (assets/phantom_ldm) so the quickstart only tunes and evaluates.
"""
import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm
import numpy as np

from ldm.pipeline import Pipeline
from ldm.weights.folder import save_pipeline
from ldm.schedulers import DDIMScheduler, SchedulerConfig
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.tokenizer import train_bpe
from ldm.unet import UNet2DConditionModel, UNetConfig
from ldm.vae import AutoencoderKL, VAEConfig
from grounding.data.images import preprocess
from grounding.phantom.wording import pick
from grounding.phantom.world import ensure_phantom, world_notice

IMAGE = {"channels": 1, "size": 64, "range": [0.0, 1.0]}  # the phantom family's model input (like MONAI CXR, smaller)
# A VAE half as wide as VAEConfig.tiny(): phantom images are smooth, and 2 CPU cores are the budget.
PHANTOM_VAE = dataclasses.replace(VAEConfig.tiny(), block_out_channels=[16, 32])


@dataclass
class PretrainConfig:
    """Every setting of the phantom pretraining; the defaults are the run that made the committed assets/phantom_ldm
    (configs/phantom_pretrain.yaml states the same values)."""
    out_dir: str = "runs/phantom_pretrain"   # the resolved config.yaml goes here
    weights: str = "assets/phantom_ldm"      # where the converted-format base model is written
    phantom_root: str = "data/phantom"       # the world (built if missing)
    phantom_seed: int = 0                    # the world's seed
    seed: int = 0                            # batches, noise, timesteps, caption choice
    threads: int = 0                         # torch CPU threads (0 = torch's default)
    vae_steps: int = 400                     # VAE steps (batch pretrain_batch)
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6                  # KL term of the VAE (SD used 1e-6)
    unet_steps: int = 3000                   # text encoder + UNet steps
    unet_lr: float = 5e-4
    pretrain_batch: int = 32
    caption_dropout: float = 0.1             # share of "" captions: the unconditional branch used by inversion and CFG
    vocab_size: int = 1000                   # tiny BPE vocabulary learned from the phantom captions (512 byte symbols + merges)
    ckpt_every: int = 500                    # denoiser steps between intermediate saves of the weights folder
    log_every: int = 50                      # steps between progress-bar updates


def _batches(n, batch, generator):
    """Endless random mini-batch indices."""
    while True:
        for idx in torch.randperm(n, generator=generator).split(batch):
            if len(idx) == batch:
                yield idx


def _lr(step, total, base, warmup=100):
    """Linear warmup then cosine decay to 10%."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(images, cfg, generator):
    """Reconstruction (L1 + L2) + a small KL term; returns the VAE and the latent scale factor (1 / std of z)."""
    vae = AutoencoderKL(PHANTOM_VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    batches = _batches(len(images), cfg.pretrain_batch, generator)
    bar = tqdm(range(cfg.vae_steps), desc="phantom VAE", mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr)
        x = images[next(batches)]
        rec, mean, logvar = vae(x, sample_posterior=True, generator=generator)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.1f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 256]) for i in range(0, len(images), 256)])
        rec = vae.decode(z[:256])
        print(f"VAE reconstruction on 256 training images: mean abs error {(rec - images[:256]).abs().mean():.4f} "
              f"(intensities in [0, 1])")
    scale_factor = float(1.0 / z.std())  # SD's 0.18215 and MONAI's 0.3 were chosen the same way
    return vae, scale_factor, z * scale_factor


def train_denoiser(latents, captions, cfg, generator, on_checkpoint=None):
    """Text encoder + UNet trained jointly on v-prediction; `captions[i]` describes `latents[i]`."""
    tokenizer = train_bpe(captions, vocab_size=cfg.vocab_size, pad_id=0)  # pad 0, as the MONAI CXR family
    text_encoder = TextEncoder(dataclasses.replace(TextEncoderConfig.tiny(), vocab_size=tokenizer.vocab_size))
    unet = UNet2DConditionModel(UNetConfig.phantom())
    scheduler = DDIMScheduler(SchedulerConfig.monai_cxr())
    ids = tokenizer(captions)  # (N, 77): tokenised once
    empty = tokenizer([""])[0]
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    batches = _batches(len(latents), cfg.pretrain_batch, generator)
    bar = tqdm(range(cfg.unet_steps), desc="phantom UNet", mininterval=5)
    ema = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.unet_steps, cfg.unet_lr)
        idx = next(batches)
        z0, batch_ids = latents[idx], ids[idx].clone()
        drop = torch.rand(len(idx), generator=generator) < cfg.caption_dropout
        batch_ids[drop] = empty  # classifier-free guidance: the model also learns the "" prompt
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        z_t = scheduler.add_noise(z0, noise, t)
        out = unet(z_t, t, text_encoder(batch_ids))
        loss = F.mse_loss(out, scheduler.training_target(z0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{ema:.4f}")
        if on_checkpoint and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.unet_steps:
            on_checkpoint(tokenizer, text_encoder, unet, scheduler, step + 1)
    text_encoder.eval().requires_grad_(False)
    unet.eval().requires_grad_(False)
    return tokenizer, text_encoder, unet, scheduler, ema


def pretrain(cfg):
    """Build the world if needed, train the VAE and the denoiser, write a converted folder to cfg.weights."""
    generator = torch.Generator().manual_seed(cfg.seed)
    root = ensure_phantom(cfg.phantom_root, seed=cfg.phantom_seed)
    items = training_captions(root, seed=cfg.seed)  # [{image_path, caption}] of the training split
    print(f"{len(items)} training images; caption example: {items[0]['caption']!r}")
    t0 = time.time()
    images = torch.stack([preprocess(it["image_path"], IMAGE) for it in items])  # (N, 1, 64, 64) in [0, 1]
    vae, scale_factor, latents = train_vae(images, cfg, generator)
    print(f"VAE done in {time.time() - t0:.0f}s; latent scale factor {scale_factor:.4f}")

    def save(tokenizer, text_encoder, unet, scheduler, step=None):
        pipe = Pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler,
                        scale_factor=scale_factor, prediction_type="v_prediction", family="phantom", image=dict(IMAGE))
        save_pipeline(pipe, cfg.weights)  # atomic: a temporary folder renamed into place
        print(f"\nsaved the phantom base LDM to {cfg.weights}" + (f" (step {step})" if step else ""))
        return pipe

    tokenizer, text_encoder, unet, scheduler, loss = train_denoiser(
        latents, [it["caption"] for it in items], cfg, generator, on_checkpoint=save)
    print(f"denoiser done in {time.time() - t0:.0f}s; final v-loss (EMA) {loss:.4f}")
    return save(tokenizer, text_encoder, unet, scheduler)


def training_captions(root, splits=("train",), prompt_frac=0.5, seed=0):
    """[{dicom_id, image_path, caption}] for pretraining the tiny phantom LDM, read through the real readers.

    Each image's caption is, at random (fraction prompt_frac), its standardised prompt(s) ("left lower
    atelectasis", several findings joined by ", ") or its positive report sentence(s); normal studies get an
    impression-style sentence. Both kinds name location and pathology, so the text is needed to denoise.
    """
    from grounding.data import curation as cu
    from grounding.data import readers as ds
    from grounding.data import reports as rep
    print(world_notice(root))
    recs, _ = ds.read_mimic(os.path.join(root, "mimic-cxr-jpg"), os.path.join(root, "mimic-cxr-reports"),
                            splits=splits)
    rng = np.random.default_rng(seed)
    out = []
    for r in recs:
        prompts, sentences = {}, {}
        for sentence, ps in cu.positive_sentences(cu.read_report(r["report_path"])):
            for p in ps:
                if p not in prompts:
                    prompts[p] = rep.standardise_prompt(rep.sentence_locations(sentence, p), p)
                    sentences[p] = sentence
        if not prompts:
            caption = pick(rng, ["no acute cardiopulmonary process", "normal chest radiograph",
                                  "no acute cardiopulmonary abnormality"])
        elif rng.random() < prompt_frac:
            caption = ", ".join(prompts.values())
        else:
            caption = " ".join(dict.fromkeys(sentences.values()))
        out.append(dict(dicom_id=r["dicom_id"], image_path=r["image_path"], caption=caption))
    return out
