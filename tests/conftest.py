"""Shared test helpers: the nn-zero-to-hero style `cmp` report, seeding, and reference-library skips."""
import shutil

import pytest
import torch


def cmp(name, ours, ref, atol=1e-4, rtol=0.0, scale=None):
    """Print exact / allclose / max-diff for one tensor pair and return the max abs diff.

    `scale` (default: max |ref|, at least 1) makes the tolerance relative to the output scale.
    """
    ours, ref = ours.detach().float().cpu(), ref.detach().float().cpu()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item() if ours.numel() else 0.0
    if scale is None:
        scale = max(ref.abs().max().item() if ref.numel() else 1.0, 1.0)
    exact = torch.equal(ours, ref)
    close = diff <= atol * scale + rtol
    print(f"{name:40s} | exact: {str(exact):5s} | allclose: {str(close):5s} | maxdiff: {diff:.3e}")
    return diff / scale


def need(module_name):
    """Import a test-only reference library, or skip the test cleanly when it is absent."""
    return pytest.importorskip(module_name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def clip_bpe_path():
    """Path to the real CLIP vocabulary (bpe_simple_vocab_16e6.txt.gz); skips when it cannot be found or fetched."""
    from clip_vocab import clip_bpe_path as find

    path = find()
    if path is None:
        pytest.skip("real CLIP BPE file unavailable: set CLIP_BPE_PATH=.../bpe_simple_vocab_16e6.txt.gz "
                    "or allow `pip download open-clip-torch` (see tests/clip_vocab.py)")
    return path


def browser():
    """A headless Chromium / Chrome on PATH (the page tests: report.html, ground.py's viewer.html), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None
