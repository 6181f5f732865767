"""Mixed precision for the frozen LDM's forward passes: the `autocast` config key ("none" | "bf16" | "fp16").

Under autocast the text encoder, the UNet and the inversion run their matrix products in bf16/fp16, while the
recorded cross-attention probabilities stay float32 (ldm/attention.py computes the recorded softmax with autocast
switched off) and so do the losses on them and the DDIM latents (the scheduler upcasts the model output).
Used by train.py's tuning step and inversions and by the heatmap extraction (grounding/heatmap.py).
bf16 needs no loss scaling; fp16 gradients can underflow, so the tuning step scales the loss (`grad_scaler`).
"""
import contextlib

import torch

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(mode):
    if mode not in AUTOCAST_DTYPES:
        raise ValueError(f"config key 'autocast': expected one of {list(AUTOCAST_DTYPES)}, got {mode!r}")
    return AUTOCAST_DTYPES[mode]


def autocast(device, mode):
    """torch.autocast on `device` ("cpu", "cuda", "cuda:1", a torch.device) for "bf16" / "fp16"; no-op for "none"."""
    dtype = _dtype(mode)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(device, mode):
    """A loss scaler for fp16 autocast; a disabled one (scale 1, `step` = optimizer.step()) otherwise."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=_dtype(mode) is torch.float16)
