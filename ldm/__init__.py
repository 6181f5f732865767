"""A from-scratch, readable latent diffusion model stack (tokenizer, text encoder, VAE, UNet, DDIM) whose
cross-attention maps are exposed for phrase grounding. Read ARCHITECTURE.md for the map of the files.

    from ldm import load_pipeline
    pipe = load_pipeline("weights/roentgen", device="cpu", dtype=torch.float32)
"""
from ldm.pipeline import Pipeline, load_pipeline, save_pipeline

__all__ = ["Pipeline", "load_pipeline", "save_pipeline"]
