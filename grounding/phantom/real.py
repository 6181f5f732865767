"""The rehearsal replica: the phantom world written in the exact layouts of the credentialed releases, traps included.

    grounding.phantom.real.build_real_world(root, PhantomConfig.tiny())

The default phantom world (grounding/phantom/world.py `build_world`) keeps one flat, simplified tree that the
quickstart reads. This writer draws the SAME cases (phantom.sample_case, phantom_render.render_case) but lays them
out as the real releases are unpacked, so that configs/mimic_monai.yaml runs on it with only its "/data" prefix
changed, and it plants the traps a new user meets on the real data:

  root/world.json                                           SYNTHETIC notice, layout "real", expected counts
  root/mimic-cxr-jpg/2.0.0/files/p1X/p<subject>/s<study>/<dicom_id>.jpg
  root/mimic-cxr-jpg/2.0.0/mimic-cxr-2.0.0-metadata.csv      PA, AP, LATERAL and empty ViewPosition rows
  root/mimic-cxr-jpg/2.0.0/mimic-cxr-2.0.0-split.csv         train / validate / test
  root/mimic-cxr/2.0.0/files/p1X/p<subject>/s<study>.txt      the reports
  root/ms-cxr/1.1.0/MS_CXR_Local_Alignment_v1.1.0.csv         with the split column (train / val / test)
  root/ms-cxr/0.1/MS_CXR_Local_Alignment_v1.0.0.csv           the same rows without it
  root/chest-imagenome/1.0.0/gold_dataset/gold_bbox_coordinate_annotations_1000images.csv
  root/vindr-cxr/1.0.0/annotations/annotations_test.csv + image_labels_test.csv, root/vindr-cxr/1.0.0/test_png/

Traps: studies whose only frontal image is AP, or with no frontal image at all, with the lateral holding the lowest
dicom_id; an MS-CXR patient who also has a training study; MS-CXR pairs on every train / val / test split; tall
portrait images (every third MS-CXR image) with boxes reaching into the band the centre crop cuts away (and, with
wholly_in_band, boxes and one pair lying wholly inside it); ImaGenome rows from two annotators on some images and
original coordinates outside the image; VinDr boxes from several radiologists, pneumonia drawn as ILD /
Infiltration boxes, an Infiltration box on an image with none of the 8 labels, "No finding" rows with empty boxes,
classes outside the 8.
world.json["expected"] holds what a correct reading must find, counted here from the generated cases.
"""
import collections
import dataclasses
import hashlib
import json
import os
import time

import numpy as np
from PIL import Image

from grounding.phantom import world as ph
from grounding.phantom.render import render_case

# train-study index % 8 -> the ViewPosition of each image of the study; the rendered frontal image takes the first
# frontal view, the others are copies (AP) or a mirrored copy (LATERAL). "" = an empty ViewPosition, as in MIMIC.
TRAIN_VIEWS = {0: ["PA", "LATERAL"], 1: ["PA", "AP", "LATERAL"], 2: ["AP", "LATERAL"], 3: ["LATERAL"],
               4: ["PA", "LATERAL"], 5: ["PA"], 6: ["AP", "LATERAL"], 7: [""]}
MSCXR_SPLIT = {0: "val", 1: "train"}      # test-case index % 7 -> MS-CXR v1.1.0 split (else "test")
RADIOLOGISTS = ("R8", "R9", "R10")
VINDR_LABELS = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
                "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
                "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "COPD", "Lung tumor", "Pneumonia",
                "Tuberculosis", "Other disease", "No finding"]


def _id(*parts):
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()


def _save(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(np.round(img * 255).astype(np.uint8))
    im.save(path, quality=95) if path.endswith(".jpg") else im.save(path)


def _band(W, H):
    """Rows the centre crop of a tall image cuts away at the top: [0, band)."""
    return (H - W) // 2 if H > W else 0


def build_real_world(root, cfg=None, wholly_in_band=True):
    """Write the replica under root; returns the summary written to root/world.json."""
    cfg = cfg or ph.PhantomConfig()
    t0 = time.time()
    replica = _Replica(root, cfg, wholly_in_band)
    replica.training_studies()   # MIMIC-CXR-JPG train / validate studies (+ ImaGenome gold rows on the first n_gold)
    replica.mscxr_cases()        # MS-CXR test cases, their images in the MIMIC tree
    replica.vindr_cases()        # VinDr-CXR test images, boxes and image labels
    replica.write_csvs()
    summary = replica.summary(build_seconds=round(time.time() - t0, 2))
    with open(os.path.join(root, "world.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


class _Replica:
    """The rows of every CSV and the expected counts, gathered case by case; images and reports are written as
    they are drawn, the CSVs at the end. The sections run in a fixed order: they share one random stream."""

    def __init__(self, root, cfg, wholly_in_band):
        self.root, self.cfg, self.wholly_in_band = root, cfg, wholly_in_band
        self.mimic = os.path.join(root, "mimic-cxr-jpg", "2.0.0")
        self.reports = os.path.join(root, "mimic-cxr", "2.0.0")
        self.vindr_dir = os.path.join(root, "vindr-cxr", "1.0.0")
        self.meta, self.split, self.mscxr, self.gold, self.vindr, self.labels = [], [], [], [], [], []
        C = collections.Counter
        self.expected = dict(train_studies=0, train_studies_without=C(), lateral_images=0, excluded_train_studies=0,
                             mscxr_pairs=C(), mscxr_loc=collections.defaultdict(C),
                             band_reaching_boxes=0, band_only_boxes=0, band_only_pairs=C(), band_only_split=C(),
                             gold_images=0, gold_images_two_annotators=0, gold_boxes_outside=0,
                             vindr_pairs=C(), vindr_dropped_infiltration=0)
        # the replica's own draws (the default world's stay untouched)
        self.rng = np.random.default_rng([cfg.seed, 4242])

    def mimic_image(self, case, dicom_id, view, img):
        """Save one image in the MIMIC-CXR-JPG tree with its metadata and split rows; returns its relative path."""
        s, st = case["subject_id"], case["study_id"]
        rel = os.path.join("files", f"p{s[:2]}", f"p{s}", f"s{st}", f"{dicom_id}.jpg")
        _save(img, os.path.join(self.mimic, rel))
        H, W = img.shape
        self.meta.append([dicom_id, s, st, "CHEST (PA AND LAT)", view, H, W, "21800101", "120000.000",
                          "CHEST (PA AND LAT)", {"PA": "postero-anterior", "AP": "antero-posterior",
                                                 "LATERAL": "lateral"}.get(view, ""), "Erect"])
        self.split.append([dicom_id, st, s, case["kind"]])
        return rel

    def report(self, case):
        s = case["subject_id"]
        path = os.path.join(self.reports, "files", f"p{s[:2]}", f"p{s}", f"s{case['study_id']}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(case["report"])

    def training_studies(self):
        cfg, expected = self.cfg, self.expected
        for kind, n in (("train", cfg.n_train), ("validate", cfg.n_validate)):
            for i in range(n):
                case = ph.sample_case(cfg, kind, i)
                img, info = render_case(case)
                self.report(case)
                views = TRAIN_VIEWS[i % 8] if kind == "train" else ["PA"]
                for k, view in enumerate(views):
                    # the primary (rendered) image keeps the case's dicom id; a lateral gets the study's LOWEST id
                    dicom_id = case["dicom_id"] if k == 0 else \
                        ("0" if view == "LATERAL" else "f") + _id(case["dicom_id"], k)[1:40]
                    self.mimic_image(case, dicom_id, view, img if view != "LATERAL" else img[:, ::-1].copy())
                    expected["lateral_images"] += view == "LATERAL"
                if kind == "train":
                    expected["train_studies"] += 1
                    for allowed in (("PA",), ("PA", "AP")):
                        if not set(views) & set(allowed):
                            expected["train_studies_without"]["/".join(allowed)] += 1
                if kind == "train" and expected["gold_images"] < cfg.n_gold:
                    self.gold += _gold_rows(case, info["anatomy"], img.shape, self.rng, expected)
                    expected["gold_images"] += 1

    def mscxr_cases(self):
        """Every third image tall; boxes reaching into (or lying wholly inside) the band the centre crop cuts."""
        cfg, expected = self.cfg, self.expected
        tall = dataclasses.replace(cfg, nonsquare_frac=1.0)
        for i in range(cfg.n_test):
            case = ph.sample_case(tall if i % 3 == 0 else cfg, "test", i)
            if i == 1 and cfg.n_train:  # an MS-CXR patient who also has a training study: tuning must exclude it
                case = dict(case, subject_id=ph.sample_case(cfg, "train", 0)["subject_id"])
                expected["excluded_train_studies"] = 1
            img, info = render_case(case)
            self.report(case)
            rel = self.mimic_image(case, case["dicom_id"], "PA" if i % 2 else "AP", img)
            H, W = img.shape
            sp = MSCXR_SPLIT.get(i % 7, "test")
            band = _band(W, H)
            for f, boxes in zip(case["findings"], info["boxes"]):
                boxes = [list(b) for b in boxes]
                if band and i % 6 == 0:  # the first box reaches up into the cut band (part of it stays in the crop)
                    x, y, w, h = boxes[0]
                    boxes[0] = [x, band // 2, w, h + y - band // 2]
                    expected["band_reaching_boxes"] += 1
                only_band = False
                if band >= 4 and self.wholly_in_band and i % 12 == 3:   # a further box wholly inside the cut band
                    boxes.append([W // 4, 1, W // 4, band - 2])
                    expected["band_only_boxes"] += 1
                if band >= 4 and self.wholly_in_band and i % 12 == 9:   # a pair whose ONLY box lies in the cut band
                    boxes = [[W // 4, 1, W // 4, band - 2]]
                    expected["band_only_boxes"] += 1
                    only_band = True
                self.mscxr += [[case["dicom_id"], f["pathology"], f["phrase"], rel, x, y, w, h, W, H, sp]
                               for x, y, w, h in boxes]
                expected["mscxr_pairs"][f["pathology"]] += 1
                if f["located"]:  # the case sampler decided it: unlocated phrases are what MS-CXR-loc drops
                    expected["mscxr_loc"][sp][f["pathology"]] += 1
                    if only_band:
                        expected["band_only_pairs"][f["pathology"]] += 1
                        expected["band_only_split"][sp] += 1

    def vindr_cases(self):
        """Several radiologists per finding, pneumonia drawn as ILD / Infiltration, image-level labels."""
        cfg, expected, vdir = self.cfg, self.expected, self.vindr_dir
        for i in range(cfg.n_vindr):
            case = ph.sample_case(cfg, "vindr", i)
            img, info = render_case(case)
            image_id = case["dicom_id"]
            _save(img, os.path.join(vdir, "test_png", f"{image_id}.png"))
            positive = set()
            for f, boxes in zip(case["findings"], info["boxes"]):
                cls = {"Pleural Effusion": "Pleural effusion",
                       "Pneumonia": "Infiltration" if i % 2 else "ILD"}.get(f["pathology"], f["pathology"])
                positive |= {cls, "Pneumonia"} if f["pathology"] == "Pneumonia" else {cls}
                readers = RADIOLOGISTS[:1 + i % 3]  # 1, 2 or 3 radiologists drew the same finding
                for k, rad in enumerate(readers):
                    for x, y, w, h in boxes:
                        d = 0.0 if k == 0 else float(min(self.rng.integers(1, 4), w // 4, h // 4))  # another reader
                        self.vindr.append([image_id, rad, cls, x + d, y + d, x + w - d, y + h])
                expected["vindr_pairs"][f["pathology"]] += 1
            if not case["findings"]:
                self.vindr += [[image_id, rad, "No finding", "", "", "", ""] for rad in RADIOLOGISTS]
                positive.add("No finding")
            if i % 3 == 1:  # a class outside the 8
                self.vindr.append([image_id, "R9", "Aortic enlargement", 40.0, 30.0, 60.0, 50.0])
                positive.add("Aortic enlargement")
            self.labels.append([image_id] + [int(c in positive) for c in VINDR_LABELS])

        if cfg.n_vindr:  # one more image, without findings, labelled with none of the 8 but holding an Infiltration
            case = ph.sample_case(cfg, "vindr", 0)  # box: the authors' loader drops that box (no Pneumonia pair)
            image_id = _id(case["dicom_id"], "infiltration-trap")[:32]
            _save(render_case(case, with_findings=False)[0], os.path.join(vdir, "test_png", f"{image_id}.png"))
            self.vindr.append([image_id, "R8", "Infiltration", 10.0, 10.0, 30.0, 30.0])
            self.labels.append([image_id] + [int(c in ("Infiltration", "Other disease")) for c in VINDR_LABELS])
            expected["vindr_dropped_infiltration"] += 1

    def write_csvs(self):
        root, mimic, vdir = self.root, self.mimic, self.vindr_dir
        ph._write_csv(os.path.join(mimic, "mimic-cxr-2.0.0-metadata.csv"),
                      ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                       "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                       "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"], self.meta)
        ph._write_csv(os.path.join(mimic, "mimic-cxr-2.0.0-split.csv"), ["dicom_id", "study_id", "subject_id", "split"],
                      self.split)
        head = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height"]
        ph._write_csv(os.path.join(root, "ms-cxr", "1.1.0", "MS_CXR_Local_Alignment_v1.1.0.csv"), head + ["split"],
                      self.mscxr)
        ph._write_csv(os.path.join(root, "ms-cxr", "0.1", "MS_CXR_Local_Alignment_v1.0.0.csv"), head,
                      [r[:-1] for r in self.mscxr])
        ph._write_csv(os.path.join(root, "chest-imagenome", "1.0.0", "gold_dataset",
                                   "gold_bbox_coordinate_annotations_1000images.csv"),
                      ["image_id", "x1", "y1", "x2", "y2", "width", "height", "bbox_name", "annot_id", "original_x1",
                       "original_x2", "original_y1", "original_y2", "original_width", "original_height", "annotator",
                       "coord224", "coord_original"], self.gold)
        ph._write_csv(os.path.join(vdir, "annotations", "annotations_test.csv"),
                      ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"], self.vindr)
        ph._write_csv(os.path.join(vdir, "annotations", "image_labels_test.csv"), ["image_id"] + VINDR_LABELS,
                      self.labels)

    def summary(self, build_seconds):
        """world.json: the synthetic notice, the paths in the real layout, the row counts and the expected counts."""
        return dict(synthetic=True, notice=ph.SYNTHETIC_NOTICE + ", written in the layout of the real releases",
                    layout="real", config=dataclasses.asdict(self.cfg), wholly_in_band=self.wholly_in_band,
                    paths=dict(mimic="mimic-cxr-jpg/2.0.0", reports="mimic-cxr/2.0.0",
                               mscxr="ms-cxr/1.1.0/MS_CXR_Local_Alignment_v1.1.0.csv",
                               mscxr_v01="ms-cxr/0.1/MS_CXR_Local_Alignment_v1.0.0.csv",
                               imagenome="chest-imagenome/1.0.0/gold_dataset/"
                                         "gold_bbox_coordinate_annotations_1000images.csv",
                               vindr_csv="vindr-cxr/1.0.0/annotations/annotations_test.csv",
                               vindr_images="vindr-cxr/1.0.0/test_png"),
                    counts=dict(mimic_images=len(self.meta), mscxr_rows=len(self.mscxr), gold_rows=len(self.gold),
                                vindr_rows=len(self.vindr)),
                    expected=json.loads(json.dumps(self.expected)),  # Counters -> plain dicts
                    build_seconds=build_seconds)


def _gold_rows(case, anatomy, shape, rng, expected):
    """Gold CSV rows of one image: one per region and annotator; about a third of the images get a second
    annotator (boxes moved by a few pixels) and about 10% of the boxes poke outside the image."""
    H, W = shape
    f224 = 224 / max(W, H)
    annotators = ["A1", "A2"] if expected["gold_images"] % 3 == 0 else ["A1"]
    expected["gold_images_two_annotators"] += len(annotators) > 1
    rows = []
    for a, annotator in enumerate(annotators):
        for name, (x1, y1, x2, y2) in anatomy.items():
            if a:
                d = int(rng.integers(-2, 3))
                x1, y1, x2, y2 = x1 + d, y1 + d, x2 + d, y2 + d
            if rng.random() < 0.1:
                x1, y2 = x1 - int(rng.integers(1, 6)), y2 + H  # outside the image: readers must clip
                expected["gold_boxes_outside"] += 1
            c224 = [round(v * f224) for v in (x1, y1, x2, y2)]
            rows.append([f"{case['dicom_id']}.dcm", *c224, c224[2] - c224[0], c224[3] - c224[1], name,
                         _id(case["dicom_id"], annotator, name)[:12], x1, x2, y1, y2, x2 - x1, y2 - y1, annotator,
                         str(c224), str([x1, y1, x2, y2])])
    return rows


def world_notice_for(path, levels=4):
    """The SYNTHETIC notice when `path` lies inside a phantom world (world.json in it or up to `levels` folders
    above), else None: a replica read through data: mimic is still named as synthetic."""
    folder = os.path.abspath(path)
    for _ in range(levels + 1):
        marker = os.path.join(folder, "world.json")
        if os.path.exists(marker):
            with open(marker) as fh:
                w = json.load(fh)
            if w.get("synthetic"):
                return f"[data] {w['notice']} at {folder}"
        folder = os.path.dirname(folder)
    return None
