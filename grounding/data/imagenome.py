"""Reader for Chest ImaGenome: scene graphs (silver) and the gold bounding-box CSV, the boxes the anatomy LUT is
built from (docs/formats.md "Datasets"). Records and DataReport as grounding/data/readers.py."""
import collections
import glob
import json
import os

from grounding.data.readers import DataReport, _read_csv


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
        rows = _read_csv(path, [])
        col = next((c for c in ("image_id", "dicom_id") if c in rows[0]), None)
        if col is None:
            raise ValueError(f"{path}: a gold id CSV needs an image_id or dicom_id column")
        ids = [r[col] for r in rows]
    else:
        with open(path) as f:
            ids = [line for line in f]
    ids = {i.strip()[:-4] if i.strip().lower().endswith(".dcm") else i.strip() for i in ids}
    return {i for i in ids if i}
