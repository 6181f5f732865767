"""Per-family preprocessing, the original <-> model box transform and the heatmap inverse (NaN padding)."""
import numpy as np
import pytest
import torch
from PIL import Image

from grounding.data import images as pp
from grounding.geometry import box_to_model, box_to_original, frame_params, to_original


@pytest.mark.parametrize("W,H,size", [(2544, 3056, 512), (3056, 2544, 512), (256, 320, 64), (700, 700, 512),
                                      (1023, 1537, 64)])
def test_box_roundtrip_within_one_pixel(W, H, size):
    rng = np.random.default_rng(0)
    m = min(W, H)
    ox, oy = (W - m) / 2, (H - m) / 2
    worst = 0.0
    for _ in range(50):  # boxes inside the centre square (the part the crop keeps)
        x, y = ox + rng.uniform(0, m * 0.6), oy + rng.uniform(0, m * 0.6)
        box = (x, y, rng.uniform(5, m * 0.35), rng.uniform(5, m * 0.35))
        model = box_to_model(box, W, H, size)
        back = box_to_original(model, W, H, size)
        worst = max(worst, max(abs(a - b) for a, b in zip(box, back)))
        assert all(0 <= v <= size + 1e-6 for v in (model[0], model[1], model[0] + model[2], model[1] + model[3]))
    print(f"box round trip {W}x{H} -> {size}: max error {worst:.2e} px")
    assert worst <= 1.0


def test_box_outside_crop_is_clipped():
    # a 1000x500 image cropped to 512: x is scaled by 1.024 then 256 columns are cut on each side
    assert box_to_model((0, 0, 100, 100), 1000, 500, 512) == pytest.approx((0, 0, 0, 102.4))
    x, y, w, h = box_to_model((400, 100, 200, 100), 1000, 500, 512)
    assert (x, y, w, h) == pytest.approx((400 * 1.024 - 256, 102.4, 204.8, 102.4))


def test_to_original_nearest_and_nan_padding():
    hm = torch.arange(16.0).reshape(4, 4)
    out = to_original(hm, 12, 8)  # wide image: 8 x 8 centre square, 2 NaN columns each side
    assert out.shape == (8, 12)
    assert torch.isnan(out[:, :2]).all() and torch.isnan(out[:, 10:]).all()
    assert torch.equal(out[:, 2:10], hm.repeat_interleave(2, 0).repeat_interleave(2, 1))
    tall = to_original(hm, 8, 12)  # tall image: 8 x 8 centre square, 2 NaN rows above and below
    assert torch.isnan(tall[:2]).all() and torch.isnan(tall[10:]).all() and not torch.isnan(tall[2:10]).any()
    # a model-frame box and the heatmap land on the same original pixels
    W, H, S = 300, 200, 64
    hm = torch.zeros(S, S)
    hm[10:30, 20:40] = 1
    box = box_to_original((20, 10, 20, 20), W, H, S)
    ys, xs = torch.nonzero(to_original(hm, W, H) == 1, as_tuple=True)
    assert abs(xs.min().item() - box[0]) <= 1 and abs(ys.min().item() - box[1]) <= 1
    assert abs(xs.max().item() + 1 - (box[0] + box[2])) <= 1 and abs(ys.max().item() + 1 - (box[1] + box[3])) <= 1


def test_preprocess_families(tmp_path):
    arr = np.tile(np.linspace(0, 255, 300, dtype=np.float32), (200, 1)).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    mono = pp.preprocess(str(tmp_path / "x.png"), {"channels": 1, "size": 64, "range": [0, 1]})
    rgb = pp.preprocess(str(tmp_path / "x.png"), {"channels": 3, "size": 64, "range": [-1, 1]})
    assert mono.shape == (1, 64, 64) and rgb.shape == (3, 64, 64)
    assert 0 <= mono.min() and mono.max() <= 1 and rgb.min() < -0.3 and rgb.max() > 0.3
    assert torch.allclose(rgb[0], mono[0] * 2 - 1, atol=1e-6) and torch.equal(rgb[0], rgb[2])
    # centre crop of a horizontal ramp: the middle column sits at about half intensity
    assert mono[0, :, 32].mean().item() == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError, match="channels, size and range"):
        pp.preprocess(arr / 255.0, {"size": 64})


def test_load_image_formats_and_errors(tmp_path):
    a16 = (np.arange(64 * 32).reshape(32, 64) * 30).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "x16.png")
    x = pp.load_image(str(tmp_path / "x16.png"))
    assert x.shape == (32, 64) and x.min() == 0 and x.max() == pytest.approx(1.0)        # min-max, as DICOM
    Image.fromarray(a16 // 16).save(tmp_path / "x12.png")           # 12-bit data in a 16-bit PNG: same picture
    assert np.allclose(pp.load_image(str(tmp_path / "x12.png")), x, atol=1e-3)
    assert pp.image_size(str(tmp_path / "x16.png")) == (64, 32)
    with pytest.raises(FileNotFoundError, match="nothere.jpg"):
        pp.load_image(str(tmp_path / "nothere.jpg"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        pp.load_image(str(tmp_path / "broken.png"))
    (tmp_path / "x.dcm").write_bytes(b"\0" * 200)
    try:
        import pydicom  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pydicom"):
            pp.load_image(str(tmp_path / "x.dcm"))
