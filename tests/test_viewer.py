"""viewer.html (ground.py's page): self-contained, and in headless Chromium a real mousemove over a canvas ranks the
words at that pixel exactly as grounder.rank_words does in Python from the same maps (skips without a browser)."""
import html
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import browser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_world import REPO, make_tiny_setup  # noqa: E402

sys.path.insert(0, REPO)
import ground  # noqa: E402
from ldm import load_pipeline  # noqa: E402
from grounding.data.images import preprocess  # noqa: E402
from grounding.heatmap import HeatmapConfig  # noqa: E402
from grounding.prompts import LearnablePrompts  # noqa: E402
from grounding.experiment.grounder import ground_batch, pixel_cell, rank_words, readings  # noqa: E402
from grounding.experiment.rows import load_rows, save_rows  # noqa: E402
from grounding.experiment.viewer import ranked_units  # noqa: E402
from grounding.experiment.words import prompt_words  # noqa: E402

PROMPT = "left lower lung opacity"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """ground.py on a wide (non-square) phantom image with learned rows; the page, and the same maps in Python."""
    root = tmp_path_factory.mktemp("viewer")
    s = make_tiny_setup(str(root))
    pipe = load_pipeline(s["model"])
    rows = LearnablePrompts(pipe.tokenizer, pipe.text_encoder)
    with torch.no_grad():
        rows.anatomy.add_(0.3 * torch.randn(rows.anatomy.shape, generator=torch.Generator().manual_seed(3)))
    save_rows(rows, str(root / "rows.safetensors"), HeatmapConfig(num_steps=10, family="phantom", layers=(4, 5)))
    load_rows(rows, str(root / "rows.safetensors"))
    first = sorted((root / "world" / "mimic-cxr-jpg" / "files").rglob("*.jpg"))[0]
    grey = np.asarray(Image.open(first).convert("L"))
    Image.fromarray(np.pad(grey, ((0, 0), (10, 30)), mode="edge")).save(root / "wide.png")
    ground.main([str(root / "wide.png"), "--prompt", PROMPT, "--weights", s["model"], "--prompts",
                 str(root / "rows.safetensors"), "--out", str(root / "g"), "--special", "--threads", "1"])
    # the same maps, computed here (ground.py is deterministic for the same batch)
    grey = np.asarray(Image.open(root / "wide.png"), dtype=np.float32) / 255
    pw = prompt_words(pipe.tokenizer, PROMPT, specials=True)
    reads = readings("phantom", 10, (400, 600), (4, 5))
    res = ground_batch(pipe, preprocess(grey, pipe.image)[None], [pw], rows, reads)[0]
    return dict(path=root / "g" / "viewer.html", res=res, pw=pw, reads=reads, W=grey.shape[1], H=grey.shape[0],
                size=pipe.image["size"], root=root)


def test_page_is_self_contained(page):
    text = page["path"].read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", text) and "<link" not in text
    assert not re.search(r"fetch\(|XMLHttpRequest|import\(|https?://", text)
    data = json.loads(html.unescape(re.search(r'<script type="application/json" id="data">(.*?)</script>', text,
                                              re.S).group(1)).replace("<\\/", "</"))
    im = data["images"][0]
    assert (im["width"], im["height"]) == (page["W"], page["H"]) and [r["name"] for r in im["readings"]] == \
        ["frozen", "untuned", "tuned"]
    assert set(im["prompts"]) == {"prompt", "swapped"} and im["prompts"]["prompt"]["ranked"][:2] == ["left", "lower"]


def _probe(page, script, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(page["path"].read_text().replace("</body>", f"<script>{script}</script></body>"))
    out = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=180)
    m = re.search(r'data-probe="([^"]*)"', out.stdout)
    assert m, out.stderr[-2000:]
    return json.loads(html.unescape(m.group(1)))


HOVER = """
window.addEventListener("load", () => setTimeout(() => {
  const at = (x, y) => {
    const c = document.getElementById("canvas-tuned"), r = c.getBoundingClientRect();
    c.dispatchEvent(new MouseEvent("mousemove", {bubbles: true, clientX: r.left + 1 + (x + 0.5) * img.scale,
                                                 clientY: r.top + 1 + (y + 0.5) * img.scale}));
    const h = document.getElementById("hover"), ranks = {};
    document.querySelectorAll("ol.rank").forEach((ol) => {
      ranks[ol.id.slice(5)] = [...ol.querySelectorAll("li")].map((li) => li.dataset.unit); });
    return {x: +h.dataset.x, y: +h.dataset.y, ranks: ranks};
  };
  const out = {pixels: PIXELS.map(([x, y]) => at(x, y))};
  const layer = document.getElementById("layer");
  layer.value = "0"; layer.dispatchEvent(new Event("input"));
  out.layer0 = at(PIXELS[0][0], PIXELS[0][1]);
  document.body.setAttribute("data-probe", JSON.stringify(out));
}, 300));
"""


@pytest.mark.skipif(browser() is None, reason="no headless browser installed (e.g. apt-get install chromium)")
def test_hover_ranks_the_words_as_python_does(page, tmp_path):
    W, H, size = page["W"], page["H"], page["size"]
    # pixels in the left lung, the right lung, near the top, low in the middle, and one in the cropped-away band
    pixels = [(int(W * 0.35), int(H * 0.45)), (int(W * 0.62), int(H * 0.5)), (int(W * 0.5), int(H * 0.15)),
              (int(W * 0.45), int(H * 0.8)), (2, int(H * 0.5))]
    got = _probe(page, HOVER.replace("PIXELS", json.dumps(pixels)), tmp_path)
    res, reads = page["res"], page["reads"]
    side = int(round(res["raw"][("tuned", "prompt")]["left"].shape[-1] ** 0.5))
    names = ranked_units(page["pw"])
    T = range(len(res["timesteps"]))
    tuned_rankings = set()
    for (x, y), seen in zip(pixels, got["pixels"]):
        assert (seen["x"], seen["y"]) == (x, y)                     # the page found the pixel under the mouse
        cell = pixel_cell(x, y, W, H, size, side)
        for r in reads:
            if cell is None:                                         # outside the model's centre crop: no ranking
                assert seen["ranks"][r.name] == []
                continue
            layers = [res["layers"].index(l) for l in r.cfg.resolved_layers()]
            want = [n for n, _ in rank_words(res["raw"][(r.model, "prompt")], names, cell, T, layers)]
            assert seen["ranks"][r.name] == want, (r.name, x, y)
        if cell is not None:
            tuned_rankings.add(tuple(seen["ranks"]["tuned"]))
    assert len(tuned_rankings) > 1            # the rankings differ across the image: a wrong cell would show
    # one chosen layer (index 0 of the recorded ones) instead of the reading's average
    x, y = pixels[0]
    cell = pixel_cell(x, y, W, H, size, side)
    for r in reads:
        want = [n for n, _ in rank_words(res["raw"][(r.model, "prompt")], names, cell, T, [0])]
        assert got["layer0"]["ranks"][r.name] == want
