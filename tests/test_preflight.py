"""The data preflight (`train.py / evaluate.py / classify.py --check`, grounding/experiment/preflight.py) on the
real-layout replica (grounding/phantom/real.py): every missing input named in one report, exit status 1, nothing
written; the counts it prints are the replica writer's own."""
import csv
import gzip
import os
import shutil

import pytest
import torch

import classify
import evaluate
import train
from ldm.weights.folder import save_pipeline
from grounding.data import readers as ds
from grounding.experiment import preflight
from grounding.phantom.real import build_real_world
from grounding.phantom.world import PhantomConfig
from test_datasets import _csv
from test_rehearsal import CONFIG, tiny_monai_pipeline


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The replica, the tiny MONAI-structured weights and the shipped config with its /data prefix changed."""
    root = str(tmp_path_factory.mktemp("preflight"))
    data = os.path.join(root, "data")
    summary = build_real_world(data, PhantomConfig.tiny(n_test=12, n_vindr=4))
    with open(os.path.join(data, "ms-cxr", "1.1.0", "MS_CXR_Local_Alignment_v1.1.0.csv"), newline="") as f:
        texts = [r["label_text"] for r in csv.DictReader(f)]
    save_pipeline(tiny_monai_pipeline(texts), os.path.join(root, "weights", "monai_cxr"))
    return root, summary


@pytest.fixture
def replica(built, tmp_path, monkeypatch):
    """A fresh copy to break, as the working directory (the config's weights and out_dir are relative)."""
    root = str(tmp_path / "replica")
    shutil.copytree(built[0], root)
    with open(CONFIG) as f, open(os.path.join(root, "mimic_monai.yaml"), "w") as g:
        g.write(f.read().replace("/data/", os.path.join(root, "data") + "/"))
    monkeypatch.chdir(root)
    return root, built[1]["expected"]


def _tree(root):
    return sorted((os.path.relpath(os.path.join(d, n), root), os.path.getmtime(os.path.join(d, n)))
                  for d, dirs, files in os.walk(root) for n in dirs + files)


def _check(main, args, capsys, device=("device=cpu", "autocast=none")):
    with pytest.raises(SystemExit) as e:
        main(["--check", *args, "threads=1", *device])
    return e.value.code, capsys.readouterr().out


def test_three_missing_inputs_are_named_at_once_and_nothing_is_written(replica, capsys):
    root, exp = replica
    d = os.path.join(root, "data")
    mimic = os.path.join(d, "mimic-cxr-jpg", "2.0.0")
    for name in ("metadata", "split"):  # as MIMIC-CXR-JPG releases them
        path = os.path.join(mimic, f"mimic-cxr-2.0.0-{name}.csv")
        with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
            g.write(f.read())
        os.remove(path)
    shutil.rmtree(os.path.join(root, "weights"))                                   # not converted yet
    os.remove(os.path.join(d, "chest-imagenome", "1.0.0", "gold_dataset",
                           "gold_bbox_coordinate_annotations_1000images.csv"))        # not downloaded
    shutil.rmtree(os.path.join(d, "vindr-cxr", "1.0.0", "test_png"))                # DICOMs not converted
    before = _tree(root)
    code, out = _check(train.main, ["--config", "mimic_monai.yaml"], capsys)
    print(out)
    assert code == 1
    assert "3 input(s) missing: weights, imagenome_root, vindr_images." in out
    missing = [line.split()[1] for line in out.splitlines() if line.startswith("  MISSING")]
    assert missing == ["weights", "imagenome_root", "vindr_images"]
    assert out.count("-> ") == 3 and "docs/weights.md" in out and "vindr_csv empty" in out
    # the rest was still read, from the gzipped tables, with the replica writer's counts
    assert f"mimic-cxr-2.0.0-metadata.csv.gz: {len(open_rows(mimic))} images" in out
    assert f"MS_CXR_Local_Alignment_v1.1.0.csv: {sum(exp['mscxr_pairs'].values())} pairs with their images" in out
    assert "SYNTHETIC" in out and "real data" not in out
    assert _tree(root) == before and not os.path.exists(os.path.join(root, "runs"))   # no out_dir, no LUT


def open_rows(mimic):
    with gzip.open(os.path.join(mimic, "mimic-cxr-2.0.0-metadata.csv.gz"), "rt", newline="") as f:
        return list(csv.DictReader(f))


def test_a_complete_replica_passes_and_says_which_csv_is_read(replica, capsys):
    root, exp = replica
    meta = os.path.join(root, "data", "mimic-cxr-jpg", "2.0.0", "mimic-cxr-2.0.0-metadata.csv")
    with open(meta, "rb") as f, gzip.open(meta + ".gz", "wb") as g:   # both present: the named .csv is read
        g.write(f.read())
    code, out = _check(train.main, ["--config", "mimic_monai.yaml"], capsys)
    assert code == 0 and "MISSING" not in out and "Every input is in place" in out, out
    assert "mimic-cxr-2.0.0-metadata.csv (read; mimic-cxr-2.0.0-metadata.csv.gz beside it is not)" in out
    assert f"{sum(exp['vindr_pairs'].values())} pairs with their images" in out
    assert "[4, 5, 6, 7] of 0-10" in out                  # the config's layers against the model's 11


def test_layers_left_to_the_family_preset_are_checked_too(replica, capsys):
    """layers: [] (roentgen.yaml's default) reads the family's tuning preset (the preset keys are "tuning" /
    "baseline" since HeatmapConfig.preset)."""
    code, out = _check(train.main, ["--config", "mimic_monai.yaml", "layers=[]"], capsys)
    assert code == 0 and "[4, 5, 6, 7] of 0-10 (the family preset)" in out, out


def test_the_scripts_ask_for_what_they_read(replica, capsys):
    root, _ = replica
    # VinDr not configured: optional for train.py, required by evaluate.py --split vindr
    code, out = _check(train.main, ["--config", "mimic_monai.yaml", "vindr_csv=''"], capsys)
    assert code == 0 and "  off      vindr_csv" in out
    code, out = _check(evaluate.main, ["--split", "vindr", "--config", "mimic_monai.yaml", "vindr_csv=''"], capsys)
    assert code == 1 and "1 input(s) missing: vindr_csv. Fix it" in out and "--out" in out
    # the shipped config's device on a machine without CUDA
    if not torch.cuda.is_available():
        code, out = _check(train.main, ["--config", "mimic_monai.yaml"], capsys, device=())
        assert code == 1 and "1 input(s) missing: device." in out and "device=cpu autocast=none" in out
    # the reports only for tuning; MS-CXR v0.1 with a split asked for: the sources' own check
    shutil.rmtree(os.path.join(root, "data", "mimic-cxr", "2.0.0", "files"))
    v01 = os.path.join(root, "data", "ms-cxr", "0.1", "MS_CXR_Local_Alignment_v1.0.0.csv")
    code, out = _check(train.main, ["--config", "mimic_monai.yaml", f"mscxr_csv={v01}", "mscxr_split=test"], capsys)
    assert code == 1 and "missing: reports_root, mscxr_split." in out and "v0.1" in out
    code, out = _check(evaluate.main, ["--split", "mscxr-loc", "--config", "mimic_monai.yaml"], capsys)
    assert code == 0 and "only train.py reads them" in out
    # classify.py: the chexpert labels, as released
    labels = os.path.join(root, "labels", "mimic-cxr-2.0.0-chexpert.csv")
    code, out = _check(classify.main, ["--config", "mimic_monai.yaml", f"chexpert_csv={labels}"], capsys)
    assert code == 1 and "missing: chexpert_csv." in out and "nor mimic-cxr-2.0.0-chexpert.csv.gz" in out
    _csv(labels, ["subject_id", "study_id", "No Finding"], [["10000001", "50000001", "1.0"], ["1", "2", ""]])
    code, out = _check(classify.main, ["--config", "mimic_monai.yaml", f"chexpert_csv={labels}"], capsys)
    assert code == 0 and "mimic-cxr-2.0.0-chexpert.csv: 1 studies labelled No Finding" in out


def test_preflight_names_the_columns_read_mimic_needs(tmp_path):
    """MIMIC_CSVS (what the preflight reads without walking files/) holds exactly columns read_mimic refuses to go
    without: dropping any one of them makes read_mimic name it."""
    for name, columns in preflight.MIMIC_CSVS.items():
        for col in columns:
            root = str(tmp_path / f"{name}-{col}")
            for other, cols in preflight.MIMIC_CSVS.items():
                keep = [c for c in cols if not (other == name and c == col)]
                _csv(os.path.join(root, other), keep, [["x"] * len(keep)])
            with pytest.raises(ValueError, match=rf"{name}: missing columns \['{col}'\]"):
                ds.read_mimic(root)
