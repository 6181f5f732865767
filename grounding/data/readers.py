"""Readers for MIMIC-CXR-JPG (+ reports), MS-CXR (CSV and JSON), Chest ImaGenome and VinDr-CXR.

Formats: docs/formats.md "Datasets". Evaluation sets: docs/paper.md section 8.
Records are plain dicts (ARCHITECTURE.md "Grounding data records"):
- grounding pair: pair_id, dicom_id, image_path, category, phrase, prompt, locations, boxes [(x, y, w, h)
  in ORIGINAL pixels], image_width, image_height, split, source;
- MIMIC record: dicom_id, subject_id, study_id, split, view, image_width, image_height, image_path, report_path.
Every reader returns (records, DataReport): nothing is dropped or changed without being counted there.
The weak supervision built on these records (curated tuning set, MS-CXR-loc, VinDr prompts) is in
grounding/data/curation.py. The phantom world (grounding/phantom/world.py) writes these same formats, so these readers are
what reads it.
"""
import collections
import csv
import glob
import json
import os
import re

from grounding.anatomy import PATHOLOGIES
from grounding.data.images import image_size


class DataReport:
    """Counts of everything a reader skipped or changed, with a few examples of each."""

    def __init__(self, name):
        self.name, self.kept = name, 0
        self.counts = collections.Counter()
        self.examples = collections.defaultdict(list)

    def add(self, reason, example=None, n=1):
        self.counts[reason] += n
        if example is not None and len(self.examples[reason]) < 3:
            self.examples[reason].append(str(example))

    def __getitem__(self, reason):
        return self.counts[reason]

    def __str__(self):
        lines = [f"{self.name}: kept {self.kept}"]
        for reason, n in sorted(self.counts.items()):
            ex = "; e.g. " + ", ".join(self.examples[reason]) if self.examples[reason] else ""
            lines.append(f"  {reason}: {n}{ex}")
        return "\n".join(lines)


def _read_csv(path, required):
    if not os.path.exists(path):
        raise FileNotFoundError(f"CSV file not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = set(rows[0]) if rows else set()
    missing = [c for c in required if c not in cols]
    if rows and missing:
        raise ValueError(f"{path}: missing columns {missing} (has {sorted(cols)})")
    return rows


def _check_image(path, on_missing, report, key):
    """True if the image exists; else raise (on_missing="error") or count a skip (on_missing="skip")."""
    if os.path.exists(path):
        return True
    if on_missing == "error":
        raise FileNotFoundError(f"{key}: image file not found: {path} (config key on_missing: skip counts and "
                                "skips such images)")
    report.add("missing image file", path)
    return False


def _check_header(path, on_missing, report, key, size=None):
    """True if the image's header reads (and gives `size` = (width, height) when one is recorded).

    Opens the header only (PIL reads pixels lazily), so every image of a split is checked in seconds before a
    long run starts. An unreadable file or a size that disagrees with the CSV raises (on_missing="error") or is
    counted and skipped (on_missing="skip"). DICOM files are not opened here (pydicom is optional).
    """
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    try:
        w, h = image_size(path)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        if on_missing == "error":
            raise ValueError(f"{key}: cannot read image {path} ({e}); replace the file, or set the config key "
                             "on_missing: skip to count and skip such images") from None
        report.add("unreadable image file (skipped)", key)
        return False
    if size is not None and (w, h) != tuple(size):
        swapped = " (width and height swapped?)" if (h, w) == tuple(size) else ""
        if on_missing == "error":
            raise ValueError(f"{key}: the CSV records image_width={size[0]}, image_height={size[1]} but {path} is "
                             f"{w} x {h}{swapped}; boxes are scored in original pixels, so fix the CSV or the image "
                             "(or set on_missing: skip to count and skip such pairs)")
        report.add("image size differs from the CSV (skipped)", key)
        return False
    return True


def check_images(records, on_missing="error", report=None, name="images"):
    """Records whose image header reads; the rest raise or are counted (e.g. curated tuning samples before a run)."""
    report = report if report is not None else DataReport(name)
    seen, out = {}, []
    for r in records:
        path = r["image_path"]
        if path not in seen:
            seen[path] = _check_header(path, on_missing, report, f"{r.get('dicom_id', path)}")
        if seen[path]:
            out.append(r)
    report.kept = len(out)
    return out, report


def _number(value, where, column):
    """float(value), or a ValueError naming the file, row and column."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: column {column!r} = {value!r} is not a number") from None


def _clip_box(x, y, w, h, W, H, report, key):
    """Clip (x, y, w, h) to the W x H image; count clipped and empty boxes. Returns the box or None."""
    x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        report.add("box clipped to the image", key)
    if x2 <= x1 or y2 <= y1:
        report.add("box empty after clipping (dropped)", key)
        return None
    return (x1, y1, x2 - x1, y2 - y1)


# ---------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG (+ MIMIC-CXR reports)

def mimic_image_path(root, subject_id, study_id, dicom_id):
    """files/p1X/p<subject>/s<study>/<dicom_id>.jpg (p1X = first two digits of the subject id)."""
    s = str(subject_id)
    return os.path.join(root, "files", f"p{s[:2]}", f"p{s}", f"s{study_id}", f"{dicom_id}.jpg")


def mimic_report_path(root, subject_id, study_id):
    s = str(subject_id)
    return os.path.join(root, "files", f"p{s[:2]}", f"p{s}", f"s{study_id}.txt")


def read_mimic(root, reports_root=None, splits=None, views=None, on_missing="error"):
    """MIMIC-CXR-JPG images joined with metadata, split and report paths.

    root holds files/ and mimic-cxr-2.0.0-metadata.csv / -split.csv (.csv or .csv.gz is NOT read: unzip first).
    reports_root: where files/pXX/p<subject>/s<study>.txt live (default: root).
    splits / views: keep only these (e.g. ("train",), ("PA", "AP")); every other row is counted.
    Returns (records with dicom_id, subject_id, study_id, split, view, image_width, image_height, image_path,
    report_path), DataReport).
    """
    report = DataReport(f"MIMIC-CXR-JPG {root}")
    meta = _read_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"),
                     ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"])
    split_rows = _read_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv"), ["dicom_id", "split"])
    split_of = {r["dicom_id"]: r["split"] for r in split_rows}
    reports_root = reports_root or root
    out = []
    for n, r in enumerate(meta, start=2):  # CSV row n (row 1 is the header)
        d = r["dicom_id"]
        split = split_of.get(d)
        if split is None:
            report.add("not in split CSV", d)
            continue
        if splits and split not in splits:
            report.add(f"split {split} not requested")
            continue
        if views and r["ViewPosition"] not in views:
            report.add(f"view {r['ViewPosition'] or '(empty)'} not requested")
            continue
        path = mimic_image_path(root, r["subject_id"], r["study_id"], d)
        if not _check_image(path, on_missing, report, f"metadata row {d}"):
            continue
        where = f"{root}/mimic-cxr-2.0.0-metadata.csv row {n}"
        out.append(dict(dicom_id=d, subject_id=r["subject_id"], study_id=r["study_id"], split=split,
                        view=r["ViewPosition"], image_width=int(_number(r["Columns"], where, "Columns")),
                        image_height=int(_number(r["Rows"], where, "Rows")), image_path=path,
                        report_path=mimic_report_path(reports_root, r["subject_id"], r["study_id"])))
    report.kept = len(out)
    return out, report


# ---------------------------------------------------------------------------------------------------
# MS-CXR (CSV v0.1 / v1.1.0 and the COCO JSON twin)

_PATH_IDS = re.compile(r"p(\d+)[/\\]s(\d+)")


def _ids_from_path(path):
    m = _PATH_IDS.search(path)
    return (m.group(1), m.group(2)) if m else (None, None)


def _group_pairs(rows, image_root, on_missing, report, source):
    """rows: dicts with dicom_id, category, phrase, rel_path, box, W, H, split -> grounding pairs."""
    groups = collections.OrderedDict()
    for r in rows:
        groups.setdefault((r["dicom_id"], r["category"], r["phrase"]), []).append(r)
    n_per_image = collections.Counter()
    out = []
    for (dicom_id, category, phrase), rs in groups.items():
        first = rs[0]
        key = f"{dicom_id} / {category} / {phrase!r}"
        if category not in PATHOLOGIES:
            report.add(f"category {category!r} not one of the 8", key)
            continue
        if not phrase.strip():
            report.add("empty phrase", key)
            continue
        path = os.path.join(image_root, first["rel_path"]) if image_root else first["rel_path"]
        where = f"pair {dicom_id}_{n_per_image[dicom_id]:02d} ({first.get('where') or key})"
        if not _check_image(path, on_missing, report, where):
            continue
        if not _check_header(path, on_missing, report, where, size=(first["W"], first["H"])):
            continue
        boxes = [b for b in (_clip_box(*r["box"], first["W"], first["H"], report, key) for r in rs) if b]
        if not boxes:
            report.add("pair with no box left (dropped)", key)
            continue
        if len(rs) > 1:
            report.add("pairs with several boxes (kept, grouped)")
        subject_id, study_id = _ids_from_path(first["rel_path"])
        out.append(dict(pair_id=f"{dicom_id}_{n_per_image[dicom_id]:02d}", dicom_id=dicom_id, image_path=path,
                        category=category, phrase=phrase, prompt=phrase, locations=[], boxes=boxes,
                        image_width=first["W"], image_height=first["H"], split=first["split"], source=source,
                        subject_id=subject_id, study_id=study_id))
        n_per_image[dicom_id] += 1
    report.kept = len(out)
    return out


def read_mscxr(csv_path, image_root=None, splits=None, on_missing="error", source="mimic"):
    """MS-CXR CSV (v0.1 without `split`, v1.1.0 with it) -> grounding pairs, one per (image, category, phrase).

    image_root: the MIMIC-CXR-JPG root that the CSV's `path` column is relative to.
    splits: keep only these splits; asking for splits from a v0.1 file (no `split` column) is an error.
    """
    report = DataReport(f"MS-CXR {csv_path}")
    raw = _read_csv(csv_path, ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                               "image_width", "image_height"])
    has_split = bool(raw) and "split" in raw[0]
    if splits and not has_split:
        raise ValueError(f"{csv_path}: no `split` column (MS-CXR v0.1); drop the split filter or use v1.1.0")
    rows = []
    for n, r in enumerate(raw, start=2):  # CSV row n of the file (row 1 is the header)
        if splits and r["split"] not in splits:
            report.add(f"split {r['split']} not requested")
            continue
        where = f"{csv_path} row {n}"
        rows.append(dict(dicom_id=r["dicom_id"], category=r["category_name"], phrase=r["label_text"],
                         rel_path=r["path"], box=tuple(_number(r[k], where, k) for k in "xywh"),
                         W=int(_number(r["image_width"], where, "image_width")),
                         H=int(_number(r["image_height"], where, "image_height")),
                         split=r["split"] if has_split else None, where=f"CSV row {n}"))
    return _group_pairs(rows, image_root, on_missing, report, source), report


def read_mscxr_json(json_path, image_root=None, on_missing="error", source="mimic"):
    """The COCO-style twin: images [{id, file_name | path, width, height}], annotations [{image_id,
    category_id, bbox [x, y, w, h], label_text}], categories [{id, name}]."""
    report = DataReport(f"MS-CXR JSON {json_path}")
    with open(json_path) as f:
        data = json.load(f)
    try:
        images = {im["id"]: im for im in data["images"]}
        cats = {c["id"]: c["name"] for c in data["categories"]}
        anns = data["annotations"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{json_path}: not a COCO-style file with images/annotations/categories ({e})") from e
    rows = []
    for a in anns:
        im = images.get(a["image_id"])
        if im is None:
            report.add("annotation for an unknown image id", a.get("id"))
            continue
        rel = im.get("path") or im.get("file_name")
        dicom_id = im.get("dicom_id") or os.path.splitext(os.path.basename(rel))[0]
        where = f"{json_path} annotation id {a.get('id')}"
        rows.append(dict(dicom_id=dicom_id, category=cats[a["category_id"]], phrase=a.get("label_text", ""),
                         rel_path=rel, box=tuple(_number(v, where, "bbox") for v in a["bbox"]),
                         W=int(_number(im["width"], where, "width")), H=int(_number(im["height"], where, "height")),
                         split=im.get("split"), where=f"annotation id {a.get('id')}"))
    return _group_pairs(rows, image_root, on_missing, report, source), report


# ---------------------------------------------------------------------------------------------------
# Chest ImaGenome scene graphs

def read_scene_graph(path, image_width=None, image_height=None, report=None):
    """One <dicom_id>_SceneGraph.json -> {dicom_id, boxes {bbox_name: (x1, y1, x2, y2)}, image_width, image_height}.

    Uses the original_x1..original_y2 coordinates (original pixels), clipped to the image when its size is
    given (MIMIC metadata Columns/Rows), else only at 0; every clip is counted in `report`.
    """
    report = report if report is not None else DataReport(f"ImaGenome {path}")
    with open(path) as f:
        sg = json.load(f)
    dicom_id = sg.get("image_id") or os.path.basename(path).split("_SceneGraph")[0]
    W, H = image_width or float("inf"), image_height or float("inf")
    boxes = {}
    for o in sg.get("objects", []):
        try:
            x1, y1, x2, y2 = (float(o[f"original_{k}"]) for k in ("x1", "y1", "x2", "y2"))
        except KeyError:
            report.add("object without original_x1..y2 (skipped)", f"{dicom_id}/{o.get('bbox_name')}")
            continue
        c = (max(0.0, x1), max(0.0, y1), min(W, x2), min(H, y2))
        if c != (x1, y1, x2, y2):
            report.add("anatomy box clipped to the image", f"{dicom_id}/{o['bbox_name']}")
        boxes[o["bbox_name"]] = c
    if image_width is None:  # no metadata: the furthest box edge is the best size we know
        image_width = max((b[2] for b in boxes.values()), default=0)
        image_height = max((b[3] for b in boxes.values()), default=0)
    return dict(dicom_id=dicom_id, boxes=boxes, image_width=image_width, image_height=image_height)


def read_imagenome(scene_graph_dir, sizes=None, gold_ids=None):
    """All scene graphs in a folder (optionally only the gold subset's dicom ids).

    sizes: {dicom_id: (width, height)}, e.g. from read_mimic records; images without a size are counted.
    gold_ids: a set of dicom ids (see read_gold_ids); None keeps every graph in the folder.
    """
    report = DataReport(f"Chest ImaGenome {scene_graph_dir}" + ("" if gold_ids is None else
                                                                 f" ({len(gold_ids)} gold ids)"))
    paths = sorted(glob.glob(os.path.join(scene_graph_dir, "*_SceneGraph.json")))
    if not paths:
        raise FileNotFoundError(f"no *_SceneGraph.json files in {scene_graph_dir}")
    out = []
    for p in paths:
        dicom_id = os.path.basename(p).split("_SceneGraph")[0]
        if gold_ids is not None and dicom_id not in gold_ids:
            report.add("not in the gold subset")
            continue
        wh = (sizes or {}).get(dicom_id)
        if wh is None:
            report.add("no image size known (clipped at 0 only)", dicom_id)
        out.append(read_scene_graph(p, *(wh or (None, None)), report=report))
    report.kept = len(out)
    return out, report


_GOLD_COLUMNS = ["image_id", "bbox_name", "original_x1", "original_y1", "original_x2", "original_y2"]


def read_imagenome_gold_csv(csv_path, sizes=None):
    """Chest ImaGenome gold_bbox_coordinate_annotations_1000images.csv -> one record per image, like read_scene_graph.

    Columns used: image_id (the dicom id WITH a ".dcm" suffix, stripped here), bbox_name, annotator and
    original_x1, original_y1, original_x2, original_y2 (original pixels). original_width / original_height are the
    BOX's size, not the image's, so the image size comes from `sizes` ({dicom_id: (width, height)}, MIMIC metadata
    Columns/Rows); boxes are clipped to it (at 0 only where the size is unknown, counted). The x1..y2 columns are in
    ImaGenome's 224 frame and are not used. Where an image has several annotators (several rows for one bbox_name)
    their clipped boxes are averaged into one, and the image is counted.
    """
    report = DataReport(f"Chest ImaGenome gold CSV {csv_path}")
    rows = _read_csv(csv_path, _GOLD_COLUMNS)
    per_image = collections.OrderedDict()  # dicom_id -> {bbox_name: [clipped boxes]}
    annotators = collections.defaultdict(set)
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        dicom_id = r["image_id"].strip()
        dicom_id = dicom_id[:-4] if dicom_id.lower().endswith(".dcm") else dicom_id
        name = r["bbox_name"].strip()
        try:
            x1, y1, x2, y2 = (float(r[f"original_{k}"]) for k in ("x1", "y1", "x2", "y2"))
        except ValueError:
            raise ValueError(f"{csv_path} row {i} ({dicom_id}/{name}): original_x1..y2 must be numbers, got "
                             f"{[r[f'original_{k}'] for k in ('x1', 'y1', 'x2', 'y2')]}") from None
        wh = (sizes or {}).get(dicom_id)
        W, H = wh if wh else (float("inf"), float("inf"))
        c = (max(0.0, x1), max(0.0, y1), min(float(W), x2), min(float(H), y2))
        if c != (x1, y1, x2, y2):
            report.add("anatomy box clipped to the image", f"{dicom_id}/{name}")
        if c[2] <= c[0] or c[3] <= c[1]:
            report.add("anatomy box empty after clipping (dropped)", f"{dicom_id}/{name}")
            continue
        per_image.setdefault(dicom_id, {}).setdefault(name, []).append(c)
        annotators[dicom_id].add(r.get("annotator", ""))
    out = []
    for dicom_id, regions in per_image.items():
        if len(annotators[dicom_id]) > 1 or any(len(v) > 1 for v in regions.values()):
            report.add("image with several annotators (boxes averaged per region)", dicom_id)
        boxes = {name: tuple(sum(b[k] for b in bs) / len(bs) for k in range(4)) for name, bs in regions.items()}
        wh = (sizes or {}).get(dicom_id)
        if wh is None:
            report.add("no image size known (clipped at 0 only)", dicom_id)
            wh = (max(b[2] for b in boxes.values()), max(b[3] for b in boxes.values()))
        out.append(dict(dicom_id=dicom_id, boxes=boxes, image_width=wh[0], image_height=wh[1]))
    report.kept = len(out)
    return out, report


def read_gold_ids(path):
    """The gold subset's dicom ids from a text file (one per line) or a CSV with an image_id / dicom_id column
    (e.g. the gold CSV itself); a ".dcm" suffix is stripped."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"gold id list not found: {path}")
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        col = next((c for c in ("image_id", "dicom_id") if rows and c in rows[0]), None)
        if col is None:
            raise ValueError(f"{path}: a gold id CSV needs an image_id or dicom_id column")
        ids = [r[col] for r in rows]
    else:
        with open(path) as f:
            ids = [line for line in f]
    ids = {i.strip()[:-4] if i.strip().lower().endswith(".dcm") else i.strip() for i in ids}
    return {i for i in ids if i}


# ---------------------------------------------------------------------------------------------------
# VinDr-CXR

# VinDr class spelling -> MS-CXR category (matched case-insensitively; "Pleural effusion" in VinDr).
VINDR_TO_MSCXR = {p.lower(): p for p in PATHOLOGIES}
# VinDr has no local "Pneumonia" box class (Pneumonia is a global label); the authors' loader renames the boxes of
# these two local classes to Pneumonia, so that 7 of the 8 MS-CXR classes are scored (edema has no test boxes).
VINDR_AS_PNEUMONIA = ("ild", "infiltration")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".dicom", ".dcm")


def _find_image(image_dir, image_id):
    for ext in _IMAGE_EXTS:
        p = os.path.join(image_dir, image_id + ext)
        if os.path.exists(p):
            return p
    return None


def vindr_labels_path(csv_path):
    """annotations_test.csv -> image_labels_test.csv in the same folder (the release's layout)."""
    folder, name = os.path.split(csv_path)
    return os.path.join(folder, name.replace("annotations_", "image_labels_", 1))


def read_vindr_labels(path):
    """image_labels_{train,test}.csv -> {image_id: set of MS-CXR categories labelled 1 on the image}.

    One 0/1 column per local and global label (VinDr spelling); the train file has one row per radiologist, and an
    image counts as positive for a class when any of its rows is.
    """
    rows = _read_csv(path, ["image_id"])
    cols = {c: VINDR_TO_MSCXR[c.strip().lower()] for c in (rows[0] if rows else {}) if c.strip().lower() in VINDR_TO_MSCXR}
    out = collections.defaultdict(set)
    for r in rows:
        for c, cat in cols.items():
            if r[c].strip() not in ("", "0", "0.0"):
                out[r["image_id"]].add(cat)
    return out


def read_vindr(csv_path, image_dir, on_missing="error", split=None, source="vindr", labels_csv="auto"):
    """VinDr-CXR annotations_{train,test}.csv -> grounding pairs, one per (image, class) with all its boxes.

    As the authors' loader: ILD and Infiltration boxes become Pneumonia, and all boxes of one class on one image
    (every radiologist's, rad_id or not) form ONE pair. labels_csv: image_labels_{split}.csv ("auto" = next to
    csv_path when present, None = do not read). The authors use it to keep ILD / Infiltration boxes only on images
    labelled positive for at least one of the 8 MS-CXR classes (their filter takes any of the 8, Pneumonia
    included); without the file every ILD / Infiltration box becomes Pneumonia, and the report says so.
    Handles: missing rad_id (test file), "No finding" / global-label rows with empty boxes (counted), classes
    outside the 8 (counted, e.g. "Other diseases" / "Other disease"), images as PNG/JPG (<image_id>.png ...),
    DICOM only through pydicom. Boxes are x_min, y_min, x_max, y_max floats -> (x, y, w, h), clipped.
    """
    report = DataReport(f"VinDr-CXR {csv_path}")
    rows = _read_csv(csv_path, ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"])
    split = split or ("test" if "test" in os.path.basename(csv_path) else "train")
    if labels_csv == "auto":
        labels_csv = vindr_labels_path(csv_path) if os.path.exists(vindr_labels_path(csv_path)) else None
    labels = read_vindr_labels(labels_csv) if labels_csv else None
    report.name += f" + {labels_csv}" if labels_csv else " (no image_labels CSV: every ILD/Infiltration box -> Pneumonia)"
    groups = collections.OrderedDict()
    for n, r in enumerate(rows, start=2):  # CSV row n (row 1 is the header)
        name = r["class_name"].strip().lower()
        cls = VINDR_TO_MSCXR.get(name)
        if cls is None and name in VINDR_AS_PNEUMONIA:
            if labels is not None and not labels.get(r["image_id"]):
                report.add(f"{r['class_name']} box on an image with none of the 8 labels (dropped, as the authors)",
                           r["image_id"])
                continue
            cls = "Pneumonia"
            report.add(f"{r['class_name']} box -> Pneumonia")
        if cls is None:
            report.add(f"class {r['class_name']!r} not one of the 8")
            continue
        if any(not r[k].strip() for k in ("x_min", "y_min", "x_max", "y_max")):
            report.add("row without a box (skipped)", f"{r['image_id']}/{r['class_name']}")
            continue
        x1, y1, x2, y2 = (_number(r[k], f"{csv_path} row {n}", k) for k in ("x_min", "y_min", "x_max", "y_max"))
        box = (x1, y1, x2 - x1, y2 - y1)
        g = groups.setdefault((r["image_id"], cls), [])
        if box in g:
            report.add("duplicate box (merged)")
        else:
            if g:
                report.add("box joined to an earlier box of its (image, class) pair")
            g.append(box)
    out, sizes = [], {}
    for (image_id, cls), boxes in groups.items():
        key = f"{image_id}/{cls}"
        path = _find_image(image_dir, image_id)
        if path is None:
            if on_missing == "error":
                raise FileNotFoundError(f"{key}: no image {image_id}{{{','.join(_IMAGE_EXTS)}}} in {image_dir} "
                                        "(pass on_missing='skip' to count and skip)")
            report.add("missing image file", key)
            continue
        if image_id not in sizes:
            if not _check_header(path, on_missing, report, f"pair {key}"):
                continue
            if path.endswith((".dicom", ".dcm")):
                from grounding.data.images import load_image
                h, w = load_image(path).shape
                sizes[image_id] = (w, h)
            else:
                sizes[image_id] = image_size(path)
        W, H = sizes[image_id]
        boxes = [b for b in (_clip_box(*b, W, H, report, key) for b in boxes) if b]
        if not boxes:
            report.add("pair with no box left (dropped)", key)
            continue
        out.append(dict(pair_id=f"{image_id}_{cls.lower().replace(' ', '_')}", dicom_id=image_id, image_path=path,
                        category=cls, phrase="", prompt="", locations=[], boxes=boxes, image_width=W,
                        image_height=H, split=split, source=source))
    report.kept = len(out)
    return out, report
