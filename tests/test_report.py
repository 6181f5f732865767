"""report.html: one self-contained page (inline PNGs, no external resources), with the per-class table, the
best/worst overlay grid and an optional extra column; checked in a headless browser when one is installed."""
import re
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import browser

from grounding.experiment.tables import summarise
from grounding.experiment.report import Column, select_pairs, write_report


def _fixture(tmp_path):
    pairs, rows = [], {"frozen": [], "tuned": []}
    rng = np.random.default_rng(0)
    for i in range(6):
        path = tmp_path / f"img{i}.png"
        Image.fromarray((rng.random((80, 64)) * 255).astype(np.uint8)).save(path)
        cat = "Pneumothorax" if i < 3 else "Edema"
        pairs.append(dict(pair_id=f"p{i}", image_path=str(path), category=cat, prompt=f"left {cat.lower()}",
                          boxes=[(10, 12, 20, 30)], image_width=64, image_height=80))
        for m, base in (("frozen", 0.1), ("tuned", 0.1 + 0.05 * i)):
            rows[m].append(dict(pair_id=f"p{i}", category=cat, cnr=float(rng.random()), miou_percent=100 * base,
                                auc=0.5, pointing=1.0))
    summaries = {m: summarise(r, ["cnr", "miou_percent", "auc", "pointing"], n=200) for m, r in rows.items()}
    fake = lambda ps: [torch.rand(p["image_height"], p["image_width"]) for p in ps]   # noqa: E731
    columns = [Column("frozen", fake), Column("tuned", fake),
               Column("swapped", fake, prompt=lambda p: p["prompt"].replace("left", "right"))]
    return pairs, rows, summaries, columns


def test_select_pairs_best_and_worst():
    pairs = [dict(pair_id=f"p{i}", category="A") for i in range(5)]
    rows = {"frozen": [dict(pair_id=f"p{i}", miou_percent=20.0) for i in range(5)],
            "tuned": [dict(pair_id=f"p{i}", miou_percent=m) for i, m in enumerate([10.0, 50.0, 30.0, 0.0, 40.0])]}
    got = select_pairs(pairs, rows, n_show=2)["A"]
    assert [(p["pair_id"], tag) for p, tag, _ in got] == [("p1", "best"), ("p4", "best"), ("p3", "worst"),
                                                          ("p0", "worst")]
    assert got[0][2] == pytest.approx(30.0)                                # percentage points


def test_report_is_self_contained(tmp_path):
    pairs, rows, summaries, columns = _fixture(tmp_path)
    path = tmp_path / "report.html"
    size = write_report(str(path), "Data: test\nCode: abc", summaries, rows, pairs, columns, n_show=1)
    page = path.read_text()
    assert size == path.stat().st_size < 2_000_000
    assert not re.search(r"(src|href)=\"(?!data:)", page)                  # nothing fetched from elsewhere
    assert "<script" not in page and "<link" not in page
    # 2 classes x 2 pairs (1 best + 1 worst) x (image + 3 columns)
    assert page.count('src="data:image/png;base64,') == 16
    assert "right pneumothorax" in page and "Pneumothorax" in page and "Edema" in page and "swapped" in page
    assert "Data: test" in page and page.count("<table") == 3
    # one unit: the rows' percent is printed as it is (tuned p5: 35.0), never scaled again (3500.0) nor left a fraction
    assert "mIoU %<br>tuned" in page and "mIoU 35.0%" in page and "3500.0" not in page


@pytest.mark.skipif(browser() is None, reason="no headless browser installed (e.g. apt-get install chromium)")
def test_report_opens_in_headless_browser(tmp_path):
    pairs, rows, summaries, columns = _fixture(tmp_path)
    path = tmp_path / "report.html"
    write_report(str(path), "Data: test", summaries, rows, pairs, columns, n_show=1)
    # a COPY with a probe script counts the images the browser really decoded (the report itself has no script)
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text().replace("</body>", "<script>window.onload=function(){var ok=0;"
                     "document.querySelectorAll('img').forEach(function(i){if(i.naturalWidth>0)ok++;});"
                     "document.body.setAttribute('data-decoded', ok);};</script></body>"))
    out = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert "<table" in dom and "Pneumothorax" in dom, out.stderr[-2000:]
    assert 'data-decoded="16"' in dom
    assert dom.count("<tr>") >= 2 + 2 + 2 * 2


def test_the_outputs_block_names_every_file_once_with_what_it_holds(tmp_path):
    """The block train.py, evaluate.py and classify.py end with (grounding/experiment/outputs.py)."""
    from grounding.experiment.outputs import outputs_block
    for name in ("config.yaml", "eval_tuned.jsonl", "eval_frozen.jsonl", "eval_frozen_vs_tuned.md", "train.lock",
                 "eval_tuned.jsonl.provenance.json", "notes.txt", "report.html"):
        (tmp_path / name).write_text("x")
    (tmp_path / "overlays" / "tuned").mkdir(parents=True)
    for k in range(3):
        (tmp_path / "overlays" / "tuned" / f"p{k}.png").write_bytes(b"png")
    block = outputs_block(str(tmp_path), ["open report.html"])
    print(block)
    lines = block.splitlines()
    assert lines[0] == f"Outputs in {tmp_path}/:" and lines[-2:] == ["Next:", "  open report.html"]
    assert "train.lock" not in block and "notes.txt" in block                    # a lock is no output; the rest is
    assert lines[1].startswith("  config.yaml ") and "--resume" in lines[1]       # in a fixed order, described
    assert "\n  eval_frozen.jsonl, eval_tuned.jsonl\n" in block                     # one line per kind of file
    assert block.index("eval_frozen_vs_tuned.md") < block.index("eval_frozen.jsonl") < block.index("report.html")
    assert "overlays/ (3 files)" in block and all(len(line) <= 118 for line in lines)
    assert block.count("eval_tuned.jsonl") == 2                                   # the rows and their provenance
