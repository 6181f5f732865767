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
        return load_dicom(path)[0]
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


def load_dicom(path):
    """A DICOM X-ray -> (float32 (H, W) array in [0, 1], {what was applied}), displayed as the file asks
    (DICOM PS3.3 C.11: stored values -> modality LUT -> VOI LUT -> presentation):

      1. rescale: y = RescaleSlope * stored + RescaleIntercept (the modality LUT of CR / DX images);
      2. VOI: the first VOI LUT table of the file, else its first window (centre c, width w) through its VOI LUT
         Function (LINEAR, LINEAR_EXACT or SIGMOID), else min-max of the rescaled values;
      3. MONOCHROME1 (bone dark) is inverted, so that dense is bright as in every other format.
    One frame only: a multi-frame file is refused (which frame would be the X-ray?). pydicom is optional.
    """
    try:
        import pydicom  # optional: only users with raw DICOMs (VinDr-CXR) need it
    except ImportError as e:
        raise ImportError(f"{path} is DICOM but pydicom is not installed; `pip install pydicom`, or convert the "
                          "images to PNG first (scripts/vindr_to_png.py does it with this same reading)") from e
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom's InvalidDicomError, a truncated header, ...: one clear message
        raise ValueError(f"cannot read DICOM {path}: {e}") from e
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"{path} holds {frames} frames (NumberOfFrames); one X-ray per file is expected: "
                         "export the frame you mean as its own file")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"{path}: PhotometricInterpretation {photometric}; only greyscale (MONOCHROME1/2) DICOM "
                         "X-rays are read: export it as a PNG")
    try:
        stored = ds.pixel_array
    except Exception as e:  # compressed pixel data without a decoder, truncated pixel data, no PixelData
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise ValueError(f"cannot decode the pixels of DICOM {path} (transfer syntax {syntax}): {e}. Truncated "
                         "file? Compressed data needs a decoder: pip install pylibjpeg pylibjpeg-libjpeg "
                         "pylibjpeg-openjpeg") from e
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    x = stored.astype(np.float64) * slope + intercept                      # 1. modality LUT
    info = {"rows": int(ds.Rows), "columns": int(ds.Columns), "photometric": photometric,
            "rescale": [slope, intercept]}
    lut = getattr(ds, "VOILUTSequence", None)
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if lut:                                                                 # 2. VOI: a table ...
        y, info["voi"] = _voi_table(lut[0], x), f"VOI LUT table 1 of {len(lut)}"
    elif center is not None and width is not None:                          # ... or a window ...
        c, w = _first(center), _first(width)
        function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
        y, info["voi"] = _window(x, c, w, function, path), f"window centre {c:g}, width {w:g} ({function})"
    else:                                                                   # ... or the values' own range
        y, info["voi"] = (x - x.min()) / max(float(x.max() - x.min()), 1e-6), "none in the file: min-max"
    if photometric == "MONOCHROME1":                                        # 3. presentation
        y = 1.0 - y
    info["inverted"] = photometric == "MONOCHROME1"
    return y.astype(np.float32), info


def _first(value):
    """The first of a possibly multi-valued DICOM number (the default view when a file offers several)."""
    try:
        return float(value)
    except TypeError:   # pydicom's MultiValue
        return float(value[0])


def _window(x, c, w, function, path):
    """PS3.3 C.11.2.1.2: the VOI window, output range [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT":
        if w <= 0:
            raise ValueError(f"{path}: WindowWidth {w:g} must be > 0 for LINEAR_EXACT")
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if function != "LINEAR":
        raise ValueError(f"{path}: VOILUTFunction {function!r} is not one of LINEAR, LINEAR_EXACT, SIGMOID")
    if w < 1:
        raise ValueError(f"{path}: WindowWidth {w:g} must be >= 1 for the LINEAR window")
    # below c - 0.5 - (w-1)/2 -> 0, above c - 0.5 + (w-1)/2 -> 1, linear between
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0) if w > 1 else (x > c - 0.5).astype(np.float64)


def _voi_table(item, x):
    """PS3.3 C.11.2.1.1: a VOI LUT table. LUTDescriptor = (entries, first value mapped, bits); values below the first
    take entry 0, above the last the last entry. The output is scaled by the table's own range (some files declare
    16 bits and hold 12)."""
    n, first, _ = (int(v) for v in item.LUTDescriptor)
    n = n or 65536                                         # 0 entries means 2^16
    data = item.LUTData
    table = np.frombuffer(data, "<u2")[:n] if isinstance(data, bytes) else np.asarray(data, dtype=np.float64)
    table = table.astype(np.float64)
    y = table[np.clip(np.round(x - first).astype(np.int64), 0, len(table) - 1)]
    return (y - table.min()) / max(float(table.max() - table.min()), 1e-6)


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
