"""Reader for VinDr-CXR's test annotations: out-of-distribution grounding pairs, one per image and class, boxes in
original pixels (docs/formats.md "Datasets", docs/paper.md section 8). Records and DataReport as
grounding/data/readers.py. VinDr has no report text: `nearest_location` names a box by the LUT Gaussian nearest to it
(grounding/data/curation.py `vindr_prompts` turns that into a prompt)."""
import collections
import os

from grounding.anatomy import PATHOLOGIES, location_name
from grounding.data.images import image_size
from grounding.data.readers import DataReport, _check_header, _clip_box, _number, _read_csv


# VinDr class spelling -> MS-CXR category (matched case-insensitively; "Pleural effusion" in VinDr).
VINDR_TO_MSCXR = {p.lower(): p for p in PATHOLOGIES}
# VinDr has no local "Pneumonia" box class (Pneumonia is a global label); the authors' loader renames the boxes of
# these two local classes to Pneumonia, so that 7 of the 8 MS-CXR classes are scored (edema has no test boxes).
VINDR_AS_PNEUMONIA = ("ild", "infiltration")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".dicom", ".dcm")


# Locations a single box can be matched to: one Gaussian each, and only the canonical name of each region
# (base/pleural duplicate "lower", lingular duplicates "left middle"; bilateral ones have two Gaussians).
SINGLE_BOX_LOCATIONS = tuple(location_name(s, z) for s in ("left", "right")
                             for z in ("", "apical", "upper", "middle", "lower", "costophrenic"))


def nearest_location(box_gaussian_, lut, candidates=SINGLE_BOX_LOCATIONS):
    """The candidate location whose Gaussian is nearest a box's (mu_x, mu_y, sigma_x, sigma_y).

    Distance: squared 2-Wasserstein between axis-aligned Gaussians = squared Euclidean distance over the
    4 numbers (docs/paper.md section 8). Ties go to the earlier candidate.
    """
    best, best_d = None, float("inf")
    for loc in candidates:
        for g in lut[loc]:
            d = sum((a - b) ** 2 for a, b in zip(box_gaussian_, g))
            if d < best_d:
                best, best_d = loc, d
    return best


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
