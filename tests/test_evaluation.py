"""Scoring in grounding/experiment/evaluation.py: the metric protocol reaches every metric, rows record it, resume checks it.

The heatmap extraction is replaced by a fixed map (no model): these tests are about what happens after it.
"""
import math

import pytest
import torch

from grounding.experiment import evaluation as ev
from grounding.metrics import auc_binned5, auc_roc, cnr, miou, pointing_game
from grounding.experiment.config import TrainConfig


def _pair():
    # a tall 8 x 16 image and a 4 x 4 model frame: the crop keeps rows 4..11 (scale 2), rows 0-3 and 12-15 are NaN
    return dict(pair_id="p0", category="Edema", prompt="left edema", image_path="unused.png", image_width=8,
                image_height=16, boxes=[(0, 2, 4, 4), (4, 6, 4, 4)])   # box 1 reaches into the band, they touch


def _model_map():
    return torch.tensor([[1.0, 1.0, 0.0, 0.0],
                         [1.0, 0.5, 0.5, 0.0],
                         [0.0, 0.5, 1.0, 0.25],
                         [0.0, 0.0, 0.25, 0.0]])


@pytest.fixture
def fake_extraction(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)                      # the pair's image file: its bytes go into each row's digest
    (tmp_path / "unused.png").write_bytes(b"image bytes")
    monkeypatch.setattr(ev, "preprocess", lambda path, image_cfg: torch.zeros(1, 4, 4))
    monkeypatch.setattr(ev, "extract_heatmaps_shared", lambda pipe, images, variants: [
        [torch.stack([_model_map()] * len(texts))] * len(cfgs) for texts, _, cfgs in variants])


class _Pipe:
    image = {"channels": 1, "size": 4, "range": [0.0, 1.0]}


def test_score_uses_the_protocol_for_cnr_and_miou_only():
    full = ev.to_original(_model_map(), 8, 16)
    boxes = _pair()["boxes"]
    ref, old = ev.score(full, boxes), ev.score(full, boxes, "per_box")
    assert set(ref) == set(ev.ROW_METRICS)
    assert ref["cnr"] == cnr(full, boxes) and old["cnr"] == cnr(full, boxes, protocol="per_box")
    assert ref["miou_percent"] == 100 * miou(full, boxes)                           # rows keep mIoU in percent
    assert old["miou_percent"] == 100 * miou(full, boxes, protocol="per_box")
    assert ref["cnr"] != pytest.approx(old["cnr"]) and ref["miou_percent"] < old["miou_percent"]   # band pixels miss
    for m, f in (("auc", auc_roc), ("auc_binned5", auc_binned5), ("pointing", pointing_game)):
        assert ref[m] == old[m] == f(full, boxes)


def test_the_mapped_back_pair_by_hand():
    full = ev.to_original(_model_map(), 8, 16)
    boxes = _pair()["boxes"]
    # crop rows 4..11; original pixel (r, c) shows model pixel ((r - 4) // 2, c // 2) (2 x 2 blocks).
    # Box 1 = cols 0-3, rows 2-5: rows 2-3 NaN (8 px), rows 4-5 = model (0, 0..1) = 1.0 (8 px).
    # Box 2 = cols 4-7, rows 6-9 = model rows 1-2, cols 2-3: .5, 0, 1, .25 (4 px each).
    assert torch.isnan(full[:4]).all() and torch.isnan(full[12:]).all() and not torch.isnan(full[4:12]).any()
    # Predicted px (4 per model value above thr; model has four 1s, three .5s, two .25s):
    #   thr .1/.2: 36, inter 8 + 12 = 20;  .3/.4: 28, inter 8 + 8 = 16;  .5: 16, inter 8 + 4 = 12.
    # reference target 32 px (band included): 20/48, 20/48, 16/44, 16/44, 12/36
    assert miou(full, boxes) == pytest.approx((2 * 5 / 12 + 2 * 4 / 11 + 1 / 3) / 5, abs=1e-12)
    # per_box / union target 24 valid px: 20/40, 20/40, 16/36, 16/36, 12/28
    for protocol in ("per_box", "union"):
        assert miou(full, boxes, protocol=protocol) == pytest.approx((1 + 8 / 9 + 3 / 7) / 5, abs=1e-12)
    # CNR, in model pixels (4 px each, so the means and variances are those of the model values):
    # box 1: in {1} var 0; out = the other 14 valid model px: mean 2/7, var 97/784 -> 20/sqrt(97)
    # reference box 2: in {.5, 0, 1, .25} mean 7/16 var 35/256; out = 10 px outside both: mean 9/40,
    #   var 169/1600 -> (17/80) / (sqrt(1551)/80) = 17/sqrt(1551)
    # per_box box 2: out = 12 px (box 1 included): mean 17/48, var 395/2304 -> 4/sqrt(710)
    # union box 1: out = the same 10 px -> (31/40) / (13/40) = 31/13
    assert cnr(full, boxes) == pytest.approx((20 / math.sqrt(97) + 17 / math.sqrt(1551)) / 2, abs=1e-12)
    assert cnr(full, boxes, protocol="per_box") == pytest.approx((20 / math.sqrt(97) + 4 / math.sqrt(710)) / 2,
                                                                 abs=1e-12)
    assert cnr(full, boxes, protocol="union") == pytest.approx((31 / 13 + 17 / math.sqrt(1551)) / 2, abs=1e-12)


def test_evaluate_pairs_records_the_protocol_and_refuses_a_mixed_resume(fake_extraction, tmp_path):
    path = str(tmp_path / "rows.jsonl")
    record = {"weights": "w", "code": "c"}
    rows = ev.evaluate_pairs(_Pipe(), [_pair()], None, rows_path=path, record=record)
    full = ev.to_original(_model_map(), 8, 16)
    assert rows[0]["protocol"] == "reference" and rows[0]["cnr"] == cnr(full, _pair()["boxes"])
    rows = ev.evaluate_pairs(_Pipe(), [_pair()], None, protocol="union")            # no file: nothing to resume
    assert rows[0]["protocol"] == "union" and rows[0]["cnr"] == cnr(full, _pair()["boxes"], protocol="union")
    # the same record under another protocol: the rows file is refused, naming the key
    with pytest.raises(SystemExit, match="metric_protocol: 'reference' -> 'per_box'"):
        ev.evaluate_pairs(_Pipe(), [_pair()], None, rows_path=path, record=record, protocol="per_box")


def test_config_key_defaults_to_reference_and_is_checked():
    assert TrainConfig().metric_protocol == "reference"
    with pytest.raises(ValueError, match="metric_protocol"):
        TrainConfig(metric_protocol="per-box")


def test_resume_rescores_a_row_whose_pair_prompt_changed(fake_extraction, tmp_path, capsys):
    import json
    path = str(tmp_path / "rows.jsonl")
    record = {"weights": "w", "code": "c"}
    ev.evaluate_pairs(_Pipe(), [_pair()], None, rows_path=path, record=record)
    changed = dict(_pair(), prompt="right edema")        # e.g. a VinDr prompt from a rebuilt LUT, same pair id
    rows = ev.evaluate_pairs(_Pipe(), [changed], None, rows_path=path, record=record)
    assert "scored on another version of their pair" in capsys.readouterr().out and rows[0]["prompt"] == "right edema"
    assert ev.read_rows(path)["p0"]["prompt"] == "right edema"          # the new row is the one a resume reads
    ev.evaluate_pairs(_Pipe(), [changed], None, rows_path=path, record=record)
    assert "another version" not in capsys.readouterr().out
    assert [json.loads(l)["prompt"] for l in open(path)] == ["right edema"]   # a resume rewrites one row per pair


def test_rows_of_the_fraction_era_resume_in_percent(fake_extraction, tmp_path, capsys):
    """Rows files written when mIoU was a fraction (`miou`, `miou_true`, ...; classify.py's `miou` {source: value})
    are read in percent: the resumed row is the row this version computes, the table over it is the same table."""
    import json
    path = str(tmp_path / "rows.jsonl")
    record = {"weights": "w", "code": "c"}
    fresh = ev.evaluate_pairs(_Pipe(), [_pair()], None, rows_path=path, record=record)[0]
    old = {k: v for k, v in fresh.items() if k != "miou_percent"}
    old["miou"] = fresh["miou_percent"] / 100                                         # as the older version wrote it
    old.update(miou_true=0.25, miou_swap=0.05, miou_drop=0.2)
    with open(path, "w") as f:
        f.write(json.dumps(old) + "\n")
    rows = ev.evaluate_pairs(_Pipe(), [_pair()], None, rows_path=path, record=record)
    assert "resuming: 1 of 1 pairs already scored" in capsys.readouterr().out
    assert rows[0]["miou_percent"] == pytest.approx(fresh["miou_percent"], rel=1e-15) and "miou" not in rows[0]
    assert (rows[0]["miou_true_percent"], rows[0]["miou_swap_percent"]) == (25.0, 5.0)
    assert rows[0]["miou_drop_percent"] == pytest.approx(20.0)
    assert "miou_percent" in json.loads(open(path).readline())                        # the file is rewritten in percent
    cls = ev.percent_row({"pair_id": "c", "miou": {"frozen": 0.5, "tuned": 0.25}})
    assert cls == {"pair_id": "c", "miou_percent": {"frozen": 50.0, "tuned": 25.0}}
    assert ev.percent_row(dict(rows[0])) == rows[0]                                   # a current row stays as it is
    _, md = ev.summary_table(rows, n_boot=10)
    assert md.splitlines()[0] == "| class | n | cnr | miou | auc | auc_binned5 | pointing |"
    assert f"| {fresh['miou_percent']:.2f} [" in md                                # the rows' percent, unscaled


def test_resume_rescores_a_pair_whose_data_was_edited_in_place(fake_extraction, tmp_path, capsys):
    """The provenance record names the data by path only: a box or an image edited since was still resumed."""
    path = str(tmp_path / "rows.jsonl")
    record = {"weights": "w", "code": "c"}
    ev.evaluate_pairs(_Pipe(), [_pair()], None, rows_path=path, record=record)
    ev.evaluate_pairs(_Pipe(), [_pair()], None, rows_path=path, record=record)
    assert "another version" not in capsys.readouterr().out             # unchanged: resumed
    moved = dict(_pair(), boxes=[(0, 2, 4, 4), (4, 8, 4, 4)])           # one box edited in the CSV
    rows = ev.evaluate_pairs(_Pipe(), [moved], None, rows_path=path, record=record)
    assert "1 rows were scored on another version" in capsys.readouterr().out
    assert rows[0]["cnr"] == cnr(ev.to_original(_model_map(), 8, 16), moved["boxes"])
    (tmp_path / "unused.png").write_bytes(b"other image bytes")          # the image replaced under the same name
    ev.evaluate_pairs(_Pipe(), [moved], None, rows_path=path, record=record)
    assert "1 rows were scored on another version" in capsys.readouterr().out


def test_swap_table_without_one_sided_prompts_says_so(fake_extraction):
    pair = dict(_pair(), prompt="edema", category="Edema")               # names no side: not in the swap test
    rows, _, tables, swap_md, _ = ev.compare_models(_Pipe(), [pair], [ev.Model("frozen")], swap=True, n_boot=50)
    assert "no pair takes part" in swap_md and "Edema" in tables["frozen"] and "true_side" not in rows["frozen"][0]


def test_a_nan_heatmap_names_the_pair_and_the_likely_cause():
    with pytest.raises(ValueError, match="pair p0 .*NaN.*autocast"):
        ev._score_pair(_pair(), _model_map() * float("nan"))


def test_evaluate_help_says_what_each_split_is_and_how_many_pairs_it_holds(capsys):
    import evaluate
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    text = capsys.readouterr().out
    for split in ("mscxr", "mscxr-loc", "vindr", "phantom"):
        assert f"\n  {split} " in text, split                            # each split has its paragraph
    assert "1,162 pairs" in text and "1,043 pairs" in text and "443 pairs in 7 classes" in text   # docs/paper.md s. 8


def test_the_phantom_counts_in_evaluate_help_are_the_default_worlds(tmp_path_factory):
    """evaluate.py --help gives each split's pairs in the default phantom world: they must be the world's counts.
    Reads the checkout's data/phantom when the quickstart has built the current version, else builds the default
    world (seed 0) in a temporary folder (about half a minute)."""
    import json
    import os
    import evaluate
    from grounding.experiment import sources
    from grounding.experiment.config import load_config
    from grounding.phantom.world import WORLD_VERSION, ensure_phantom
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = os.path.join(repo, "data", "phantom")
    try:
        world = json.load(open(os.path.join(root, "world.json")))
        current = world.get("version", 1) == WORLD_VERSION and world["config"]["seed"] == 0
    except (OSError, ValueError, KeyError):
        current = False
    if not current:
        root = str(tmp_path_factory.mktemp("default_world") / "phantom")
        ensure_phantom(root, seed=0)
    n = {}
    for split in ("test", "all"):
        cfg = load_config(TrainConfig, os.path.join(repo, "tune.yaml"),
                          [f"phantom_root={root}", f"mscxr_split={split}"])
        data = sources.load(cfg, need_samples=False, image_size=64, write_lut=False)   # the phantom LDM's size
        n[split] = (len(data.mscxr), len(data.mscxr_loc), len(data.vindr))
    text = " ".join(evaluate.SPLITS_HELP.split())
    assert f"Phantom: {n['test'][0]} with tune.yaml's mscxr_split: test, {n['all'][0]} with mscxr_split: all" in text
    assert (f"Phantom: {n['test'][1]} with mscxr_split: test (the quickstart's held-out table), {n['all'][1]} "
            "with all") in text
    assert f"Phantom: {n['test'][2]}." in text and n["test"][2] == n["all"][2]
    assert (f"as mscxr-loc (the name for the phantom world): {n['test'][1]} with tune.yaml, {n['all'][1]} "
            "with all") in text
