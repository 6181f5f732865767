"""DDIM text-to-image sampling with classifier-free guidance (diffusers' StableDiffusionPipeline.__call__, reduced).

Used to look at what a model has learned: phantom-LDM samples for the README, and a sanity check that converted
real weights work (a RoentGen or MONAI CXR prompt should give a chest X-ray).
"""
import numpy as np
import torch
from PIL import Image


def latent_shape(pipe, batch_size):
    """(B, latent channels, h, w) for the family's image size: the VAE halves the side at every level but the last."""
    side = pipe.image["size"] // pipe.vae.downscale_factor
    return (batch_size, pipe.vae.config.latent_channels, side, side)


@torch.no_grad()
def sample(pipe, prompts, num_steps=50, guidance_scale=4.0, eta=0.0, generator=None, context=None, latents=None):
    """Generate one image per prompt; returns images in the family's value range, (B, C, H, W) float32.

    `context` (B, 77, D) replaces the encoded prompts, e.g. the learned rows' `LearnablePrompts.encode(prompts)`;
    the unconditional branch stays the plain encoder's "" prompt. `latents` (B, C, h, w) is the starting noise z_T
    instead of a draw from `generator`: two calls given the same latents differ only in their context.
    """
    device, dtype = pipe.unet.conv_in.weight.device, pipe.unet.conv_in.weight.dtype
    if isinstance(prompts, str):
        prompts = [prompts]
    B = len(prompts)
    if context is None:
        context = pipe.text_encoder(pipe.tokenizer(prompts).to(device))
    uncond = pipe.text_encoder(pipe.tokenizer([""] * B).to(device))  # the "" prompt of classifier-free guidance
    if latents is not None and tuple(latents.shape) != latent_shape(pipe, B):
        raise ValueError(f"sample: latents of shape {tuple(latents.shape)}, expected {latent_shape(pipe, B)}")
    z = latents if latents is not None else torch.randn(latent_shape(pipe, B), generator=generator, dtype=torch.float32)
    z = z.to(device, dtype)
    pipe.scheduler.set_timesteps(num_steps)
    for t in pipe.scheduler.timesteps:
        # one batched UNet call for both branches: [unconditional | conditional]
        out = pipe.unet(torch.cat([z, z]), int(t), torch.cat([uncond, context]).to(dtype))
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
        z = pipe.scheduler.step(out, int(t), z, eta=eta, generator=generator)
        _check_finite(z, f"the latents after step t={int(t)}", guidance_scale)
    images = pipe.vae.decode(z / pipe.scale_factor).float()
    _check_finite(images, "the decoded images", guidance_scale)
    return images


def _check_finite(x, what, guidance_scale):
    """NaN / inf would be written as a black picture (to_pil clips them): stop and name the likely setting."""
    if not torch.isfinite(x).all():
        raise ValueError(f"sampling: {what} hold NaN or inf values (guidance_scale {guidance_scale:g}, sample.py "
                         "--guidance: a scale that large overflows; the usual range is 1-10)")


def to_pil(images, value_range=(0.0, 1.0)):
    """(B, C, H, W) images in `value_range` -> list of PIL images (grey for 1 channel, RGB for 3)."""
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in x]


def grid(pil_images, cols=4):
    """Tile PIL images of equal size into one image."""
    w, h = pil_images[0].size
    rows = int(np.ceil(len(pil_images) / cols))
    canvas = Image.new(pil_images[0].mode, (cols * w, rows * h))
    for i, im in enumerate(pil_images):
        canvas.paste(im, ((i % cols) * w, (i // cols) * h))
    return canvas
