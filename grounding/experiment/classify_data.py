"""The cases of the grounded classification (paper App. K): MS-CXR-loc pneumothorax pairs against an equal number
of MIMIC-CXR test images labelled "No Finding", each normal paired with one pneumothorax pair.

Real data: the labels come from mimic-cxr-2.0.0-chexpert.csv or -negbio.csv (subject_id, study_id, one column
per label; 1.0 positive, 0.0 negative, -1.0 uncertain, empty = not mentioned): a study is "No Finding" when its
"No Finding" value is 1.0; its frontal images (ViewPosition PA/AP) of the TEST split are the candidates.
Phantom world: the same files, written by grounding/phantom/world.py `build_normal_set` into a separate tree (the world's
own normal studies trained the phantom LDM), and read by the same code.

Pairing: the normals are shuffled (seeded) and the first n_pos paired with the pneumothorax pairs in order; a
normal image takes its pair's standardised prompt ("{location} pneumothorax") for the standardised heatmap
sources (a normal image has no location of its own), and its pair's mIoU bin (ClassifyConfig.normal_bins).
"""
import os

import numpy as np

from grounding.phantom import world as phantom
from grounding.data.readers import DataReport, _read_csv, read_mimic


def read_no_finding(csv_path, records, views=("PA", "AP")):
    """MIMIC records (read_mimic, any splits) whose study is labelled No Finding == 1.0 in a chexpert/negbio CSV,
    frontal views only. Returns (records, DataReport)."""
    report = DataReport(f"No Finding labels {csv_path}")
    rows = _read_csv(csv_path, ["subject_id", "study_id", "No Finding"])
    normal = set()
    for i, r in enumerate(rows):
        value = r["No Finding"].strip()
        try:
            positive = value != "" and float(value) == 1.0
        except ValueError:
            raise ValueError(f"{csv_path} row {i + 2}: 'No Finding' = {value!r} is not a number (1.0, 0.0, -1.0 or "
                             "empty)") from None
        if positive:
            normal.add(str(int(float(r["study_id"]))))
    report.add("studies labelled No Finding == 1.0", n=len(normal))
    out = []
    for rec in records:
        if str(int(float(rec["study_id"]))) not in normal:
            continue
        if views and rec["view"] not in views:
            report.add(f"No Finding image with view {rec['view'] or '(empty)'} (not frontal, skipped)")
            continue
        out.append(rec)
    report.kept = len(out)
    return out, report


def classification_cases(train_cfg, data, ccfg):
    """(positives, normals, report lines): pneumothorax pairs of data.mscxr_loc and their paired normal images.

    Normals are dicts with pair_id (= dicom_id), image_path, image_width/height, label 0 and the paired positive's
    `prompt` and `unit`; positives are the grounding pairs with label 1 and unit = their index."""
    lines = []
    pos = [p for p in data.mscxr_loc if p["category"] == ccfg.category]
    n_other = sum(p["category"] != ccfg.category for p in data.mscxr_loc)
    lines.append(f"{ccfg.category}: {len(pos)} MS-CXR-loc test pairs ({n_other} pairs of other classes not used)")
    n_pool = ccfg.n_normals or len(pos)   # the phantom builds this many normals, whatever the limit (stable pairing)
    if ccfg.limit:
        pos = pos[:ccfg.limit]
        lines.append(f"limit={ccfg.limit}: scoring the first {len(pos)} pairs")
    if len(pos) < 2:
        raise ValueError(f"classification needs at least 2 {ccfg.category} pairs, found {len(pos)}")
    n = ccfg.n_normals or len(pos)
    if train_cfg.data == "phantom":
        root = phantom.build_normal_set(train_cfg.phantom_root, max(n, n_pool))
        csv_path = os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv")
        lines.append(f"No Finding images: SYNTHETIC phantom test studies without findings at {root}")
    else:
        if not ccfg.chexpert_csv:
            raise ValueError("classification on real data needs the key chexpert_csv (mimic-cxr-2.0.0-chexpert.csv "
                             "or -negbio.csv of MIMIC-CXR-JPG)")
        root, csv_path = train_cfg.mimic_root, ccfg.chexpert_csv
    records, rep = read_mimic(root, splits=("test",))
    lines.append(str(rep))
    normals, rep = read_no_finding(csv_path, records, views=tuple(ccfg.normal_views))
    lines.append(str(rep))
    if len(normals) < n:
        raise ValueError(f"only {len(normals)} frontal No Finding test images in {csv_path}, {n} needed "
                         f"(set n_normals or limit)")
    order = np.random.default_rng(ccfg.draw_seed).permutation(len(normals))
    chosen = [normals[i] for i in order[:n]]
    lines.append(f"No Finding: {n} of {len(normals)} frontal test images chosen (seed {ccfg.draw_seed})")
    positives = [dict(p, label=1, unit=i) for i, p in enumerate(pos)]
    negatives = [dict(pair_id=r["dicom_id"], dicom_id=r["dicom_id"], image_path=r["image_path"], category="No Finding",
                      image_width=r["image_width"], image_height=r["image_height"], boxes=[], label=0, unit=i,
                      prompt=pos[i % len(pos)]["prompt"]) for i, r in enumerate(chosen)]
    return positives, negatives, lines
