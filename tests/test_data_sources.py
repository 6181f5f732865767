"""The real-data protocol on small files written here: which MS-CXR pairs are scored, which views enter the tuning
set, the Chest ImaGenome gold CSV behind the LUT, VinDr's ILD / Infiltration -> Pneumonia, the default phantom world
left byte-for-byte as it was."""
import dataclasses
import hashlib
import json
import os

import pytest

from grounding.data import curation as cu
from grounding.data.imagenome import read_gold_ids, read_imagenome, read_imagenome_gold_csv
from grounding.data.vindr import read_vindr, vindr_labels_path
from grounding.phantom import world as ph
from grounding.experiment import sources
from grounding.anatomy import REGIONS
from grounding.experiment.config import load_config, TrainConfig
from test_datasets import _csv, _img   # the same small file writers as the reader tests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# 1. MS-CXR: every pair by default, a subset by config key


def _pair(i, category, split):
    return dict(pair_id=f"p{i}", category=category, split=split, phrase="left lower " + category.lower())


def test_mscxr_split_all_by_default_and_subsets():
    pairs = [_pair(0, "Atelectasis", "train"), _pair(1, "Atelectasis", "val"), _pair(2, "Edema", "test"),
             _pair(3, "Cardiomegaly", "test"), _pair(4, "Edema", "val")]
    assert TrainConfig().mscxr_split == "all"
    scored, val, note = sources.mscxr_subsets(pairs, "all")
    assert scored == pairs and [p["pair_id"] for p in val] == ["p1", "p4"] and "ALSO scores" in note
    scored, val, note = sources.mscxr_subsets(pairs, "test")
    assert [p["pair_id"] for p in scored] == ["p2", "p3"] and [p["pair_id"] for p in val] == ["p1", "p4"]
    assert "disjoint" in note
    scored, val, _ = sources.mscxr_subsets(pairs, "val")  # scoring val: validation moves to train, still disjoint
    assert [p["pair_id"] for p in scored] == ["p1", "p4"] and [p["pair_id"] for p in val] == ["p0"]
    with pytest.raises(ValueError, match="mscxr_split.*'validate'"):
        sources.mscxr_subsets(pairs, "validate")
    v01 = [dict(p, split=None) for p in pairs]  # MS-CXR v0.1: no split column
    scored, val, note = sources.mscxr_subsets(v01, "all")
    assert len(scored) == 5 and val == [] and "off" in note
    with pytest.raises(ValueError, match="v0.1.*mscxr_split: all"):
        sources.mscxr_subsets(v01, "test", "ms.csv")


def test_class_counts_line():
    pairs = [dict(category=c) for c in ["Edema"] * 2 + ["Cardiomegaly"] * 1200]
    assert cu.class_counts(pairs) == "Cardiomegaly 1,200, Edema 2 = 1,202"


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    ph.build_world(root, ph.PhantomConfig.tiny())
    return root


def test_tune_yaml_scores_the_held_out_split_only(tiny_world, tmp_path):
    """The embedded default keeps its held-out table: test pairs only, validation on val pairs, disjoint."""
    cfg = load_config(TrainConfig, os.path.join(REPO, "tune.yaml"), [f"phantom_root={tiny_world}",
                                                                    f"out_dir={tmp_path}"])
    assert cfg.mscxr_split == "test"
    data = sources.load(cfg, need_samples=False)
    assert data.mscxr_loc and {p["split"] for p in data.mscxr_loc} == {"test"}
    assert not {p["pair_id"] for p in data.val_pairs} & {p["pair_id"] for p in data.mscxr_loc}
    every = sources.load(dataclasses.replace(cfg, mscxr_split="all"), need_samples=False)
    assert len(every.mscxr) == len(data.mscxr) + len([p for p in every.mscxr if p["split"] == "val"]) > len(data.mscxr)
    assert f"MS-CXR-loc pairs scored: {cu.class_counts(data.mscxr_loc)}" in data.report


def test_data_report_scores_the_weak_supervision_against_the_phantom_truth(tiny_world, tmp_path):
    """train.py's data report and evaluate.py's (no samples needed) both say how clean the curated set is."""
    cfg = load_config(TrainConfig, os.path.join(REPO, "tune.yaml"), [f"phantom_root={tiny_world}",
                                                                    f"out_dir={tmp_path}", "max_train_samples=2"])
    for need in (True, False):
        data = sources.load(cfg, need_samples=need)
        line = next(l for l in data.report.splitlines() if "against the phantom world's truth" in l)
        assert "precision 1.000" in line and "the first 2 (tuned on): precision" in line
        assert len(data.samples) == (2 if need else 0)


def test_paper_phantom_yaml_is_the_papers_settings_and_tune_yaml_departs_where_it_says():
    """configs/paper_phantom.yaml: the paper's method settings (docs/paper.md sections 4-6) on the phantom world;
    tune.yaml differs from it on the method keys its first lines name, and on nothing else."""
    from grounding.heatmap import LAYER_PRESETS, TRAIN_WINDOW
    from grounding.losses import PAPER_ALPHA, PAPER_EPS
    paper = load_config(TrainConfig, os.path.join(REPO, "configs", "paper_phantom.yaml"))
    quick = load_config(TrainConfig, os.path.join(REPO, "tune.yaml"))
    assert (paper.w_div, paper.w_loc, paper.lr, paper.batch_size, paper.optimizer) == (1.0, 1.0, 1e-4, 1, "adamw")
    assert tuple(paper.layers) == LAYER_PRESETS[("phantom", "tuning")] and paper.noisy_latents == "inversion"
    assert paper.num_inference_steps == 100 and tuple(paper.train_window) == TRAIN_WINDOW
    assert (paper.alpha, paper.eps, paper.jitter, paper.timesteps_per_step) == (PAPER_ALPHA, PAPER_EPS, 0.05, 0)
    assert paper.out_dir == "runs/paper_phantom" and paper.mscxr_split == quick.mscxr_split == "test"
    differ = {f.name for f in dataclasses.fields(TrainConfig) if getattr(paper, f.name) != getattr(quick, f.name)}
    assert differ == {"noisy_latents", "num_inference_steps", "layers", "w_div", "lr",       # named in tune.yaml
                      "max_steps", "max_train_samples", "out_dir"}, differ                   # budget and place


# ---------------------------------------------------------------------------------------------------------------
# 2. Frontal views only: PA by default, AP on request, lateral never


def _rec(study, dicom_id, view):
    return dict(dicom_id=dicom_id, subject_id="10000001", study_id=study, view=view, split="train",
                image_path=f"{dicom_id}.jpg", report_path="REPORT")


def test_tuning_set_views(tmp_path):
    report = tmp_path / "r.txt"
    report.write_text("IMPRESSION:\n Left lower lobe atelectasis.\n")
    recs = [_rec("1", "b", "PA"), _rec("1", "a", "LATERAL"), _rec("1", "0", "AP"),   # PA wins over lower ids
            _rec("2", "a", "LATERAL"), _rec("2", "c", "AP"),                         # AP only (+ lateral)
            _rec("3", "a", "LATERAL"), _rec("4", "a", "")]                           # no frontal view
    recs = [dict(r, report_path=str(report)) for r in recs]
    assert TrainConfig().views == ["PA"]
    samples, rep = cu.curate_tuning_set(recs)
    assert [(s["study_id"], s["dicom_id"], s["view"]) for s in samples] == [("1", "b", "PA")]
    assert rep["study without a PA image (skipped)"] == 3
    samples, rep = cu.curate_tuning_set(recs, views=("PA", "AP"))
    assert [(s["study_id"], s["dicom_id"]) for s in samples] == [("1", "b"), ("2", "c")]
    assert rep["study without a PA/AP image (skipped)"] == 2
    samples, _ = cu.curate_tuning_set(recs, views=("AP", "PA"))  # the order is the preference
    assert [(s["study_id"], s["dicom_id"]) for s in samples] == [("1", "0"), ("2", "c")]
    for bad in (["LATERAL"], ["PA", "LL"], []):
        with pytest.raises(ValueError, match="config key 'views'"):
            cu.curate_tuning_set(recs, views=bad)
    with pytest.raises(ValueError, match="config key 'views'"):  # refused when the config is read, before any run
        load_config(TrainConfig, None, ["views=[PA, LATERAL]"])
    with pytest.raises(ValueError, match="config key 'mscxr_split'"):
        load_config(TrainConfig, None, ["mscxr_split=validate"])


# ---------------------------------------------------------------------------------------------------------------
# 3. Chest ImaGenome gold CSV (and scene-graph folders with a gold id list)

GOLD_HEAD = ["image_id", "x1", "y1", "x2", "y2", "width", "height", "bbox_name", "annot_id", "original_x1",
             "original_x2", "original_y1", "original_y2", "original_width", "original_height", "annotator",
             "coord224", "coord_original"]


def _gold_row(image, name, box, annotator="A1"):
    x1, y1, x2, y2 = box
    return [f"{image}.dcm", 1, 2, 3, 4, 2, 2, name, "id", x1, x2, y1, y2, x2 - x1, y2 - y1, annotator,
            "[1, 2, 3, 4]", str(list(box))]


def test_gold_csv_strips_dcm_clips_and_averages_annotators(tmp_path):
    path = str(tmp_path / "gold.csv")
    _csv(path, GOLD_HEAD, [_gold_row("a", "right lung", (10, 10, 50, 90)),
                           _gold_row("a", "right lung", (12, 14, 52, 94), "A2"),      # a second annotator
                           _gold_row("a", "left lung", (-5, 20, 60, 130)),            # outside a 80x100 image
                           _gold_row("b", "right lung", (0, 0, 10, 10))])
    graphs, rep = read_imagenome_gold_csv(path, sizes={"a": (80, 100)})
    by_id = {g["dicom_id"]: g for g in graphs}
    assert set(by_id) == {"a", "b"}                                   # ".dcm" stripped
    assert by_id["a"]["boxes"]["right lung"] == (11.0, 12.0, 51.0, 92.0)  # the two annotators averaged
    assert by_id["a"]["boxes"]["left lung"] == (0.0, 20.0, 60.0, 100.0)   # clipped to the image, not to the box size
    assert (by_id["a"]["image_width"], by_id["a"]["image_height"]) == (80, 100)
    assert rep["anatomy box clipped to the image"] == 1
    assert rep["image with several annotators (boxes averaged per region)"] == 1
    assert rep["no image size known (clipped at 0 only)"] == 1          # b is not in the MIMIC metadata
    bad = _gold_row("a", "right lung", (10, 10, 50, 90))
    bad[GOLD_HEAD.index("original_x1")] = "n/a"
    _csv(path, GOLD_HEAD, [bad])
    with pytest.raises(ValueError, match=r"row 2 \(a/right lung\).*original_x1"):
        read_imagenome_gold_csv(path)


@dataclasses.dataclass
class _Cfg:
    lut_path: str = ""
    imagenome_gold_ids: str = ""


def test_lut_from_the_gold_csv_prints_boxes_per_region(tmp_path):
    path = str(tmp_path / "gold.csv")
    rows = []
    for image, annotators in (("a", ["A1", "A2"]), ("b", ["A1"])):
        for k, name in enumerate(REGIONS):
            for j, ann in enumerate(annotators):
                rows.append(_gold_row(image, name, (10 + k + j, 10 + k, 60 + k, 90 + k + j), ann))
    _csv(path, GOLD_HEAD, rows)
    records = [dict(dicom_id=i, image_width=100, image_height=120) for i in "ab"]
    lut, text, save = sources._lut(_Cfg(), path, records, str(tmp_path))
    assert not os.path.exists(tmp_path / "lut.json")                      # written only once all data has been read
    save()
    # two images, one with two annotators: every region averaged over 2 boxes, not 3
    assert "boxes averaged per region: " + ", ".join(f"{r} 2" for r in REGIONS) in text
    assert "gold CSV" in text and os.path.exists(tmp_path / "lut.json") and "left lower" in lut
    # a second run reads the saved LUT, and still says where it came from and how many boxes it averaged
    again, text2, _ = sources._lut(_Cfg(lut_path=str(tmp_path / "lut.json")), path, records, str(tmp_path))
    assert again == lut and "saved earlier" in text2 and "right lung 2, left lung 2" in text2 and "gold CSV" in text2
    with pytest.raises(ValueError, match="imagenome_gold_ids applies to a scene-graph folder"):
        sources._lut(_Cfg(imagenome_gold_ids="ids.txt"), path, records, str(tmp_path))


def test_scene_graph_folder_with_a_gold_id_list(tmp_path):
    folder = tmp_path / "scene_graphs"
    folder.mkdir()
    for d in ("a", "b", "c"):
        (folder / f"{d}_SceneGraph.json").write_text(json.dumps(
            {"image_id": d, "objects": [{"bbox_name": "right lung", "original_x1": 1, "original_y1": 2,
                                         "original_x2": 30, "original_y2": 40}]}))
    (tmp_path / "ids.txt").write_text("a.dcm\n\nc\n")
    _csv(str(tmp_path / "ids.csv"), ["image_id", "bbox_name"], [["a.dcm", "x"], ["b.dcm", "y"]])
    assert read_gold_ids(str(tmp_path / "ids.txt")) == {"a", "c"}
    assert read_gold_ids(str(tmp_path / "ids.csv")) == {"a", "b"}
    graphs, rep = read_imagenome(str(folder), gold_ids=read_gold_ids(str(tmp_path / "ids.txt")))
    assert [g["dicom_id"] for g in graphs] == ["a", "c"] and rep["not in the gold subset"] == 1


# ---------------------------------------------------------------------------------------------------------------
# 4. VinDr-CXR: ILD / Infiltration -> Pneumonia, one pair per (image, class), image_labels_test.csv

VINDR_LABEL_COLS = ["image_id", "Atelectasis", "ILD", "Infiltration", "Pleural effusion", "Pneumonia",
                    "Other disease", "No finding"]


def _vindr(tmp_path, with_labels=True):
    folder = tmp_path / "annotations"
    csv_path = str(folder / "annotations_test.csv")
    _csv(csv_path, ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"], [
        ["A", "R1", "ILD", 1, 1, 10, 10], ["A", "R2", "Infiltration", 2, 2, 12, 12],   # -> one Pneumonia pair
        ["B", "R1", "Infiltration", 5, 5, 15, 15],                                      # B: none of the 8 labelled
        ["C", "R1", "Atelectasis", 3, 3, 9, 9], ["C", "R2", "Atelectasis", 4, 4, 10, 10],
        ["C", "R3", "Atelectasis", 3, 3, 9, 9],                                         # a repeat of R1's box
        ["D", "R1", "No finding", "", "", "", ""]])
    if with_labels:
        _csv(str(folder / "image_labels_test.csv"), VINDR_LABEL_COLS,
             [["A", 0, 1, 1, 0, 1, 0, 0], ["B", 0, 0, 1, 0, 0, 1, 0], ["C", 1, 0, 0, 0, 0, 0, 0],
              ["D", 0, 0, 0, 0, 0, 0, 1]])
    for i in "ABCD":
        _img(str(tmp_path / "png" / f"{i}.png"))
    return csv_path, str(tmp_path / "png")


def test_vindr_ild_infiltration_become_pneumonia_with_the_image_labels(tmp_path):
    pairs, rep = read_vindr(*_vindr(tmp_path))
    got = {(p["dicom_id"], p["category"]): p["boxes"] for p in pairs}
    assert set(got) == {("A", "Pneumonia"), ("C", "Atelectasis")}
    assert got[("A", "Pneumonia")] == [(1.0, 1.0, 9.0, 9.0), (2.0, 2.0, 10.0, 10.0)]  # two radiologists, one pair
    assert len(got[("C", "Atelectasis")]) == 2 and rep["duplicate box (merged)"] == 1
    assert rep["Infiltration box on an image with none of the 8 labels (dropped, as the authors)"] == 1
    assert rep["ILD box -> Pneumonia"] == 1 and rep["Infiltration box -> Pneumonia"] == 1
    assert "image_labels_test.csv" in rep.name


def test_vindr_without_image_labels_converts_every_ild_infiltration_box(tmp_path):
    pairs, rep = read_vindr(*_vindr(tmp_path, with_labels=False))
    assert {(p["dicom_id"], p["category"]) for p in pairs} == {("A", "Pneumonia"), ("B", "Pneumonia"),
                                                                ("C", "Atelectasis")}
    assert "no image_labels CSV" in rep.name
    assert vindr_labels_path("/x/annotations_test.csv") == "/x/image_labels_test.csv"


# ---------------------------------------------------------------------------------------------------------------
# 5. The default phantom world is unchanged by the real-layout writer (the quickstart's numbers depend on it)

DEFAULT_TINY_WORLD_SHA1 = {  # sha1 of the tiny default world's CSVs, as written before the real-layout writer existed
    "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv": "f2177ee259c6a545f54c03a3e6f9d9daa2a6e32b",
    "mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv": "286c91bc11fa616157349d6186883d79c4817dd7",
    "ms-cxr/MS_CXR_Local_Alignment_v1.1.0.csv": "7654b8c727c6764879adc7f5804e3a8c81e83be3",
    "vindr-cxr/annotations_test.csv": "a2d6a91f04f1d88010e72bd3a557449eb2f9008a",
}


def test_default_world_is_byte_for_byte_unchanged(tiny_world):
    for rel, sha in DEFAULT_TINY_WORLD_SHA1.items():
        with open(os.path.join(tiny_world, rel), "rb") as f:
            assert hashlib.sha1(f.read()).hexdigest() == sha, rel
    assert not os.path.exists(os.path.join(tiny_world, "mimic-cxr-jpg", "2.0.0"))
