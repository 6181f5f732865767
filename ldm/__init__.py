"""ldm: the re-implemented chest X-ray latent diffusion model (tokenizer, text encoder, VAE, UNet, schedulers,
weight I/O). Exports are filled in by the lead."""
