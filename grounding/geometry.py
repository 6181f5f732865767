"""Image-frame geometry of the model's preprocessing (shortest side -> size, centre crop): boxes into the model
frame and heatmaps back to the original image.

Geometry: an original W x H image is resized to (rw, rh) = round(W s), round(H s) with s = size / min(W, H),
then the centre crop keeps [left, left + size) x [top, top + size), left = (rw - size) // 2.
docs/paper.md section 6 step 6: a heatmap in the model frame goes back to the original image by nearest
upsampling to the original shortest side and NaN padding of the cropped-away borders (`to_original`).
Reading the image files themselves is plumbing: grounding/data/images.py.
"""
import numpy as np
import torch
import torch.nn.functional as F


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
    """Inverse of box_to_model (for boxes inside the crop): model-frame (x, y, w, h) -> original pixels (ground.py
    reports a map's peak cell in the original image with it)."""
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


def resize_crop(img, size):
    """(H, W) float array/tensor -> (size, size) tensor: shortest side to `size` (antialiased), centre crop."""
    x = torch.as_tensor(np.asarray(img, dtype=np.float32))
    h, w = x.shape
    sx, sy, left, top = frame_params(w, h, size)
    rw, rh = round(w * sx), round(h * sy)
    x = F.interpolate(x[None, None], size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    return x[top:top + size, left:left + size].clamp(0, 1)
