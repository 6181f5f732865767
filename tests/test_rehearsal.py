"""The rehearsal: configs/mimic_monai.yaml on a phantom world written in the exact layout of the real releases.

The replica (grounding/phantom/real.py) holds the traps of the credentialed data: AP-only and lateral-only studies,
MS-CXR v1.1.0 with train / val / test pairs (and v0.1 without a split column), tall images with boxes in the band
the centre crop cuts, the ImaGenome gold CSV with two annotators and coordinates outside the image, VinDr boxes from
several radiologists with pneumonia drawn as ILD / Infiltration. The weights are a tiny random model of the MONAI
CXR family's structure (attention at the last two UNet levels: 11 cross-attention layers, so the config's layers
[4, 5, 6, 7] are valid), saved as a converted folder. train.py and evaluate.py run as subprocesses, as a user runs
them; the test checks what they print and write against the counts the replica writer recorded for its cases.
"""
import csv
import dataclasses
import json
import os
import re
import sys

import pytest
import torch

from ldm.pipeline import Pipeline
from ldm.weights.folder import save_pipeline
from ldm.schedulers import DDIMScheduler, SchedulerConfig
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.tokenizer import train_bpe
from ldm.unet import UNet2DConditionModel, UNetConfig
from ldm.vae import AutoencoderKL, VAEConfig
from grounding.experiment import sources
from grounding.anatomy import LOCATIONS, PATHOLOGIES
from grounding.experiment.config import load_config, TrainConfig
from grounding.phantom.world import PhantomConfig
from grounding.phantom.real import build_real_world
from grounding.geometry import box_to_model
from tiny_world import REPO
from tiny_world import run as run_cmd

CONFIG = os.path.join(REPO, "configs", "mimic_monai.yaml")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tiny_monai_pipeline(texts):
    """A random model with the MONAI CXR LDM's structure at a tiny width: 3 UNet levels with attention at the last
    two (one head each), a MONAI-layout VAE (1 grey channel in [0, 1], 3 latent channels), pad id 0, v-prediction."""
    tokenizer = train_bpe(texts + list(LOCATIONS) + [p.lower() for p in PATHOLOGIES] + ["and"], vocab_size=700, pad_id=0)
    unet = UNet2DConditionModel(dataclasses.replace(UNetConfig.monai_cxr(), block_out_channels=(16, 32, 32),
                                                    norm_num_groups=8, cross_attention_dim=32, sample_size=16))
    with torch.no_grad():  # sharpen q/k so a random model's maps are not flat
        for layer in unet.cross_attention_layers():
            layer.to_q.weight.mul_(3.0)
            layer.to_k.weight.mul_(3.0)
    text = dataclasses.replace(TextEncoderConfig.tiny(), vocab_size=tokenizer.vocab_size, hidden_size=32,
                               intermediate_size=64)
    vae = dataclasses.replace(VAEConfig.tiny(), block_out_channels=[8, 16], norm_num_groups=4)
    return Pipeline(tokenizer=tokenizer, text_encoder=TextEncoder(text), vae=AutoencoderKL(vae), unet=unet,
                    scheduler=DDIMScheduler(SchedulerConfig.monai_cxr()), scale_factor=0.3,
                    prediction_type="v_prediction", family="monai_cxr",
                    image={"channels": 1, "size": 32, "range": [0.0, 1.0]})


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rehearsal"))
    data = os.path.join(root, "data")
    # boxes (and one pair) lying wholly in the band the centre crop cuts away: dropped and counted at load time
    summary = build_real_world(data, PhantomConfig.tiny(n_test=24, n_vindr=8))
    return dict(root=root, data=data, summary=summary)


# ---------------------------------------------------------------------------------------------------------------
# the replica's layout


def test_replica_has_the_real_layout_and_its_traps(replica):
    data, exp = replica["data"], replica["summary"]["expected"]
    mimic = os.path.join(data, "mimic-cxr-jpg", "2.0.0")
    meta = _rows(os.path.join(mimic, "mimic-cxr-2.0.0-metadata.csv"))
    split = _rows(os.path.join(mimic, "mimic-cxr-2.0.0-split.csv"))
    assert {m["ViewPosition"] for m in meta} >= {"PA", "AP", "LATERAL", ""}
    assert {s["split"] for s in split} == {"train", "validate", "test"} and len(split) == len(meta)
    study_views = {}
    for m in meta:  # every image on disk where MIMIC-CXR-JPG puts it; reports where MIMIC-CXR puts them
        s, st = m["subject_id"], m["study_id"]
        assert os.path.exists(os.path.join(mimic, "files", f"p{s[:2]}", f"p{s}", f"s{st}", m["dicom_id"] + ".jpg"))
        assert os.path.exists(os.path.join(data, "mimic-cxr", "2.0.0", "files", f"p{s[:2]}", f"p{s}", f"s{st}.txt"))
        study_views.setdefault(st, set()).add(m["ViewPosition"])
    assert {"PA", "AP", "LATERAL"} in study_views.values()         # PA, AP and LATERAL views of one study
    assert any(v == {"AP", "LATERAL"} for v in study_views.values())  # a study without PA
    v11 = _rows(os.path.join(data, "ms-cxr", "1.1.0", "MS_CXR_Local_Alignment_v1.1.0.csv"))
    v01 = _rows(os.path.join(data, "ms-cxr", "0.1", "MS_CXR_Local_Alignment_v1.0.0.csv"))
    assert {r["split"] for r in v11} == {"train", "val", "test"} and "split" not in v01[0] and len(v01) == len(v11)
    # tall portrait images, boxes reaching into the band the centre crop cuts (and wholly inside it)
    tall = [r for r in v11 if int(r["image_height"]) > int(r["image_width"])]
    assert tall
    tops = [box_to_model(tuple(float(r[k]) for k in "xywh"), int(r["image_width"]), int(r["image_height"]), 512,
                         clip=False)[1] for r in tall]
    assert sum(t < 0 for t in tops) == exp["band_reaching_boxes"] + exp["band_only_boxes"] >= 2
    gold = _rows(os.path.join(data, "chest-imagenome", "1.0.0", "gold_dataset",
                              "gold_bbox_coordinate_annotations_1000images.csv"))
    assert all(r["image_id"].endswith(".dcm") for r in gold)
    assert {"x1", "y1", "x2", "y2", "width", "height", "annot_id", "original_width", "original_height", "coord224",
            "coord_original"} <= set(gold[0])
    per_image = {}
    for r in gold:
        per_image.setdefault(r["image_id"], set()).add(r["annotator"])
    assert sum(len(a) > 1 for a in per_image.values()) == exp["gold_images_two_annotators"] >= 1
    sizes = {m["dicom_id"] + ".dcm": (int(m["Columns"]), int(m["Rows"])) for m in meta}
    outside = [r for r in gold if float(r["original_x1"]) < 0 or float(r["original_y2"]) > sizes[r["image_id"]][1]]
    assert len(outside) == exp["gold_boxes_outside"] >= 1
    vindr = os.path.join(data, "vindr-cxr", "1.0.0")
    ann = _rows(os.path.join(vindr, "annotations", "annotations_test.csv"))
    labels = _rows(os.path.join(vindr, "annotations", "image_labels_test.csv"))
    assert {"ILD", "Infiltration"} & {r["class_name"] for r in ann} and "Pneumonia" in labels[0]
    assert len({r["rad_id"] for r in ann}) >= 2
    for r in ann:
        assert os.path.exists(os.path.join(vindr, "test_png", r["image_id"] + ".png"))
    assert "SYNTHETIC" in json.load(open(os.path.join(data, "world.json")))["notice"]


def _config(replica, *overrides):
    text = open(CONFIG).read().replace("/data/", replica["data"] + "/")
    path = os.path.join(replica["root"], "mimic_monai.yaml")
    with open(path, "w") as f:
        f.write(text)
    out = os.path.join(replica["root"], "load")
    return load_config(TrainConfig, path, [f"out_dir={out}", f"lut_path={out}/lut.json", *overrides])


def test_the_config_reads_the_replica(replica):
    """The shipped config's readers on the replica, without a model: MS-CXR v1.1.0 and v0.1, views, gold CSV."""
    exp = replica["summary"]["expected"]
    data = sources.load(_config(replica))
    # every located pair, less those whose only box lies wholly in the band the centre crop cuts away (dropped)
    want = sum(n for split in exp["mscxr_loc"].values() for n in split.values()) - sum(exp["band_only_pairs"].values())
    assert "pair with no box left in the crop (dropped)" in data.report
    assert len(data.mscxr_loc) == want and {p["split"] for p in data.mscxr_loc} == {"train", "val", "test"}
    assert data.samples and "SYNTHETIC" in data.description
    v01 = os.path.join(replica["data"], "ms-cxr", "0.1", "MS_CXR_Local_Alignment_v1.0.0.csv")
    old = sources.load(_config(replica, f"mscxr_csv={v01}"))
    assert [p["pair_id"] for p in old.mscxr_loc] == [p["pair_id"] for p in data.mscxr_loc] and old.val_pairs == []
    with pytest.raises(ValueError, match="mscxr_split"):
        sources.load(_config(replica, f"mscxr_csv={v01}", "mscxr_split=test"))
    test = sources.load(_config(replica, "mscxr_split=test"))
    assert len(test.mscxr_loc) == sum(exp["mscxr_loc"]["test"].values()) - exp["band_only_split"].get("test", 0)
    with_ap = sources.load(_config(replica, "views=[PA, AP]"))
    assert f"study without a PA/AP image (skipped): {exp['train_studies_without']['PA/AP']}" in with_ap.report
    assert len(with_ap.samples) > len(data.samples)


# ---------------------------------------------------------------------------------------------------------------
# the rehearsal


def _pairs_per_class(line):
    """'Atelectasis 2, Cardiomegaly 3 = 5' -> {"Atelectasis": 2, "Cardiomegaly": 3}."""
    body = line.split(" = ")[0]
    return {m.group(1): int(m.group(2).replace(",", "")) for m in re.finditer(r"([A-Z][A-Za-z ]+?) ([\d,]+)", body)}


@pytest.mark.slow
def test_mimic_monai_config_runs_on_the_replica(replica):
    root, data, exp = replica["root"], replica["data"], replica["summary"]["expected"]
    # the shipped config, unchanged but for its "/data" prefix (and a few-step budget, cpu, a small eval below)
    text = open(CONFIG).read()
    assert text.count("/data/") >= 6
    with open(os.path.join(root, "mimic_monai.yaml"), "w") as f:
        f.write(text.replace("/data/", data + "/"))
    texts = [r["label_text"] for r in _rows(os.path.join(data, "ms-cxr", "1.1.0", "MS_CXR_Local_Alignment_v1.1.0.csv"))]
    pipe = tiny_monai_pipeline(texts)
    assert len(pipe.unet.cross_attention_layers()) == 11
    save_pipeline(pipe, os.path.join(root, "weights", "monai_cxr"))  # the config's weights path, relative to cwd
    budget = ["device=cpu", "autocast=none", "threads=1", "max_steps=2", "num_inference_steps=10",
              "timesteps_per_step=2", "val_every=2", "val_pairs=2", "ckpt_every=1", "eval_pairs=4", "eval_batch=4",
              "eval_untuned=false"]

    log = run_cmd([sys.executable, os.path.join(REPO, "train.py"), "--config", "mimic_monai.yaml", *budget], cwd=root)
    out = os.path.join(root, "runs", "mimic_monai")
    assert "SYNTHETIC" in log and "(real)" not in log                 # a replica is never passed off as real data
    # the LUT comes from the gold CSV: every region averaged once per gold image (two annotators -> one box)
    assert f"of the gold CSV {data}/chest-imagenome/1.0.0/gold_dataset/" in log
    per_region = re.search(r"boxes averaged per region: (.*)", log).group(1)
    assert per_region.count(f" {exp['gold_images']}") == 13, per_region
    assert f"image with several annotators (boxes averaged per region): {exp['gold_images_two_annotators']}" in log
    assert f"anatomy box clipped to the image: {exp['gold_boxes_outside']}" in log
    assert os.path.exists(os.path.join(out, "lut.json"))
    # MS-CXR patients never tune; the view filter: only PA images in the tuning set, studies without one counted
    assert f"study of an excluded (MS-CXR) patient: {exp['excluded_train_studies']}" in log
    assert f"study without a PA image (skipped): {exp['train_studies_without']['PA']}" in log
    meta = {m["dicom_id"]: m["ViewPosition"] for m in _rows(os.path.join(data, "mimic-cxr-jpg", "2.0.0",
                                                                          "mimic-cxr-2.0.0-metadata.csv"))}
    samples = [json.loads(l) for l in open(os.path.join(out, "tuning_set.jsonl"))]
    assert samples and {meta[s["dicom_id"]] for s in samples} == {"PA"}
    # every MS-CXR pair is scored (mscxr_split: all, so train, val and test pairs), counted per class
    want = {}
    for split_counts in exp["mscxr_loc"].values():
        for c, n in split_counts.items():
            want[c] = want.get(c, 0) + n
    assert len(exp["mscxr_loc"]) == 3
    got = _pairs_per_class(re.search(r"MS-CXR-loc pairs scored: (.*)", log).group(1))
    # the pairs whose only box lies wholly in the cropped band leave (dropped and counted, as the authors' loader)
    want = {c: n - exp["band_only_pairs"].get(c, 0) for c, n in want.items()}
    want = {c: n for c, n in want.items() if n}
    assert got == want, (got, want)
    assert exp["band_only_boxes"] > 0 and "box wholly in the cropped-away band" in log
    head = re.search(r"MS-CXR-loc \(mscxr_split: all\), pairs per class: (.*)", log).group(1)
    assert sum(_pairs_per_class(head).values()) == 4 and f"the first 4 of {sum(want.values())}" in head
    assert "validation CNR" in log and "which the final table ALSO scores" in log   # validation says what it is
    table = open(os.path.join(out, "eval_frozen_vs_tuned.md")).read()
    assert "pairs per class" in table and "cnr tuned" in table and "Average" in table

    # evaluate.py on MS-CXR-loc and VinDr with the same config (the README's Table 1 commands)
    prompts = os.path.join(out, "learned_rows.safetensors")
    small = ["--bootstrap", "100", "--limit", "4", "--batch", "4", "--overlays", "1", "device=cpu", "autocast=none"]
    log = run_cmd([sys.executable, os.path.join(REPO, "evaluate.py"), "--split", "mscxr-loc", "--config",
                   "mimic_monai.yaml", "--baseline", "--prompts", prompts, "--out", "ev_loc", *small], cwd=root)
    assert _pairs_per_class(re.search(r"MS-CXR-loc pairs scored: (.*)", log).group(1)) == got
    assert f"(--limit: the first 4 of {sum(want.values())})" in log
    assert "cnr tuned" in open(os.path.join(root, "ev_loc", "comparison.md")).read()
    log = run_cmd([sys.executable, os.path.join(REPO, "evaluate.py"), "--split", "vindr", "--config",
                   "mimic_monai.yaml", "--prompts", prompts, "--out", "ev_vindr", *small], cwd=root)
    # VinDr: ILD / Infiltration boxes -> Pneumonia, every radiologist's boxes of a class on an image -> one pair
    assert _pairs_per_class(re.search(r"VinDr-CXR pairs: (.*)", log).group(1)) == exp["vindr_pairs"]
    assert "Pneumonia" in exp["vindr_pairs"] and ("ILD box -> Pneumonia" in log or "Infiltration box -> Pneumonia" in log)
    assert (f"Infiltration box on an image with none of the 8 labels (dropped, as the authors): "
            f"{exp['vindr_dropped_infiltration']}") in log
    assert "Average" in open(os.path.join(root, "ev_vindr", "table_tuned.md")).read()
