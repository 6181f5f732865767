"""A from-scratch, readable latent diffusion model stack (tokenizer, text encoder, VAE, UNet, DDIM) whose
cross-attention maps are exposed for phrase grounding. Read ARCHITECTURE.md for the map of the files.

    from ldm import load_pipeline
    pipe = load_pipeline("weights/roentgen", device="cpu", dtype=torch.float32)
"""
__all__ = ["Pipeline", "load_pipeline", "save_pipeline"]


def __getattr__(name):
    # imported on first use, so that `python -m ldm.tokenizer` (and friends) run without importing the whole stack
    if name in __all__:
        if name == "Pipeline":
            from ldm.pipeline import Pipeline
            return Pipeline
        from ldm.weights import folder
        return getattr(folder, name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
