"""Image loading and the paper's per-family preprocessing, with the box transforms that go with it.

docs/paper.md section 2: every family resizes the shortest side to the model size and centre-crops;
the MONAI CXR LDM (and our phantom LDM) takes 1 grey channel in [0,1], SD 1.x/2.x and RoentGen take
3 channels in [-1,1]. The parameters come from a pipeline's `image` dict {channels, size, range}.
docs/paper.md section 6 step 6: a heatmap in the model frame goes back to the original image by nearest
upsampling to the original shortest side and NaN padding of the cropped-away borders (`to_original`).

Geometry: an original W x H image is resized to (rw, rh) = round(W s), round(H s) with s = size / min(W, H),
then the centre crop keeps [left, left + size) x [top, top + size), left = (rw - size) // 2.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


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
                arr = np.asarray(im, dtype=np.float32)
                return arr / (65535.0 if arr.max() > 255 else 255.0)  # 16-bit PNGs (VinDr conversions)
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


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


# ---------------------------------------------------------------------------------------------------
# Geometry of "shortest side -> size, centre crop"

def frame_params(orig_w, orig_h, size):
    """(sx, sy, left, top): per-axis scale after rounding, and the crop offset in resized pixels."""
    if orig_w <= 0 or orig_h <= 0:
        raise ValueError(f"image size must be positive, got {orig_w}x{orig_h}")
    s = size / min(orig_w, orig_h)
    rw, rh = max(size, round(orig_w * s)), max(size, round(orig_h * s))
    return rw / orig_w, rh / orig_h, (rw - size) // 2, (rh - size) // 2


def box_to_model(box, orig_w, orig_h, size, clip=True):
    """(x, y, w, h) in original pixels -> the same box in the size x size model frame (clipped to it)."""
    sx, sy, left, top = frame_params(orig_w, orig_h, size)
    x1, y1 = box[0] * sx - left, box[1] * sy - top
    x2, y2 = (box[0] + box[2]) * sx - left, (box[1] + box[3]) * sy - top
    if clip:
        x1, x2 = min(max(x1, 0.0), size), min(max(x2, 0.0), size)
        y1, y2 = min(max(y1, 0.0), size), min(max(y2, 0.0), size)
    return (x1, y1, x2 - x1, y2 - y1)


def box_to_original(box, orig_w, orig_h, size):
    """Inverse of box_to_model (for boxes inside the crop): model-frame (x, y, w, h) -> original pixels."""
    sx, sy, left, top = frame_params(orig_w, orig_h, size)
    x1, y1 = (box[0] + left) / sx, (box[1] + top) / sy
    return (x1, y1, box[2] / sx, box[3] / sy)


def crop_window(orig_w, orig_h, size):
    """(left, top, side) of the square of ORIGINAL pixels the centre crop keeps (to_original fills only it)."""
    m = min(orig_w, orig_h)
    sx, sy, left, top = frame_params(orig_w, orig_h, size)
    return min(round(left / sx), orig_w - m), min(round(top / sy), orig_h - m), m


def to_original(heatmap, orig_w, orig_h):
    """Model-frame heatmap (S, S) -> (orig_h, orig_w): nearest upsampling to the shortest side, NaN padding.

    The crop covered a min(W, H)-sided square of the original; the cropped-away borders get NaN, which the
    metrics ignore (docs/paper.md section 6 step 6).
    """
    if heatmap.dim() != 2 or heatmap.shape[0] != heatmap.shape[1]:
        raise ValueError(f"to_original expects a square (S, S) heatmap, got {tuple(heatmap.shape)}")
    S = heatmap.shape[0]
    ox, oy, m = crop_window(orig_w, orig_h, S)                # crop corner and side, original px
    sq = F.interpolate(heatmap[None, None].float(), size=(m, m), mode="nearest")[0, 0]
    out = torch.full((orig_h, orig_w), float("nan"))
    out[oy:oy + m, ox:ox + m] = sq
    return out


# ---------------------------------------------------------------------------------------------------
# Per-family preprocessing

def resize_crop(img, size):
    """(H, W) float array/tensor -> (size, size) tensor: shortest side to `size` (antialiased), centre crop."""
    x = torch.as_tensor(np.asarray(img, dtype=np.float32))
    h, w = x.shape
    sx, sy, left, top = frame_params(w, h, size)
    rw, rh = round(w * sx), round(h * sy)
    x = F.interpolate(x[None, None], size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    return x[top:top + size, left:left + size].clamp(0, 1)


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
