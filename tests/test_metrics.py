"""Grounding metrics on hand-made maps and boxes; every expected value is worked out by hand below."""
import math

import pytest
import torch

from grounding.metrics import (auc_roc, bootstrap_ci, box_mask, cnr, miou, pointing_game, summarise,
                               summary_markdown)


def _cnr_map():
    # box (0,0,2,2) = the top-left 2x2: inside {1, .5, 1, .5} -> mean .75, population var .0625
    # outside 12 px: six 0 and six .5 -> mean .25, var .0625;  CNR = .5 / sqrt(.125) = sqrt(2)
    hm = torch.tensor([[1.0, 0.5, 0.0, 0.5],
                       [1.0, 0.5, 0.5, 0.0],
                       [0.0, 0.5, 0.0, 0.5],
                       [0.5, 0.0, 0.5, 0.0]])
    return hm, [(0, 0, 2, 2)]


def test_cnr_sign_and_scale():
    hm, boxes = _cnr_map()
    assert cnr(hm, boxes) == pytest.approx(math.sqrt(2), abs=1e-9)
    # the inverted map is brighter outside: signed CNR is negative, absolute CNR is not
    assert cnr(1 - hm, boxes, signed=True) == pytest.approx(-math.sqrt(2), abs=1e-9)
    assert cnr(1 - hm, boxes, signed=False) == pytest.approx(math.sqrt(2), abs=1e-9)
    # CNR is invariant to a positive affine change of the map
    assert cnr(0.3 * hm + 0.1, boxes) == pytest.approx(math.sqrt(2), abs=1e-6)


def test_cnr_several_boxes_is_mean_over_boxes():
    # two one-pixel boxes at opposite corners, map = 1 there, 0 elsewhere.
    # per box: inside {1}, var 0; outside 15 px with one 1: mean 1/15, var 14/225 -> CNR = sqrt(14)
    hm = torch.zeros(4, 4)
    hm[0, 0] = hm[3, 3] = 1.0
    boxes = [(0, 0, 1, 1), (3, 3, 1, 1)]
    assert cnr(hm, boxes) == pytest.approx(math.sqrt(14), abs=1e-9)
    # "union" background: 14 zeros, var 0 and inside var 0 -> undefined
    assert math.isnan(cnr(hm, boxes, outside="union"))
    # one good and one missed box average: box at (1,1) has inside {0}: mean 0 vs outside mean 2/15
    hm2 = hm.clone()
    hm2[3, 3] = 0
    hm2[2, 2] = 1  # still two bright pixels, one inside box A, none in box B
    v_a = (1 - 1 / 15) / math.sqrt(14 / 225)            # box A: as above
    v_b = (0 - 2 / 15) / math.sqrt((2 / 15) * (13 / 15))  # box B: outside 15 px, two 1s
    assert cnr(hm2, boxes) == pytest.approx((v_a + v_b) / 2, abs=1e-9)


def test_miou_each_threshold():
    # box = top-left 2x2 (4 px) at .45; two more pixels at .25; the rest .05
    hm = torch.full((4, 4), 0.05)
    hm[:2, :2] = 0.45
    hm[3, 3] = hm[3, 2] = 0.25
    boxes = [(0, 0, 2, 2)]
    # thr .1, .2: pred 6 px, inter 4 -> 2/3; thr .3, .4: pred = box -> 1; thr .5: empty -> 0
    expected = {0.1: 2 / 3, 0.2: 2 / 3, 0.3: 1.0, 0.4: 1.0, 0.5: 0.0}
    for thr, v in expected.items():
        assert miou(hm, boxes, thresholds=(thr,)) == pytest.approx(v)
    assert miou(hm, boxes) == pytest.approx(2 / 3)


def test_miou_union_of_boxes_and_strict_threshold():
    hm = torch.zeros(4, 4)
    hm[0, 0] = hm[3, 3] = 1.0
    assert miou(hm, [(0, 0, 1, 1), (3, 3, 1, 1)]) == pytest.approx(1.0)
    # against one of the two boxes only: pred 2 px, gt 1 px -> 1/2 at every threshold
    assert miou(hm, [(0, 0, 1, 1)]) == pytest.approx(0.5)
    # a pixel exactly at the threshold is background
    assert miou(torch.full((2, 2), 0.5), [(0, 0, 1, 1)], thresholds=(0.5,)) == 0.0


def test_nan_padding_is_ignored():
    hm, boxes = _cnr_map()
    padded = torch.full((4, 7), float("nan"))
    padded[:, 2:6] = hm                       # NaN columns both sides, box shifted by 2
    shifted = [(2, 0, 2, 2)]
    assert cnr(padded, shifted) == pytest.approx(cnr(hm, boxes), abs=1e-9)
    assert miou(padded, shifted) == pytest.approx(miou(hm, boxes))
    assert auc_roc(padded, shifted) == pytest.approx(auc_roc(hm, boxes))
    assert pointing_game(padded, shifted) == pointing_game(hm, boxes)


def test_auc_ties_count_half():
    hm = torch.tensor([[1.0, 0.5], [0.5, 0.0]])
    assert auc_roc(hm, [(0, 0, 1, 1)]) == pytest.approx(1.0)
    # positive = (row 1, col 0) = .5; negatives 1, .5, 0 -> (0 + .5 + 1) / 3
    assert auc_roc(hm, [(0, 1, 1, 1)]) == pytest.approx(0.5)
    # a constant map is chance
    assert auc_roc(torch.ones(3, 3), [(0, 0, 1, 1)]) == pytest.approx(0.5)


def test_pointing_game():
    hm = torch.zeros(4, 4)
    hm[1, 1] = 1
    assert pointing_game(hm, [(0, 0, 2, 2)]) == 1.0
    assert pointing_game(hm, [(2, 2, 2, 2)]) == 0.0
    # constant map: the tie gives the box's area fraction, not a free hit
    assert pointing_game(torch.ones(4, 4), [(0, 0, 2, 2)]) == pytest.approx(0.25)


def test_bad_boxes_are_clear_errors():
    with pytest.raises(ValueError, match="outside"):
        box_mask((10, 10, 2, 2), (4, 4))
    with pytest.raises(ValueError, match="positive"):
        box_mask((0, 0, 0, 2), (4, 4))
    with pytest.raises(ValueError, match="no boxes"):
        miou(torch.zeros(4, 4), [])
    # float boxes round their edges: columns round(.6)=1 .. round(2.4)=2, rows 0 .. round(1.6)=2
    assert box_mask((0.6, 0.4, 1.8, 1.2), (4, 4)).nonzero().tolist() == [[0, 1], [1, 1]]
    # partly outside boxes are clipped
    assert box_mask((3, 3, 5, 5), (4, 4)).sum() == 1


def test_bootstrap_ci_contains_mean_and_is_reproducible():
    vals = torch.linspace(0, 1, 50).tolist()
    m, lo, hi = bootstrap_ci(vals, n=2000, seed=0)
    assert m == pytest.approx(0.5)
    assert lo < m < hi
    # the CI of a mean of 50 uniform values: half width about 1.96 * 0.29 / sqrt(50) = 0.08
    assert 0.05 < hi - m < 0.12 and 0.05 < m - lo < 0.12
    assert bootstrap_ci(vals, n=2000, seed=0) == (m, lo, hi)
    assert bootstrap_ci(vals, n=2000, seed=1) != (m, lo, hi)
    assert bootstrap_ci([0.3, 0.3, float("nan")], n=100) == pytest.approx((0.3, 0.3, 0.3))


def test_summarise_average_is_mean_of_class_means():
    rows = [{"category": "A", "cnr": 1.0}] * 3 + [{"category": "B", "cnr": 0.0}]
    s = summarise(rows, ["cnr"], n=500)
    assert s["A"]["n"] == 3 and s["A"]["cnr"][0] == 1.0
    assert s["Average"]["cnr"][0] == pytest.approx(0.5)      # pooled would be 0.75
    assert s["Average"]["cnr"][1] <= 0.5 <= s["Average"]["cnr"][2]
    table = summary_markdown(s, ["cnr"])
    assert "| Average | 4 | 0.50 [0.50, 0.50] |" in table
