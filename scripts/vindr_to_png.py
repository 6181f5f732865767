"""Convert VinDr-CXR's DICOMs to the PNGs the configs expect (config key vindr_images: a folder of <image_id>.png).

    python scripts/vindr_to_png.py VINDR/test VINDR/test_png --csv VINDR/annotations/annotations_test.csv
    # then, in the config:  vindr_images: VINDR/test_png   vindr_csv: VINDR/annotations/annotations_test.csv

Each <image_id>.dicom is read as every other DICOM here (grounding/data/images.py load_dicom: rescale slope /
intercept, the file's VOI LUT or window, MONOCHROME1 inverted; one frame only) and written as an 8-bit greyscale
PNG of the SAME size: the PNG's width x height is checked against the DICOM's Columns x Rows, so the boxes of
annotations_test.csv (original pixels) apply unchanged and the CSV is not touched. 8 bits: the reading above is
already the displayed image in [0, 1] (what the model sees after preprocessing; MIMIC-CXR-JPG, the training
data, is 8-bit too); a PNG read back differs from the DICOM read by at most 1/510.
With --csv, every image the CSV names must have a PNG at the end, and every box must lie inside its image.
Existing PNGs are kept (a rerun converts what is missing) unless --overwrite. Needs pydicom (optional elsewhere).
A file that fails is named with its reason; the others are still converted and the script exits 1.
"""
import argparse
import csv
import os
import sys
from multiprocessing import get_context

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grounding.data.images import image_size, load_dicom  # noqa: E402

DICOM_EXTS = (".dicom", ".dcm")


def convert(src, dst):
    """One DICOM -> one 8-bit PNG (atomic). Returns (Columns, Rows) of the DICOM."""
    arr, info = load_dicom(src)
    tmp = dst + ".tmp.png"
    Image.fromarray(np.round(arr * 255).astype(np.uint8)).save(tmp)
    os.replace(tmp, dst)
    if image_size(dst) != (info["columns"], info["rows"]):    # the boxes' frame: must not move
        raise ValueError(f"{dst} is {image_size(dst)} but the DICOM's Columns x Rows is "
                         f"{(info['columns'], info['rows'])}")
    return info["columns"], info["rows"]


def _job(args):
    src, dst = args
    try:
        return src, convert(src, dst), None
    except (ValueError, OSError) as e:
        return src, None, str(e)


def check_csv(csv_path, out_dir, sizes):
    """[problem, ...]: images the CSV names without a PNG in out_dir, and boxes outside their image."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("image_id", "x_min", "y_min", "x_max", "y_max") if rows and c not in rows[0]]
    if missing:
        return [f"{csv_path}: no column(s) {missing}; is it VinDr-CXR's annotations_*.csv?"]
    problems = []
    for n, r in enumerate(rows, start=2):
        image = os.path.join(out_dir, r["image_id"] + ".png")
        if r["image_id"] not in sizes:
            if not os.path.exists(image):
                problems.append(f"{csv_path} row {n}: no {image}")
                continue
            sizes[r["image_id"]] = image_size(image)
        if r["x_max"].strip():
            W, H = sizes[r["image_id"]]
            try:
                x1, y1, x2, y2 = (float(r[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
            except ValueError:
                problems.append(f"{csv_path} row {n}: a box column is not a number: "
                                f"{[r[k] for k in ('x_min', 'y_min', 'x_max', 'y_max')]}")
                continue
            if x1 < 0 or y1 < 0 or x2 > W or y2 > H:
                problems.append(f"{csv_path} row {n}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) outside the "
                                f"{W}x{H} image {r['image_id']}")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder of VinDr-CXR DICOMs (<image_id>.dicom), e.g. vindr-cxr/1.0.0/test")
    p.add_argument("out", help="folder for the PNGs (<image_id>.png): the config's vindr_images")
    p.add_argument("--csv", default=None, help="annotations_test.csv: check that each image it names has a PNG and "
                   "each box lies inside its image")
    p.add_argument("--workers", type=int, default=1, help="processes converting in parallel")
    p.add_argument("--overwrite", action="store_true", help="convert again the images that already have a PNG")
    args = p.parse_args(argv)
    if not os.path.isdir(args.src):
        p.error(f"{args.src}: no such folder (VinDr-CXR's test/ or train/ folder of .dicom files)")
    try:
        import pydicom  # noqa: F401  (optional elsewhere, needed here)
    except ImportError:
        p.error("pydicom is not installed: `pip install pydicom` (the only extra package this script needs)")
    names = sorted(n for n in os.listdir(args.src) if n.lower().endswith(DICOM_EXTS))
    if not names:
        p.error(f"{args.src}: no .dicom / .dcm files")
    os.makedirs(args.out, exist_ok=True)
    jobs, kept, sizes = [], 0, {}
    for n in names:
        dst = os.path.join(args.out, os.path.splitext(n)[0] + ".png")
        if os.path.exists(dst) and not args.overwrite:
            kept += 1
            continue
        jobs.append((os.path.join(args.src, n), dst))
    print(f"{len(names)} DICOMs in {args.src}: converting {len(jobs)}, {kept} already converted in {args.out}")
    if args.workers > 1:
        with get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(_job, jobs, chunksize=8)
    else:
        results = [_job(j) for j in jobs]
    failed = [(src, err) for src, _, err in results if err]
    for src, size, _ in results:
        if size:
            sizes[os.path.splitext(os.path.basename(src))[0]] = size
    print(f"wrote {len(sizes)} PNGs; each has its DICOM's Columns x Rows (checked on the written file), so the "
          "boxes in original pixels apply unchanged")
    problems = [f"{src}: {err}" for src, err in failed]
    if args.csv:
        csv_problems = check_csv(args.csv, args.out, sizes)
        problems += csv_problems
        if not csv_problems:
            print(f"{args.csv}: every image it names has a PNG in {args.out}, every box lies inside its image")
    if problems:
        print(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems[:50])
              + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""), file=sys.stderr)
        return 1
    print(f"set in the config:\n  vindr_images: {args.out}" + (f"\n  vindr_csv: {args.csv}" if args.csv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
