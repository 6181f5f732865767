"""The `autocast` config key is honoured (CPU): the tuning step and the heatmap extraction run the UNet in bf16.

What is checked, on CPU (which supports bf16 autocast): forward hooks see bf16 outputs from the UNet's and the text
encoder's Linear layers inside train.py's tuning step (the gradient-carrying forward) and inside extract_heatmaps
when autocast is "bf16", float32 when it is "none"; the first tuning loss is finite, float32 and close to the fp32
one; heatmaps stay close to fp32; fp16 (with loss scaling) trains to finite losses; a bad value names the key.
"""
import dataclasses

import pytest
import torch
from torch import nn

from conftest import cmp
from grounding.heatmap import extract_heatmaps
from grounding.precision import autocast
from test_heatmap import tiny_pipe, tiny_heatmap_config
from tiny_world import make_tiny_setup


class LinearDtypes:
    """Global forward hook: (grad enabled?, output dtype) of every nn.Linear call while active."""

    def __enter__(self):
        self.seen = []

        def hook(module, args, out):
            if isinstance(module, nn.Linear) and isinstance(out, torch.Tensor):
                self.seen.append((torch.is_grad_enabled(), out.dtype))
        self.handle = nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def dtypes(self, grad=None):
        return {d for g, d in self.seen if grad is None or g == grad}


def test_heatmap_extraction_runs_under_the_configured_autocast():
    pipe = tiny_pipe()
    image = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    texts = ["bibasilar atelectasis and right pneumothorax"]
    cfg = tiny_heatmap_config()
    with LinearDtypes() as fp32:
        h32 = extract_heatmaps(pipe, image, texts, cfg)
    with LinearDtypes() as bf16:
        h16 = extract_heatmaps(pipe, image, texts, dataclasses.replace(cfg, autocast="bf16"))
    assert fp32.dtypes() == {torch.float32} and bf16.dtypes() == {torch.bfloat16}
    assert h16.dtype == torch.float32 and h16.shape == h32.shape
    corr = torch.corrcoef(torch.stack([h16.flatten(), h32.flatten()]))[0, 1].item()
    print(f"heatmap bf16 autocast vs fp32: correlation {corr:.4f}")
    cmp("heatmap bf16 autocast vs fp32", h16, h32, atol=0.1)
    assert corr > 0.95


def test_bad_autocast_value_names_the_key():
    with pytest.raises(ValueError, match="config key 'autocast'.*'bfloat'"):
        autocast("cpu", "bfloat")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_tiny_setup(str(tmp_path_factory.mktemp("amp")))


def tune_once(setup, tmp_path, monkeypatch, mode):
    """train.py in-process for 1 step on 2 samples; returns (losses, Linear dtypes seen)."""
    import train
    from grounding import tuning
    losses = []
    real = tuning.grounding_loss

    def recording(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        losses.append(loss.detach())
        return loss, parts
    monkeypatch.setattr(tuning, "grounding_loss", recording)
    with LinearDtypes() as seen:
        train.main(["--config", setup["config"], f"autocast={mode}", "max_steps=1", "eval_at_end=false",
                    "max_train_samples=2",
                    "threads=0", f"out_dir={tmp_path / mode}"])
    return losses, seen


def test_tuning_step_runs_under_the_configured_autocast(setup, tmp_path, monkeypatch):
    base, seen32 = tune_once(setup, tmp_path, monkeypatch, "none")
    amp, seen16 = tune_once(setup, tmp_path, monkeypatch, "bf16")
    # the gradient-carrying forward (text encoder + UNet of the tuning step) and the inversions (no grad)
    assert seen32.dtypes(grad=True) == {torch.float32} and seen32.dtypes(grad=False) == {torch.float32}
    assert seen16.dtypes(grad=True) == {torch.bfloat16} and seen16.dtypes(grad=False) == {torch.bfloat16}
    # the first step sees the same rows in both runs: the difference is precision alone
    assert base[0].dtype == amp[0].dtype == torch.float32 and torch.isfinite(amp[0])
    print(f"first tuning loss: fp32 {base[0].item():.5f}, bf16 autocast {amp[0].item():.5f}")
    assert abs(base[0].item() - amp[0].item()) < 0.02 * abs(base[0].item())
    fp16, seen = tune_once(setup, tmp_path, monkeypatch, "fp16")   # loss scaling path (GradScaler)
    assert seen.dtypes(grad=True) == {torch.float16} and all(torch.isfinite(l) for l in fp16)
