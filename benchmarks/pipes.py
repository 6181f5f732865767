"""Random-weight pipelines at the benchmark sizes (the fields grounding/heatmap.py and train.py use).

  small:  the phantom world's layout (image 1x64x64 -> latent 3x32x32, 11 cross-attention layers, context 77x64);
          seconds on a CPU.
  monai:  the MONAI CXR LDM (image 1x512x512 in [0, 1] -> latent 3x64x64, UNet 263.6M, OpenCLIP-H text 77x1024).
  sd15:   Stable Diffusion 1.5 / RoentGen (image 3x512x512 in [-1, 1] -> latent 4x64x64, UNet 859.5M, CLIP-L 77x768).
Weights are random (default initialisation); speed does not depend on them. The tokenizer is a small BPE
trained on radiology phrases (ids fit every text encoder's vocabulary).
"""
from types import SimpleNamespace

import torch

from ldm.schedulers import DDIMScheduler, SchedulerConfig
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.tokenizer import train_bpe
from ldm.unet import UNet2DConditionModel, UNetConfig
from ldm.vae import AutoencoderKL, VAEConfig

CORPUS = ["left lower atelectasis", "right upper pneumonia", "bibasilar atelectasis", "cardiomegaly",
          "left pleural effusion", "right pneumothorax", "bilateral lower edema", "left apical opacity",
          "pulmonary edema", "lingular consolidation", "right costophrenic lung opacity", "left base and right",
          "small right pleural effusion with adjacent atelectasis", "retrocardiac opacity in the left lower lobe"]
PROMPT = "small left pleural effusion"

SIZES = {
    # family, image (C, S), range, text, vae, unet, scheduler, scale_factor
    "small": ("phantom", (1, 64), (0.0, 1.0), TextEncoderConfig.tiny, VAEConfig.tiny, UNetConfig.phantom,
              SchedulerConfig.monai_cxr, 1.0),
    "monai": ("monai_cxr", (1, 512), (0.0, 1.0), TextEncoderConfig.sd21, VAEConfig.monai_cxr, UNetConfig.monai_cxr,
              SchedulerConfig.monai_cxr, 0.3),
    "sd15": ("sd1", (3, 512), (-1.0, 1.0), TextEncoderConfig.clip_vit_l14, VAEConfig.sd, UNetConfig.sd15,
             SchedulerConfig.sd15, 0.18215),
}


def build_pipe(size, device="cpu", seed=0):
    """A pipe namespace (tokenizer, text_encoder, vae, unet, scheduler, scale_factor, family, image) on device,
    every module frozen (requires_grad False) and in eval mode."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    family, (channels, side), rng, text_cfg, vae_cfg, unet_cfg, sched_cfg, scale = SIZES[size]
    torch.manual_seed(seed)
    with torch.device(device):                                   # initialise where the model will run
        te, vae, unet = TextEncoder(text_cfg()), AutoencoderKL(vae_cfg()), UNet2DConditionModel(unet_cfg())
    for m in (te, vae, unet):
        m.eval().requires_grad_(False)
    tok = train_bpe(CORPUS, vocab_size=min(640, te.config.vocab_size), pad_id=0)
    return SimpleNamespace(tokenizer=tok, text_encoder=te, vae=vae, unet=unet,
                           scheduler=DDIMScheduler(sched_cfg()), scale_factor=scale, family=family,
                           prediction_type=sched_cfg().prediction_type,
                           image={"channels": channels, "size": side, "range": list(rng)})


def random_images(pipe, n, device="cpu", seed=1):
    """n random images (n, C, S, S) in the family's range (a smooth blob plus noise, not pure noise)."""
    g = torch.Generator().manual_seed(seed)
    C, S, (lo, hi) = pipe.image["channels"], pipe.image["size"], pipe.image["range"]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")
    out = []
    for _ in range(n):
        cx, cy = (torch.rand(2, generator=g) - 0.5).tolist()
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.2)
        img = (0.7 * blob + 0.3 * torch.rand(C, S, S, generator=g)).clamp(0, 1)
        out.append(lo + (hi - lo) * img)
    return torch.stack(out).to(device)
