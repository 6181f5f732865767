"""Readers on small files in the real formats, incl. the awkward cases; curation, MS-CXR-loc, VinDr prompts."""
import csv
import gzip
import json
import os

import pytest
import torch
from PIL import Image

from grounding import anatomy as an
from grounding.data import curation as cu
from grounding.data import readers as ds
from grounding.data.imagenome import read_imagenome
from grounding.data.vindr import read_vindr
from grounding.data.curation import drop_cropped_boxes
from grounding.metrics import box_mask
from grounding.geometry import crop_window, to_original

MSCXR_COLS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height"]


def _csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _img(path, w=40, h=30):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("L", (w, h), 128).save(path)


REPORTS = {  # subject, study -> report text
    ("10000001", "50000001"): "FINDINGS:\n Left lower lobe atelectasis. No pneumothorax.\n IMPRESSION:\n Bibasilar atelectasis.\n",
    ("10000002", "50000002"): "FINDINGS:\n Right pleural effusion. Patchy right lower lobe pneumonia.\n",
    ("10000003", "50000003"): "IMPRESSION:\n No acute cardiopulmonary process.\n",
    ("10000004", "50000004"): "IMPRESSION:\n Small left apical pneumothorax.\n",  # an MS-CXR patient
    ("10000005", "50000005"): "FINDINGS:\n Mild edema.\n",  # pathology without a location word
}


@pytest.fixture
def mimic(tmp_path):
    root = str(tmp_path / "mimic")
    meta, split = [], []
    for i, (subject, study) in enumerate(REPORTS):
        d = f"dcm{i}"
        meta.append([d, subject, study, "PA", 30, 40])
        split.append([d, study, subject, "train"])
        if i != 2:  # the third image is missing on disk
            _img(ds.mimic_image_path(root, subject, study, d))
        os.makedirs(os.path.dirname(ds.mimic_report_path(root, subject, study)), exist_ok=True)
        with open(ds.mimic_report_path(root, subject, study), "w") as f:
            f.write(REPORTS[(subject, study)])
    meta.append(["lat0", "10000001", "50000001", "LATERAL", 30, 40])
    split.append(["lat0", "50000001", "10000001", "train"])
    _csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"),
         ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"], meta)
    _csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv"), ["dicom_id", "study_id", "subject_id", "split"], split)
    return root


def test_read_mimic_missing_image_error_or_counted_skip(mimic):
    with pytest.raises(FileNotFoundError, match="dcm2.jpg"):
        ds.read_mimic(mimic, views=("PA", "AP"))
    recs, rep = ds.read_mimic(mimic, views=("PA", "AP"), on_missing="skip")
    print(rep)
    assert [r["dicom_id"] for r in recs] == ["dcm0", "dcm1", "dcm3", "dcm4"]
    assert rep["missing image file"] == 1 and rep["view LATERAL not requested"] == 1
    assert recs[0]["image_width"] == 40 and recs[0]["image_height"] == 30
    assert recs[0]["image_path"].endswith(os.path.join("files", "p10", "p10000001", "s50000001", "dcm0.jpg"))


def _gzip(path, remove=True):
    """path -> path.gz (as MIMIC-CXR-JPG releases its CSVs); the unzipped file removed unless remove=False."""
    with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
        g.write(f.read())
    if remove:
        os.remove(path)
    return path + ".gz"


def test_mimic_csvs_are_read_as_released_gzipped(mimic, tmp_path):
    want, _ = ds.read_mimic(mimic, views=("PA", "AP"), on_missing="skip")
    meta, split = (os.path.join(mimic, f"mimic-cxr-2.0.0-{n}.csv") for n in ("metadata", "split"))
    _gzip(meta)
    _gzip(split)
    got, rep = ds.read_mimic(mimic, views=("PA", "AP"), on_missing="skip")
    assert got == want and len(got) == 4 and rep["missing image file"] == 1
    # the chexpert / negbio labels, named with or without .gz, either file on disk
    from grounding.experiment.classify_data import read_no_finding
    labels = str(tmp_path / "mimic-cxr-2.0.0-chexpert.csv")
    _csv(labels, ["subject_id", "study_id", "No Finding"], [["10000004", "50000004", "1.0"], ["10000001", "50000001", ""]])
    gz = _gzip(labels)
    for name in (labels, gz):
        normals, _ = read_no_finding(name, got)
        assert [r["dicom_id"] for r in normals] == ["dcm3"]
    # both present: the named file is read (here the unzipped one differs, to tell them apart)
    _csv(labels, ["subject_id", "study_id", "No Finding"], [["10000005", "50000005", "1.0"]])
    assert ds.find_csv(labels) == labels and ds.find_csv(gz) == gz
    assert [r["dicom_id"] for r in read_no_finding(labels, got)[0]] == ["dcm4"]
    assert [r["dicom_id"] for r in read_no_finding(gz, got)[0]] == ["dcm3"]
    # neither: both names in the error; a cut-off download: named, with the remedy
    with pytest.raises(FileNotFoundError, match=r"no-such.csv \(nor no-such.csv.gz\)"):
        ds._read_csv(str(tmp_path / "no-such.csv"), [])
    with open(gz, "rb") as f:
        data = f.read()
    with open(gz, "wb") as f:
        f.write(data[:len(data) // 2])
    os.remove(labels)
    with pytest.raises(ValueError, match=r"chexpert.csv.gz: cannot be read as gzipped text .*download it again"):
        read_no_finding(labels, got)


def test_curated_tuning_set(mimic):
    recs, _ = ds.read_mimic(mimic, views=("PA", "AP"), on_missing="skip")
    samples, rep = cu.curate_tuning_set(recs, exclude_subjects={"10000004"})
    print(rep)
    assert [(s["dicom_id"], s["prompt"]) for s in samples] == [("dcm0", "left lower atelectasis"),
                                                              ("dcm0", "bibasilar atelectasis")]
    assert samples[0]["sentence"] == "Left lower lobe atelectasis" and samples[0]["pathology"] == "Atelectasis"
    assert rep["several pathologies"] == 1 and rep["study of an excluded (MS-CXR) patient"] == 1
    assert rep["sentence without location (Edema)"] == 1 and rep["study without any located sentence"] == 1


def _mscxr_rows(root):
    p = "files/p10/p10000001/s50000001/"
    rows = [["a", "Pleural Effusion", "bilateral pleural effusions", p + "a.jpg", 2, 20, 10, 8, 40, 30],
            ["a", "Pleural Effusion", "bilateral pleural effusions", p + "a.jpg", 28, 20, 15, 12, 40, 30],  # w beyond 40
            ["a", "Cardiomegaly", "enlarged heart", p + "a.jpg", 10, 10, 20, 15, 40, 30],
            ["b", "Pneumothorax", "pneumothorax", p + "b.jpg", -5, 0, 10, 10, 40, 30],  # x < 0
            ["c", "Atelectasis", "left lower lobe atelectasis", p + "c.jpg", 1, 1, 5, 5, 40, 30]]  # c.jpg missing
    for d in ("a", "b"):
        _img(os.path.join(root, p, d + ".jpg"))
    return rows


def test_read_mscxr_v01_and_v110(tmp_path):
    root = str(tmp_path)
    rows = _mscxr_rows(root)
    _csv(str(tmp_path / "v01.csv"), MSCXR_COLS, rows)
    _csv(str(tmp_path / "v11.csv"), MSCXR_COLS + ["split"], [r + [s] for r, s in zip(rows, ["test", "test", "val", "test", "test"])])
    with pytest.raises(FileNotFoundError, match="c.jpg"):
        ds.read_mscxr(str(tmp_path / "v01.csv"), root)
    pairs, rep = ds.read_mscxr(str(tmp_path / "v01.csv"), root, on_missing="skip")
    print(rep)
    assert len(pairs) == 3 and rep["missing image file"] == 1
    eff = pairs[0]
    assert eff["boxes"] == [(2, 20, 10, 8), (28, 20, 12, 10)]  # several boxes grouped; the second clipped to 40x30
    assert eff["split"] is None and eff["subject_id"] == "10000001" and eff["image_width"] == 40
    assert pairs[2]["boxes"] == [(0, 0, 5, 10)]
    assert rep["box clipped to the image"] == 2 and rep["pairs with several boxes (kept, grouped)"] == 1
    with pytest.raises(ValueError, match="no `split` column"):
        ds.read_mscxr(str(tmp_path / "v01.csv"), root, splits=("test",))
    test, _ = ds.read_mscxr(str(tmp_path / "v11.csv"), root, splits=("test",), on_missing="skip")
    assert [p["category"] for p in test] == ["Pleural Effusion", "Pneumothorax"] and test[0]["split"] == "test"


def test_mscxr_patients_are_all_excluded_even_when_their_pairs_are_skipped(tmp_path):
    root = str(tmp_path)
    rows = _mscxr_rows(root) + [["d", "Atelectasis", "left base atelectasis", "files/p10/p10000002/s50000002/d.jpg",
                                 1, 1, 5, 5, 40, 30]]                # d.jpg missing: its only pair is skipped
    _csv(str(tmp_path / "ms.csv"), MSCXR_COLS, rows)
    pairs, _ = ds.read_mscxr(str(tmp_path / "ms.csv"), root, on_missing="skip")
    assert {p["subject_id"] for p in pairs} == {"10000001"}        # what the kept pairs alone would exclude
    assert ds.mscxr_subjects(str(tmp_path / "ms.csv")) == {"10000001", "10000002"}
    _csv(str(tmp_path / "bad.csv"), MSCXR_COLS, [rows[0][:3] + ["images/a.jpg"] + rows[0][4:]])
    with pytest.raises(ValueError, match="bad.csv row 2: path 'images/a.jpg' names no patient"):
        ds.mscxr_subjects(str(tmp_path / "bad.csv"))


def test_read_mscxr_json_twin_matches_csv(tmp_path):
    root = str(tmp_path)
    rows = _mscxr_rows(root)[:4]
    _csv(str(tmp_path / "v01.csv"), MSCXR_COLS, rows)
    cats = {n: i for i, n in enumerate(an.PATHOLOGIES)}
    images = [{"id": i, "file_name": rows[k][3], "width": 40, "height": 30} for i, k in enumerate((0, 3))]
    anns = [{"id": j, "image_id": 0 if r[0] == "a" else 1, "category_id": cats[r[1]], "bbox": r[4:8],
             "label_text": r[2]} for j, r in enumerate(rows)]
    (tmp_path / "ms.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                  "categories": [{"id": i, "name": n} for n, i in cats.items()]}))
    a, _ = ds.read_mscxr(str(tmp_path / "v01.csv"), root)
    b, rep = ds.read_mscxr_json(str(tmp_path / "ms.json"), root)
    key = lambda p: (p["dicom_id"], p["category"], p["phrase"], p["boxes"], p["image_width"])  # noqa: E731
    assert [key(p) for p in a] == [key(p) for p in b]
    assert rep["box clipped to the image"] == 2


def test_mscxr_loc_drops_and_counts_per_class(tmp_path):
    pairs, _ = ds.read_mscxr(str(_write(tmp_path)), str(tmp_path), on_missing="skip")
    loc, rep = cu.mscxr_loc(pairs)
    assert [p["prompt"] for p in loc] == ["bilateral pleural effusion", "cardiomegaly"]
    assert loc[1]["locations"] == ["cardiomegaly"]
    assert rep["no location: Pneumothorax"] == 1 and rep.kept == 2


def _write(tmp_path):
    _csv(str(tmp_path / "v01.csv"), MSCXR_COLS, _mscxr_rows(str(tmp_path)))
    return tmp_path / "v01.csv"


def test_read_scene_graph_clips_outside_coordinates(tmp_path):
    objs = [{"bbox_name": "right lung", "original_x1": -12, "original_y1": 5, "original_x2": 50, "original_y2": 90,
             "x1": 0, "y1": 1, "x2": 10, "y2": 20},
            {"bbox_name": "left lung", "original_x1": 60, "original_y1": 5, "original_x2": 130, "original_y2": 95},
            {"bbox_name": "trachea", "x1": 1, "y1": 1, "x2": 2, "y2": 2}]
    (tmp_path / "d1_SceneGraph.json").write_text(json.dumps({"image_id": "d1", "objects": objs}))
    (tmp_path / "d2_SceneGraph.json").write_text(json.dumps({"image_id": "d2", "objects": objs[:1]}))
    sgs, rep = read_imagenome(str(tmp_path), sizes={"d1": (120, 100)}, gold_ids={"d1"})
    print(rep)
    assert len(sgs) == 1 and rep["not in the gold subset"] == 1
    assert sgs[0]["boxes"]["right lung"] == (0.0, 5.0, 50.0, 90.0)
    assert sgs[0]["boxes"]["left lung"] == (60.0, 5.0, 120.0, 95.0)
    assert rep["anatomy box clipped to the image"] == 2 and rep["object without original_x1..y2 (skipped)"] == 1
    with pytest.raises(FileNotFoundError, match="SceneGraph"):
        read_imagenome(str(tmp_path / "empty"))


def test_read_vindr_spellings_no_finding_and_formats(tmp_path):
    img = tmp_path / "test"
    _img(str(img / "i1.png"), 100, 80)
    _img(str(img / "i2.jpg"), 100, 80)
    train = [["i1", "R8", "Pleural effusion", 10, 20, 30, 40], ["i1", "R9", "Pleural effusion", 10, 20, 30, 40],
             ["i1", "R9", "Pleural effusion", 60.5, 20, 120, 50], ["i1", "R8", "Other diseases", "", "", "", ""],
             ["i2", "R8", "No finding", "", "", "", ""], ["i2", "R9", "Aortic enlargement", 1, 1, 5, 5]]
    _csv(str(tmp_path / "annotations_train.csv"), ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max",
                                                   "y_max"], train)
    pairs, rep = read_vindr(str(tmp_path / "annotations_train.csv"), str(img))
    print(rep)
    assert len(pairs) == 1 and pairs[0]["category"] == "Pleural Effusion" and pairs[0]["split"] == "train"
    assert pairs[0]["boxes"] == [(10, 20, 20, 20), (60.5, 20, 39.5, 30)]  # duplicate merged, second clipped to 100
    assert rep["duplicate box (merged)"] == 1 and rep["class 'Other diseases' not one of the 8"] == 1
    assert rep["class 'No finding' not one of the 8"] == 1 and rep["box clipped to the image"] == 1
    test = [["i2", "Cardiomegaly", 20, 30, 70, 60], ["i3", "Lung Opacity", 1, 1, 9, 9], ["i2", "Other disease", "", "", "", ""]]
    _csv(str(tmp_path / "annotations_test.csv"), ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"], test)
    with pytest.raises(FileNotFoundError, match="i3"):
        read_vindr(str(tmp_path / "annotations_test.csv"), str(img))
    pairs, rep = read_vindr(str(tmp_path / "annotations_test.csv"), str(img), on_missing="skip")
    assert [p["image_path"].endswith("i2.jpg") for p in pairs] == [True] and pairs[0]["split"] == "test"
    assert rep["missing image file"] == 1 and rep["class 'Other disease' not one of the 8"] == 1


def test_vindr_prompts_nearest_gaussian():
    boxes = {r: (40 * k, 30 * k, 40 * k + 60, 30 * k + 90) for k, r in enumerate(an.REGIONS)}
    lut, _ = an.build_lut([dict(boxes=boxes, image_width=512, image_height=512)])
    def box(region):
        x1, y1, x2, y2 = boxes[region]
        return (x1 + 2, y1 - 3, x2 - x1, y2 - y1 + 4)
    pairs = [dict(category="Atelectasis", boxes=[box("left lower lung zone"), box("right lower lung zone")],
                  image_width=512, image_height=512),
             dict(category="Pneumothorax", boxes=[box("right apical zone")], image_width=512, image_height=512),
             dict(category="Cardiomegaly", boxes=[box("cardiac silhouette")], image_width=512, image_height=512)]
    out = cu.vindr_prompts(pairs, lut)
    assert [p["prompt"] for p in out] == ["bilateral lower atelectasis", "right apical pneumothorax", "cardiomegaly"]
    assert cu.vindr_prompts(pairs[:1], lut, merge=False)[0]["prompt"] == "left lower and right lower atelectasis"


def test_boxes_in_the_cropped_away_band_are_dropped_and_counted():
    # portrait 100 x 200, model side 50: scale .5, resized 50 x 100, crop rows 25..75 -> original rows [50, 150)
    assert crop_window(100, 200, 50) == (0, 50, 100)
    # landscape 200 x 100: original columns [50, 150)
    assert crop_window(200, 100, 50) == (50, 0, 100)
    tall = dict(image_width=100, image_height=200, category="Edema")
    wide = dict(image_width=200, image_height=100, category="Edema")
    pairs = [dict(tall, pair_id="p1", boxes=[(10, 10, 20, 30), (10, 140, 20, 30)]),   # top band | reaches in: kept whole
             dict(tall, pair_id="p2", boxes=[(0, 150, 100, 50)]),                     # bottom band only
             dict(tall, pair_id="p3", boxes=[(10, 30, 5, 20)]),                       # rows 30..49: touches row 50 only
             dict(tall, pair_id="p4", boxes=[(10, 49.6, 5, 1)]),                      # rounds to row 50: inside
             dict(wide, pair_id="p5", boxes=[(0, 0, 40, 100), (60, 10, 10, 10)]),     # left band | inside
             dict(tall, pair_id="p6", boxes=[(10, 100, 0.3, 5)])]                     # columns 10..10.3: no pixel
    out, rep = drop_cropped_boxes(pairs, 50, "test pairs")
    assert [p["pair_id"] for p in out] == ["p1", "p4", "p5"]
    assert out[0]["boxes"] == [(10, 140, 20, 30)] and out[2]["boxes"] == [(60, 10, 10, 10)]
    assert pairs[0]["boxes"] == [(10, 10, 20, 30), (10, 140, 20, 30)]                # the input is not changed
    assert rep["box wholly in the cropped-away band (dropped)"] == 4
    assert rep["box without a whole pixel after rounding (dropped)"] == 1
    assert rep["pair with no box left in the crop (dropped)"] == 3 and rep.kept == 3
    assert "p2" in str(rep)


def test_dropped_boxes_are_exactly_those_without_a_valid_heatmap_pixel():
    # the drop and the metrics agree: a box is kept iff the mapped-back heatmap has a non-NaN pixel in it
    g = torch.Generator().manual_seed(0)
    for W, H, S in [(60, 97, 16), (97, 60, 16), (50, 50, 16), (71, 180, 32)]:
        valid = ~torch.isnan(to_original(torch.zeros(S, S), W, H))
        for _ in range(200):
            x, y = (torch.rand(2, generator=g) * torch.tensor([W, H])).tolist()
            w, h = (torch.rand(2, generator=g) * torch.tensor([W - x, H - y]) + 0.6).tolist()
            pair = dict(pair_id="p", image_width=W, image_height=H, boxes=[(x, y, w, h)])
            kept = len(drop_cropped_boxes([pair], S)[0]) == 1
            assert kept == bool(valid[box_mask((x, y, w, h), (H, W), allow_empty=True)].any()), (W, H, S, x, y, w, h)
