"""Reading X-ray images (PNG, JPEG, TIFF, DICOM) and the paper's per-family preprocessing of them.

docs/paper.md section 2: every family resizes the shortest side to the model size and centre-crops;
the MONAI CXR LDM (and our phantom LDM) takes 1 grey channel in [0,1], SD 1.x/2.x and RoentGen take
3 channels in [-1,1]. The parameters come from a pipeline's `image` dict {channels, size, range}.
The geometry of that resize and crop (and of boxes and heatmaps between the two frames) is part of the method:
grounding/geometry.py.
"""
import os

import numpy as np
from PIL import Image

from grounding.geometry import resize_crop


# ---------------------------------------------------------------------------------------------------
# Loading

def load_image(path):
    """Read an X-ray as a float32 (H, W) array in [0, 1]: 8/16-bit PNG, JPEG, float TIFF, or DICOM (needs pydicom)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if path.lower().endswith((".dcm", ".dicom")):
        return _load_dicom(path)
    try:
        with Image.open(path) as im:
            if im.mode == "F":  # 32-bit float (TIFF): the values themselves, not convert("L")'s 8-bit clip
                return _float_image(np.asarray(im, dtype=np.float32), path)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit PNGs (VinDr conversions) often hold 12-bit data: min-max scaled, like DICOM, so the
                # stored bit depth does not decide the brightness
                arr = np.asarray(im, dtype=np.float32)
                return (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6)
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError) as e:  # PIL's truncated or corrupt pixel data (its header read before a run)
        raise ValueError(f"cannot read image {path}: {e}; replace the file, or delete it and set the config key "
                         "on_missing: skip to count and skip missing images (the check before a run reads headers "
                         "and JPEG/PNG end markers, not pixels)") from e


def _float_image(arr, path):
    """A float image: kept as is when already in [0, 1], else min-max scaled to [0, 1] (like DICOM)."""
    if not np.isfinite(arr).all():
        raise ValueError(f"image {path} has NaN or infinite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return arr
    return (arr - lo) / max(hi - lo, 1e-6)


def _load_dicom(path):
    try:
        import pydicom  # optional: only users with raw VinDr DICOMs need it
    except ImportError as e:
        raise ImportError(f"{path} is DICOM but pydicom is not installed; `pip install pydicom` or convert "
                          "the images to PNG first (most VinDr-CXR users do)") from e
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float32)
    arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = 1.0 - arr  # MONOCHROME1 stores bone dark: invert so that dense is bright as everywhere else
    return arr


def image_size(path):
    """(width, height) from the file header without decoding the pixels."""
    with Image.open(path) as im:
        return im.size


# (first bytes, end marker) of a JPEG (end-of-image marker FF D9) and a PNG (the IEND chunk's type and CRC)
_END_MARKERS = ((b"\xff\xd8", b"\xff\xd9"), (b"\x89PNG", b"IEND\xaeB`\x82"))


def check_image_end(path, tail=1024):
    """Raise ValueError when a JPEG or PNG has no end marker in its last `tail` bytes: a truncated file, whose header
    reads but whose pixels fail to decode only when a run reaches them. Reads a few bytes, not the pixels; the tail
    (not the last two bytes) allows the padding some writers leave after the marker."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, os.path.getsize(path) - tail))
        end = f.read()
    for magic, marker in _END_MARKERS:
        if head.startswith(magic) and marker not in end:
            raise ValueError("the file ends before its end-of-image marker (truncated?)")


# ---------------------------------------------------------------------------------------------------
# Per-family preprocessing


def preprocess(image, image_cfg):
    """An image path or (H, W) array in [0,1] -> (C, S, S) tensor in the family's range.

    image_cfg: a pipeline's `image` dict, e.g. {"channels": 1, "size": 512, "range": [0, 1]} (MONAI CXR,
    phantom) or {"channels": 3, "size": 512, "range": [-1, 1]} (SD 1.x/2.x, RoentGen).
    """
    try:
        channels, size, (lo, hi) = int(image_cfg["channels"]), int(image_cfg["size"]), image_cfg["range"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"image config needs channels, size and range [lo, hi], got {image_cfg!r}") from e
    arr = load_image(image) if isinstance(image, (str, os.PathLike)) else image
    x = resize_crop(arr, size)
    x = x * (hi - lo) + lo
    return x[None].repeat(channels, 1, 1)
