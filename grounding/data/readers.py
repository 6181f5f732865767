"""Readers for MIMIC-CXR-JPG (+ reports) and MS-CXR (CSV and JSON), and what every reader shares (DataReport,
CSV and image-header checks). Chest ImaGenome: grounding/data/imagenome.py; VinDr-CXR: grounding/data/vindr.py.

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
import gzip
import io
import json
import math
import os
import re
import zlib

from grounding.anatomy import PATHOLOGIES
from grounding.data.images import check_image_end, image_size


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


def find_csv(path):
    """The file a CSV path names, as released or unzipped: `path` itself when it exists, else its twin NAME.csv.gz <->
    NAME.csv (MIMIC-CXR-JPG ships its metadata, split, chexpert and negbio CSVs gzipped). When both exist, the named
    one is read. Neither: a FileNotFoundError naming both."""
    twin = path[:-3] if path.endswith(".gz") else path + ".gz"
    for p in (path, twin):
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"CSV file not found: {path} (nor {os.path.basename(twin)})")


def _open_csv(path):
    """(the file read, an open text file) for a CSV path: plain, or gzip decompressed whole (a cut-off download
    fails here, naming the file, not halfway through the rows)."""
    path = find_csv(path)
    if not path.endswith(".gz"):
        return path, open(path, newline="")
    try:
        with gzip.open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (EOFError, OSError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as gzipped text ({type(e).__name__}: {e}); download it again, "
                         f"or put an unzipped copy at {path[:-3]}") from None
    return path, io.StringIO(text, newline="")


def _read_csv(path, required):
    """The data rows of a CSV as {column: value} dicts (as csv.DictReader). A file without a header, without the
    `required` columns or without data rows, or a row whose field count differs from the header's, raises naming
    the file (and row): csv.DictReader would fill a short row with None and keep a long row's extra fields aside."""
    path, f = _open_csv(path)
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: no header row (an empty file?); expected the columns {list(required)}")
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (has {sorted(header)})")
        rows = []
        for fields in reader:
            if not fields:  # a blank line, skipped as csv.DictReader does
                continue
            if len(fields) != len(header):
                raise ValueError(f"{path} row {len(rows) + 2} has {len(fields)} fields, the header has {len(header)} "
                                 "(an unquoted comma, or a truncated file?)")
            rows.append(dict(zip(header, fields)))
    if not rows:
        raise ValueError(f"{path}: no data rows (empty or truncated file?)")
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

    Opens the header only (PIL reads pixels lazily) and reads the last bytes of a JPEG or PNG for its end marker (a
    truncated file), so every image of a split is checked in seconds before a long run starts. An unreadable or
    truncated file or a size that disagrees with the CSV raises (on_missing="error") or is counted and skipped
    (on_missing="skip"). DICOM files are not opened here (pydicom is optional).
    """
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    try:
        w, h = image_size(path)
        check_image_end(path)
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


def _clip_box(x, y, w, h, W, H, report, key, row=None):
    """Clip (x, y, w, h) to the W x H image; count clipped and empty boxes. Returns the box or None."""
    if not all(math.isfinite(v) for v in (x, y, w, h)):  # max(0, nan) is 0 and min(W, nan) is W: a full-width box
        report.add("box with a NaN or infinite coordinate (dropped)", f"{row}: {key}" if row else key)
        return None
    x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        report.add("box clipped to the image", key)
    if x2 <= x1 or y2 <= y1:
        report.add("box empty after clipping (dropped)", key)
        return None
    return (x1, y1, x2 - x1, y2 - y1)


# ---------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG (+ MIMIC-CXR reports)

MIMIC_SPLITS = ("train", "validate", "test")  # the values of mimic-cxr-2.0.0-split.csv's `split` column


def mimic_image_path(root, subject_id, study_id, dicom_id):
    """files/p1X/p<subject>/s<study>/<dicom_id>.jpg (p1X = first two digits of the subject id)."""
    s = str(subject_id)
    return os.path.join(root, "files", f"p{s[:2]}", f"p{s}", f"s{study_id}", f"{dicom_id}.jpg")


def mimic_report_path(root, subject_id, study_id):
    s = str(subject_id)
    return os.path.join(root, "files", f"p{s[:2]}", f"p{s}", f"s{study_id}.txt")


# The MIMIC-CXR-JPG tables read_mimic reads and the columns it needs (the preflight checks the same ones)
MIMIC_TABLES = {"mimic-cxr-2.0.0-metadata.csv": ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"],
                "mimic-cxr-2.0.0-split.csv": ["dicom_id", "split"]}


def read_mimic(root, reports_root=None, splits=None, views=None, on_missing="error"):
    """MIMIC-CXR-JPG images joined with metadata, split and report paths.

    root holds files/ and mimic-cxr-2.0.0-metadata.csv / -split.csv (.csv.gz as released, or unzipped).
    reports_root: where files/pXX/p<subject>/s<study>.txt live (default: root).
    splits / views: keep only these (e.g. ("train",), ("PA", "AP")); every other row is counted.
    Returns (records with dicom_id, subject_id, study_id, split, view, image_width, image_height, image_path,
    report_path), DataReport).
    """
    report = DataReport(f"MIMIC-CXR-JPG {root}")
    meta, split_rows = (_read_csv(os.path.join(root, name), columns) for name, columns in MIMIC_TABLES.items())
    split_of = {r["dicom_id"]: r["split"] for r in split_rows}
    reports_root = reports_root or root
    out = []
    for n, r in enumerate(meta, start=2):  # CSV row n (row 1 is the header)
        d = r["dicom_id"]
        split = split_of.get(d)
        if split is None:
            report.add("not in split CSV", d)
            continue
        if split not in MIMIC_SPLITS:
            report.add(f"split {split!r} not one of {'/'.join(MIMIC_SPLITS)} (skipped)", d)
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

MSCXR_SPLIT_VALUES = ("train", "val", "test")  # the values of MS-CXR v1.1.0's `split` column
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
        boxes = [b for b in (_clip_box(*r["box"], first["W"], first["H"], report, key, r.get("where")) for r in rs) if b]
        repeated = len(boxes) - len(set(boxes))
        if repeated:  # a repeated CSV row is the same box, not a second one (it would halve CNR)
            report.add("duplicate box of a pair (merged)", key, n=repeated)
            boxes = list(dict.fromkeys(boxes))
        if not boxes:
            report.add("pair with no box left (dropped)", key)
            continue
        if len(boxes) > 1:
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
        if has_split and r["split"] not in MSCXR_SPLIT_VALUES:
            report.add(f"split {r['split']!r} not one of {'/'.join(MSCXR_SPLIT_VALUES)} (skipped)", f"row {n}")
            continue
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


def mscxr_subjects(csv_path):
    """Every patient an MS-CXR CSV names, from ALL its rows (also those read_mscxr drops: a missing image, a class
    outside the 8, ...): the tuning set must never hold an MS-CXR patient's study."""
    subjects = set()
    for n, r in enumerate(_read_csv(csv_path, ["path"]), start=2):
        subject, _ = _ids_from_path(r["path"])
        if subject is None:
            raise ValueError(f"{csv_path} row {n}: path {r['path']!r} names no patient (expected .../p<subject>/"
                             "s<study>/...); the MS-CXR patients could not be kept out of the tuning set")
        subjects.add(subject)
    return subjects


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
