"""Anatomy vocabulary, the location -> Gaussian LUT (build, and save / load: grounding/data/lut.py), rendering, jitter,
the nearest-Gaussian match of a VinDr box (grounding/data/vindr.py)."""
import json

import pytest
import torch

from grounding import anatomy as an
from grounding.data.lut import load_lut, save_lut
from grounding.data.vindr import nearest_location


def test_27_locations_and_names():
    assert len(set(an.LOCATIONS)) == 27
    assert "bibasilar" in an.LOCATIONS and "bilateral base" not in an.LOCATIONS
    for loc in ("left", "right apical", "bilateral costophrenic", "left pleural", "lingular", "cardiomegaly", "pulmonary"):
        assert loc in an.LOCATIONS
    assert len(an.PATHOLOGIES) == 8


def test_region_mapping_follows_the_paper():
    assert an.regions_for("left base") == ["left lower lung zone"]
    assert an.regions_for("right pleural") == ["right lower lung zone"]
    assert an.regions_for("lingular") == ["left mid lung zone"]
    assert an.regions_for("bibasilar") == ["right lower lung zone", "left lower lung zone"]
    assert an.regions_for("bilateral apical") == ["right apical zone", "left apical zone"]
    assert an.regions_for("pulmonary") == ["right lung", "left lung"]
    assert an.regions_for("cardiomegaly") == ["cardiac silhouette"]
    assert an.regions_for("right") == ["right lung"]
    assert an.regions_for("left costophrenic") == ["left costophrenic angle"]
    with pytest.raises(ValueError, match="unknown location"):
        an.regions_for("left elbow")


def _graph(W, H, shift=0.0):
    """All 13 regions; box k spans x in [10k + shift, 10k + 60 + shift], y in [5k, 5k + 120]."""
    boxes = {r: (10 * k + shift, 5 * k, 10 * k + 60 + shift, 5 * k + 120) for k, r in enumerate(an.REGIONS)}
    return dict(dicom_id="d", boxes=boxes, image_width=W, image_height=H)


def test_build_lut_hand_computed():
    # a 512x512 image: the crop frame is the identity, so mu = centre and sigma = side / 6 exactly
    lut, counts = an.build_lut([_graph(512, 512)])
    k = an.REGIONS.index("left lower lung zone")
    assert lut["left lower"] == [[10 * k + 30, 5 * k + 60, 10.0, 20.0]]
    assert lut["left base"] == lut["left pleural"] == lut["left lower"]
    assert len(lut["bibasilar"]) == 2 and len(lut["pulmonary"]) == 2
    assert counts["cardiac silhouette"] == 1
    # averaging over two images: the x shifts of 0 and 20 average to 10
    lut2, _ = an.build_lut([_graph(512, 512), _graph(512, 512, shift=20)])
    assert lut2["left lower"][0][0] == pytest.approx(10 * k + 40)
    # a 1024x2048 image: crop mode scales by 0.5 and shifts up by (1024 - 512) / 2 = 256 rows (no clipping:
    # the organ keeps its own centre); stretch scales y by 0.25
    crop, _ = an.build_lut([_graph(1024, 2048)])
    stretch, _ = an.build_lut([_graph(1024, 2048)], mode="stretch")
    assert crop["left lower"][0] == pytest.approx([(10 * k + 30) / 2, (5 * k + 60) / 2 - 256, 5.0, 10.0])
    assert stretch["left lower"][0] == pytest.approx([(10 * k + 30) / 2, (5 * k + 60) / 4, 5.0, 5.0])


def test_build_lut_missing_region_is_an_error():
    g = _graph(512, 512)
    del g["boxes"]["cardiac silhouette"]
    with pytest.raises(ValueError, match="cardiac silhouette"):
        an.build_lut([g])


def test_save_load_roundtrip_and_bad_file(tmp_path):
    lut, _ = an.build_lut([_graph(600, 500)])
    save_lut(lut, tmp_path / "lut.json")
    back = load_lut(tmp_path / "lut.json")
    assert set(back) == set(lut) and all(g == pytest.approx(h) for k in lut for g, h in zip(back[k], lut[k]))
    bad = dict(lut, left=[[1, 2, 0, 3]])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'left'"):
        load_lut(tmp_path / "bad.json")
    (tmp_path / "short.json").write_text(json.dumps({"left": [[1, 2, 3, 4]]}))
    with pytest.raises(ValueError, match="lacks locations"):
        load_lut(tmp_path / "short.json")
    (tmp_path / "frame.json").write_text(json.dumps({"frame": 224, "lut": lut}))  # e.g. ImaGenome's 224 frame
    with pytest.raises(ValueError, match="224-px frame"):
        load_lut(tmp_path / "frame.json")


def test_render_gaussians_peak_merge_and_frame():
    g = [(128.0, 384.0, 40.0, 20.0)]
    m = an.render_gaussians(g, 16)
    assert m.shape == (16, 16) and m.max().item() == pytest.approx(1.0)
    iy, ix = divmod(int(m.argmax()), 16)
    assert (ix, iy) in ((3, 11), (4, 12), (3, 12), (4, 11))  # 128 / 32 = 4, 384 / 32 = 12: the pixel centre near mu
    assert m[0, 15].item() < 1e-5
    two = [(128.0, 256.0, 30.0, 30.0), (384.0, 256.0, 30.0, 30.0)]
    mx, sm = an.render_gaussians(two, 32), an.render_gaussians(two, 32, merge="sum")
    assert mx.max().item() == pytest.approx(1.0) and sm.max().item() == pytest.approx(1.0)
    assert torch.allclose(mx[:, :16], mx[:, 16:].flip(1), atol=1e-6)  # two equal blobs, symmetric
    assert (sm[:, 16] > mx[:, 16]).all()  # between the blobs the sum is higher than the max
    with pytest.raises(ValueError):
        an.render_gaussians(two, 8, merge="mean")


def test_render_gaussians_is_the_area_resize_of_a_full_frame_rendering():
    """A cell holds the Gaussian's mass over its footprint: the same as rendering finely (8 samples per pixel of the
    512 frame) and average-pooling to the map, for wide and narrow Gaussians alike. Sampling at cell centres instead
    lost a jittered sigma of 1-2 px between two centres (an all-zero target: 30 of the quickstart's 400 steps)."""
    fine = (torch.arange(4096, dtype=torch.float64) + 0.5) / 8                # sample points of the 512 frame
    for g in [(128.0, 384.0, 40.0, 20.0), (160.0, 170.0, 1.0, 1.5), (300.5, 95.0, 3.0, 60.0), (500.0, 9.0, 2.0, 2.0)]:
        mx, my, sx, sy = g
        img = torch.exp(-0.5 * ((fine[:, None] - my) / sy) ** 2) * torch.exp(-0.5 * ((fine[None, :] - mx) / sx) ** 2)
        pooled = torch.nn.functional.avg_pool2d(img[None, None], 256)[0, 0]   # 4096 / 16: one map cell each
        ref = (pooled / pooled.max()).float()
        m = an.render_gaussians([g], 16)
        assert m.max().item() == pytest.approx(1.0) and torch.allclose(m, ref, atol=2e-3), (g, (m - ref).abs().max())
    # the narrow one sits on a cell corner (160 = 5 x 32): its four cells share the mass, nothing vanishes
    narrow = an.render_gaussians([(160.0, 160.0, 1.0, 1.0)], 16)
    assert narrow.flatten().topk(4).values.tolist() == pytest.approx([1.0] * 4) and narrow.sum() < 4.01
    # a jittered mu just outside the frame (x 530, y -12; sigma 2 px): its mass inside is ~1e-9 of the whole, kept by
    # taking the tails on the tail side, so the nearest cell still gets the peak instead of 0 / 0
    out = an.render_gaussians([(530.0, -12.0, 2.0, 2.0)], 16)
    assert out[0, 15].item() == 1.0 and torch.isfinite(out).all() and out.sum() < 1.01


def test_jitter_bounds_and_determinism():
    g = [(256.0, 256.0, 40.0, 40.0)] * 200
    j1 = an.jitter(g, generator=torch.Generator().manual_seed(1))
    j2 = an.jitter(g, generator=torch.Generator().manual_seed(1))
    assert j1 == j2
    d = torch.tensor(j1) - torch.tensor(g)
    assert d.abs().max().item() <= 0.05 * 512 + 1e-4 and d.abs().max().item() > 20  # +-25.6 px, and it is used
    assert min(x[2] for x in an.jitter([(0, 0, 1.0, 1.0)] * 50)) >= 1.0  # sigma stays positive


def test_nearest_location_squared_w2():
    lut, _ = an.build_lut([_graph(512, 512)])
    for loc in ("right apical", "left costophrenic", "left middle"):
        g = lut[loc][0]
        assert nearest_location((g[0] + 3, g[1] - 2, g[2] + 1, g[3]), lut) == loc
    # "left lower", "left base" and "left pleural" share one Gaussian: the canonical zone name wins
    assert nearest_location(tuple(lut["left base"][0]), lut) == "left lower"
    assert nearest_location(tuple(lut["cardiomegaly"][0]), lut, candidates=["cardiomegaly", "left"]) == "cardiomegaly"
