"""Bad input gets a clear error naming the file, key, row or value and what to do; nothing is dropped silently.

Truncated and ragged CSVs, split values outside the release's, a curation that leaves no tuning sample, configured
paths that do not exist, a broken LUT file, a broken phantom world.json, truncated images."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from grounding.data.lut import load_lut

from grounding.data import readers as ds
from grounding.data.images import load_image
from grounding.data.imagenome import read_gold_ids
from grounding.experiment import sources
from grounding.experiment.config import TrainConfig, load_config
from grounding.phantom import world as ph
from test_datasets import MSCXR_COLS, _csv, _img


# ---------------------------------------------------------------------------------------------------------------
# CSV files: empty, header only, ragged rows


def test_read_csv_refuses_empty_header_only_and_ragged_files(tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("")
    with pytest.raises(ValueError, match=r"split.csv: no header row"):
        ds._read_csv(str(path), ["dicom_id", "split"])
    path.write_text("dicom_id,split\n")
    with pytest.raises(ValueError, match=r"split.csv: no data rows \(empty or truncated file\?\)"):
        ds._read_csv(str(path), ["dicom_id", "split"])
    path.write_text("dicom\n")  # the column check does not need a data row
    with pytest.raises(ValueError, match=r"missing columns \['dicom_id', 'split'\]"):
        ds._read_csv(str(path), ["dicom_id", "split"])
    path.write_text("dicom_id,split\na,train\nb,validate,x\n")
    with pytest.raises(ValueError, match=r"split.csv row 3 has 3 fields, the header has 2 \(an unquoted comma"):
        ds._read_csv(str(path), ["dicom_id", "split"])
    path.write_text("dicom_id,split\na,train\nb\n")  # cut off mid-row
    with pytest.raises(ValueError, match=r"split.csv row 3 has 1 fields, the header has 2 .*truncated file"):
        ds._read_csv(str(path), ["dicom_id", "split"])
    path.write_text('dicom_id,split\na,train\n\n"b,c",test\n')  # blank lines skipped, quoted commas kept
    assert ds._read_csv(str(path), ["dicom_id"]) == [{"dicom_id": "a", "split": "train"},
                                                     {"dicom_id": "b,c", "split": "test"}]


def test_readers_name_a_truncated_csv(tmp_path):
    root = str(tmp_path / "mimic")
    _csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"),
         ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"], [["d0", "10000001", "5", "PA"]])
    _csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv"), ["dicom_id", "study_id", "subject_id", "split"], [])
    with pytest.raises(ValueError, match=r"metadata.csv row 2 has 4 fields, the header has 6"):
        ds.read_mimic(root)
    _csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"),
         ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"],
         [["d0", "10000001", "5", "PA", 3, 4]])
    with pytest.raises(ValueError, match=r"split.csv: no data rows"):  # was read as "every image not in the split"
        ds.read_mimic(root)
    _csv(str(tmp_path / "ids.csv"), ["image_id"], [])
    with pytest.raises(ValueError, match=r"ids.csv: no data rows"):
        read_gold_ids(str(tmp_path / "ids.csv"))


# ---------------------------------------------------------------------------------------------------------------
# Split values outside the release's: counted by value in the data report (were kept, then matched no split)


def test_mimic_split_values_outside_the_release_are_counted(tmp_path):
    root = str(tmp_path / "mimic")
    meta, split = [], []
    for i, value in enumerate(["train", "Train", "", "validate"]):
        subject, study = f"1000000{i}", f"5000000{i}"
        meta.append([f"d{i}", subject, study, "PA", 30, 40])
        split.append([f"d{i}", study, subject, value])
        _img(ds.mimic_image_path(root, subject, study, f"d{i}"))
    _csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"),
         ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"], meta)
    _csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv"), ["dicom_id", "study_id", "subject_id", "split"], split)
    recs, rep = ds.read_mimic(root)
    assert [r["dicom_id"] for r in recs] == ["d0", "d3"]
    assert rep["split 'Train' not one of train/validate/test (skipped)"] == 1
    assert rep["split '' not one of train/validate/test (skipped)"] == 1 and "e.g. d2" in str(rep)


def test_mscxr_split_values_outside_the_release_are_counted(tmp_path):
    rel = "files/p10/p10000000/s50000000/d0.jpg"
    _img(str(tmp_path / rel))
    rows = [["d0", "Cardiomegaly", f"enlarged heart {i}", rel, 10, 10, 20, 15, 40, 30, value]
            for i, value in enumerate(["test", "Test", "", "val"])]
    _csv(str(tmp_path / "ms.csv"), MSCXR_COLS + ["split"], rows)
    pairs, rep = ds.read_mscxr(str(tmp_path / "ms.csv"), str(tmp_path))
    assert [p["split"] for p in pairs] == ["test", "val"]
    assert rep["split 'Test' not one of train/val/test (skipped)"] == 1 and "e.g. row 3" in str(rep)
    assert rep["split '' not one of train/val/test (skipped)"] == 1


def test_nan_boxes_are_dropped_and_repeated_rows_are_one_box(tmp_path):
    """A NaN coordinate was clipped to the full width (max(0, nan) = 0, min(W, nan) = W) and scored; a repeated CSV
    row counted as a second box of its pair (halving that pair's CNR under the reference protocol)."""
    rel = "files/p10/p10000000/s50000000/d0.jpg"
    _img(str(tmp_path / rel))
    rows = [["d0", "Cardiomegaly", "enlarged heart", rel, "nan", 10, 20, 15, 40, 30, "test"],
            ["d0", "Cardiomegaly", "enlarged heart", rel, 5, 10, 20, 15, 40, 30, "test"],
            ["d0", "Pneumothorax", "left pneumothorax", rel, 5, 10, "inf", 15, 40, 30, "test"],
            ["d0", "Lung Opacity", "left opacity", rel, 5, 10, 20, 15, 40, 30, "test"],
            ["d0", "Lung Opacity", "left opacity", rel, 5, 10, 20, 15, 40, 30, "test"],     # the row above, again
            ["d0", "Lung Opacity", "left opacity", rel, 1, 1, 20, 15, 40, 30, "test"]]
    _csv(str(tmp_path / "ms.csv"), MSCXR_COLS + ["split"], rows)
    pairs, rep = ds.read_mscxr(str(tmp_path / "ms.csv"), str(tmp_path))
    assert [(p["category"], p["boxes"]) for p in pairs] == [("Cardiomegaly", [(5.0, 10.0, 20.0, 15.0)]),
                                                            ("Lung Opacity", [(5.0, 10.0, 20.0, 15.0), (1.0, 1.0, 20.0, 15.0)])]
    assert rep["box with a NaN or infinite coordinate (dropped)"] == 2 and "CSV row 2: d0 / Cardiomegaly" in str(rep)
    assert rep["pair with no box left (dropped)"] == 1                    # the pneumothorax pair's one box was inf
    assert rep["duplicate box of a pair (merged)"] == 1
    assert rep["pairs with several boxes (kept, grouped)"] == 1           # the opacity pair, not the cardiomegaly one


# ---------------------------------------------------------------------------------------------------------------
# sources.load: the config's paths and what the curation leaves


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    ph.build_world(root, ph.PhantomConfig.tiny())
    return root


def _mimic_cfg(world, tmp_path, *overrides):
    """The tiny phantom world read as data: mimic (its files are in the real formats)."""
    return load_config(TrainConfig, None, [
        "data=mimic", f"mimic_root={world}/mimic-cxr-jpg", f"reports_root={world}/mimic-cxr-reports",
        f"mscxr_csv={world}/ms-cxr/MS_CXR_Local_Alignment_v1.1.0.csv",
        f"imagenome_root={world}/chest-imagenome/silver_dataset/scene_graph", f"out_dir={tmp_path}", *overrides])


def test_no_tuning_sample_left_names_the_drops_and_config_keys(tiny_world, tmp_path):
    assert sources.load(_mimic_cfg(tiny_world, tmp_path / "ok")).samples  # the world as written has samples
    empty = tmp_path / "no-reports"
    empty.mkdir()
    cfg = _mimic_cfg(tiny_world, tmp_path / "run", f"reports_root={empty}")
    with pytest.raises(ValueError, match=r"no tuning sample left after curation \(\d+ MIMIC images of the train "
                                         r"split; most dropped: report file missing: \d+.*reports_root "
                                         f"{empty}.*views \\['PA'\\]"):
        sources.load(cfg)
    assert sources.load(cfg, need_samples=False).mscxr  # evaluation needs no tuning sample


def test_a_configured_vindr_csv_that_does_not_exist_is_an_error(tiny_world, tmp_path):
    images = f"vindr_images={tiny_world}/vindr-cxr/test"
    data = sources.load(_mimic_cfg(tiny_world, tmp_path, f"vindr_csv={tiny_world}/vindr-cxr/annotations_test.csv",
                                   images), need_samples=False)
    assert data.vindr
    assert sources.load(_mimic_cfg(tiny_world, tmp_path), need_samples=False).vindr == []  # empty: not configured
    with pytest.raises(ValueError, match=r"config key vindr_csv: /no/annotations_test.csv not found.*leave vindr_csv "
                                         "empty"):
        sources.load(_mimic_cfg(tiny_world, tmp_path, "vindr_csv=/no/annotations_test.csv", images))
    with pytest.raises(ValueError, match=r"config key vindr_images: folder /no/test_png not found"):
        sources.load(_mimic_cfg(tiny_world, tmp_path, f"vindr_csv={tiny_world}/vindr-cxr/annotations_test.csv",
                                "vindr_images=/no/test_png"))


def test_an_imagenome_root_that_does_not_exist_names_the_config_key(tiny_world, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config key imagenome_root: /no/scene_graph not found"):
        sources.load(_mimic_cfg(tiny_world, tmp_path, "imagenome_root=/no/scene_graph"), need_samples=False)


def test_an_evaluation_never_writes_the_training_runs_lut(tiny_world, tmp_path):
    """evaluate.py replaced the run's lut.json when its data differed: the LUT the rows were tuned with was lost."""
    run, ev = tmp_path / "run", tmp_path / "ev"
    data = sources.load(_mimic_cfg(tiny_world, run), write_lut=False)     # train.py: written once the run starts
    assert not run.exists()
    data.save_lut()
    saved = json.loads((run / "lut.json").read_text())
    saved["lut"]["left lung"] = [[100.0, 200.0, 30.0, 60.0]]               # the run was tuned on another LUT
    (run / "lut.json").write_text(json.dumps(saved))
    before = (run / "lut.json").read_bytes()
    data = sources.load(_mimic_cfg(tiny_world, run), need_samples=False, lut_dir=str(ev))   # evaluate.py
    assert (run / "lut.json").read_bytes() == before and (ev / "lut.json").exists()
    assert f"differs from the training run's {run / 'lut.json'}" in data.report and "left lung" in data.report


# ---------------------------------------------------------------------------------------------------------------
# A broken LUT file


def test_a_truncated_lut_file_is_named_with_the_remedy(tiny_world, tmp_path):
    lut_path = tmp_path / "lut.json"
    sources.load(_mimic_cfg(tiny_world, tmp_path, f"lut_path={lut_path}"), need_samples=False)  # built and saved
    text = lut_path.read_text()
    lut_path.write_text(text[:len(text) // 2])  # a truncated copy
    with pytest.raises(ValueError, match=r"lut.json: not a JSON LUT .*delete it to rebuild the LUT from the gold"):
        sources.load(_mimic_cfg(tiny_world, tmp_path, f"lut_path={lut_path}"), need_samples=False)


def test_lut_entries_that_are_not_four_finite_numbers_are_named(tiny_world, tmp_path):
    lut = sources.load(_mimic_cfg(tiny_world, tmp_path), need_samples=False).lut
    lut_path = tmp_path / "lut.json"
    for bad in ([5], [[1, 2, "3", 4]], [[1, "x", 3, 4]], [[1, 2, float("nan"), 4]], [[1, 2, 3, True]], [None]):
        lut_path.write_text(json.dumps(dict(lut, left=bad)))
        with pytest.raises(ValueError, match=r"entry 'left' must be .*\(four finite numbers each\), got .*delete"):
            load_lut(lut_path)


# ---------------------------------------------------------------------------------------------------------------
# A broken phantom world.json: an incomplete world (delete the folder), never a bare KeyError


@pytest.mark.parametrize("text", ['{"notice": "SYNTHETIC", "config": {"se', '{"config": {"seed": 0}}',
                                  '{"notice": "SYNTHETIC", "config": {}}', '[]', ''])
def test_a_broken_world_json_is_an_incomplete_world(tmp_path, text):
    (tmp_path / "world.json").write_text(text)
    with pytest.raises(FileExistsError, match=r"a broken world.json\): delete it"):
        ph.ensure_phantom(str(tmp_path), seed=0)
    with pytest.raises(ValueError, match=f"{tmp_path}/world.json is not a whole phantom world.json.*delete {tmp_path}"):
        ph.world_notice(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Truncated images: found before a run by their missing end marker, and named with the remedy when read


def _noise_image(path, w=300, h=200):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w), dtype=np.uint8)).save(path)
    return path


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_a_truncated_image_is_found_before_the_run(tmp_path, ext):
    whole, cut = _noise_image(str(tmp_path / f"whole.{ext}")), _noise_image(str(tmp_path / f"cut.{ext}"))
    padded = _noise_image(str(tmp_path / f"padded.{ext}"))
    with open(padded, "ab") as f:
        f.write(b"\0" * 100)  # bytes after the end marker, as some writers leave: still whole
    _truncate(cut)
    records = [dict(dicom_id=os.path.basename(p), image_path=p) for p in (whole, cut, padded)]
    with pytest.raises(ValueError, match=rf"cut.{ext}: cannot read image .*end-of-image marker.*on_missing: skip"):
        ds.check_images(records)
    kept, rep = ds.check_images(records, on_missing="skip")
    assert [r["dicom_id"] for r in kept] == [f"whole.{ext}", f"padded.{ext}"]
    assert rep["unreadable image file (skipped)"] == 1


def test_reading_a_truncated_image_says_the_remedy(tmp_path):
    cut = _noise_image(str(tmp_path / "cut.jpg"))
    _truncate(cut)
    with pytest.raises(ValueError, match=r"cannot read image .*cut.jpg: image file is truncated.*; replace the file, "
                                         "or delete it and set the config key on_missing: skip"):
        load_image(cut)


def test_a_truncated_mscxr_image_honours_on_missing(tmp_path):
    rel = "files/p10/p10000000/s50000000/d0.jpg"
    _truncate(_noise_image(str(tmp_path / rel), 40, 30))
    _csv(str(tmp_path / "ms.csv"), MSCXR_COLS, [["d0", "Cardiomegaly", "enlarged heart", rel, 10, 10, 20, 15, 40, 30]])
    with pytest.raises(ValueError, match=r"pair d0_00 \(CSV row 2\): cannot read image .*end-of-image marker"):
        ds.read_mscxr(str(tmp_path / "ms.csv"), str(tmp_path))
    pairs, rep = ds.read_mscxr(str(tmp_path / "ms.csv"), str(tmp_path), on_missing="skip")
    assert pairs == [] and rep["unreadable image file (skipped)"] == 1
