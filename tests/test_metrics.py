"""Grounding metrics on hand-made maps and boxes; every expected value is worked out by hand below."""
import math

import pytest
import torch

from conftest import need
from grounding.metrics import FLOAT32_MAX, auc_binned5, auc_roc, box_mask, cnr, miou, pointing_game, union_mask
from grounding.experiment.tables import bootstrap_ci, summarise, summary_markdown


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
    assert cnr(hm, boxes, protocol="per_box") == pytest.approx(math.sqrt(14), abs=1e-9)
    # "union" background: 14 zeros, var 0 and inside var 0 -> undefined
    assert math.isnan(cnr(hm, boxes, protocol="union"))
    # reference: box 1 as per_box (sqrt(14)); then box 1 is NaN, so box 2's background is 14 zeros: 1 / 0,
    # which the reference's nan_to_num turns into the float32 maximum (averaged in)
    assert cnr(hm, boxes) == pytest.approx((math.sqrt(14) + FLOAT32_MAX) / 2, rel=1e-12)
    # one good and one missed box average: box at (1,1) has inside {0}: mean 0 vs outside mean 2/15
    hm2 = hm.clone()
    hm2[3, 3] = 0
    hm2[2, 2] = 1  # still two bright pixels, one inside box A, none in box B
    v_a = (1 - 1 / 15) / math.sqrt(14 / 225)            # box A: as above
    v_b = (0 - 2 / 15) / math.sqrt((2 / 15) * (13 / 15))  # box B: outside 15 px, two 1s
    assert cnr(hm2, boxes, protocol="per_box") == pytest.approx((v_a + v_b) / 2, abs=1e-9)
    # reference: box B's background loses box A's pixel: 14 px with one 1 -> mean 1/14, var 13/196
    v_b_ref = (0 - 1 / 14) / math.sqrt(13 / 196)
    assert cnr(hm2, boxes) == pytest.approx((v_a + v_b_ref) / 2, abs=1e-9)


# ---- the reference protocol (the predecessor's evaluation code), hand-worked -----------------------------------

def _row_map():
    # one row of 8 pixels; box A = columns 0-2, box B = columns 2-4 (they share column 2)
    return torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]]), (0, 0, 3, 1), (2, 0, 3, 1)


def test_cnr_reference_running_nan_order_matters():
    hm, A, B = _row_map()
    # A then B. A: in {1,1,0} mean 2/3 var 2/9; out = cols 3-7 {1,0,1,0,0} mean 2/5 var 6/25
    #   -> (4/15) / sqrt(104/225) = 2/sqrt(26). Cols 0-2 become NaN.
    # B: in = cols 3,4 (col 2 is NaN now) {1,0} mean 1/2 var 1/4; out = cols 5-7 {1,0,0} mean 1/3 var 2/9
    #   -> (1/6) / sqrt(17/36) = 1/sqrt(17)
    a_then_b = (2 / math.sqrt(26) + 1 / math.sqrt(17)) / 2
    # B then A. B: in {0,1,0} mean 1/3 var 2/9; out = cols 0,1,5,6,7 {1,1,1,0,0} mean 3/5 var 6/25 -> -2/sqrt(26)
    # A: in = cols 0,1 {1,1} mean 1 var 0; out = cols 5-7 mean 1/3 var 2/9 -> (2/3) / (sqrt(2)/3) = sqrt(2)
    b_then_a = (-2 / math.sqrt(26) + math.sqrt(2)) / 2
    assert cnr(hm, [A, B]) == pytest.approx(a_then_b, abs=1e-12)
    assert cnr(hm, [B, A]) == pytest.approx(b_then_a, abs=1e-12)
    assert cnr(hm, [B, A], signed=False) == pytest.approx((2 / math.sqrt(26) + math.sqrt(2)) / 2, abs=1e-12)
    # the named options do not depend on the order. per_box: A = 2/sqrt(26), B = -2/sqrt(26) -> 0.
    # union: out = cols 5-7 (mean 1/3, var 2/9); A: (1/3) / sqrt(4/9) = 1/2; B: 0 -> 1/4
    for boxes in ([A, B], [B, A]):
        assert cnr(hm, boxes, protocol="per_box") == pytest.approx(0.0, abs=1e-12)
        assert cnr(hm, boxes, protocol="union") == pytest.approx(0.25, abs=1e-12)


def test_cnr_reference_degenerate_cases_count_zero():
    hm, boxes = _cnr_map()                                  # one box, CNR sqrt(2)
    # a constant map: 0 / 0 -> 0 (reference) or undefined (named options)
    const = torch.full((4, 4), 0.5)
    assert cnr(const, boxes) == 0.0
    assert math.isnan(cnr(const, boxes, protocol="per_box"))
    # a box already covered by an earlier box has no pixel left: 0, averaged in
    assert cnr(hm, boxes + [(0, 0, 1, 1)]) == pytest.approx(math.sqrt(2) / 2, abs=1e-12)
    # ... while the other order scores both. (0,0,1,1): in {1}; out 15 px = one 1, eight .5, six 0: mean 1/3,
    # var 1/5 - 1/9 = 4/45 -> (2/3) / sqrt(4/45) = sqrt(5). Then (0,0,2,2): in {.5, 1, .5} mean 2/3 var 1/18;
    # out 12 px (six 0, six .5) mean 1/4 var 1/16 -> (5/12) / (sqrt(17)/12) = 5/sqrt(17)
    assert cnr(hm, [(0, 0, 1, 1)] + boxes) == pytest.approx((math.sqrt(5) + 5 / math.sqrt(17)) / 2, abs=1e-12)
    # an empty (zero-sized) box: 0, averaged in (the named options reject it)
    assert cnr(hm, boxes + [(1, 1, 0, 0)]) == pytest.approx(math.sqrt(2) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="positive"):
        cnr(hm, boxes + [(1, 1, 0, 0)], protocol="per_box")
    # an all-NaN map: nothing anywhere -> 0
    assert cnr(torch.full((4, 4), float("nan")), boxes) == 0.0


def test_box_in_nan_band_never_stops_scoring():
    hm, boxes = _cnr_map()
    padded = torch.full((6, 4), float("nan"))
    padded[:4] = hm                                         # rows 4-5: the cropped-away band
    band = (0, 4, 4, 2)
    # reference: the band box has no valid pixel -> 0, averaged in, whatever the order
    assert cnr(padded, boxes + [band]) == pytest.approx(math.sqrt(2) / 2, abs=1e-12)
    assert cnr(padded, [band] + boxes) == pytest.approx(math.sqrt(2) / 2, abs=1e-12)
    # named options: the band box cannot be scored and is left out; alone, the pair is NaN
    assert cnr(padded, boxes + [band], protocol="per_box") == pytest.approx(math.sqrt(2), abs=1e-12)
    assert math.isnan(cnr(padded, [band], protocol="union"))
    assert math.isnan(miou(padded, [band], protocol="per_box"))
    # reference mIoU: 8 target pixels, nothing predicted -> 0 at every threshold
    assert miou(padded, [band]) == 0.0
    assert math.isnan(auc_roc(padded, [band]))              # no positive pixel with a score
    assert auc_binned5(padded, [band]) == 0.5              # torcheval: an empty class gives 0.5


def test_miou_reference_counts_band_pixels_as_misses():
    # 4 x 2 map: rows 0 and 3 are the NaN band; row 1 = .9 (predicted at every threshold), row 2 = 0
    hm = torch.tensor([[float("nan")] * 2, [0.9, 0.9], [0.0, 0.0], [float("nan")] * 2])
    box = (0, 0, 2, 2)                                      # rows 0-1: half of it in the band
    # reference: target 4 px (2 in the band), predicted 2 px inside it -> 2 / 4
    assert miou(hm, [box]) == pytest.approx(0.5)
    # named options: target = the 2 valid px -> 2 / 2
    assert miou(hm, [box], protocol="per_box") == pytest.approx(1.0)
    assert miou(hm, [box], protocol="union") == pytest.approx(1.0)
    # a second box wholly in the band adds 2 missed target px: 2 / 6 (named options: unchanged)
    assert miou(hm, [box, (0, 3, 2, 1)]) == pytest.approx(1 / 3)
    assert miou(hm, [box, (0, 3, 2, 1)], protocol="per_box") == pytest.approx(1.0)
    # an empty box adds nothing; a pair whose only box is empty: 0 / 0 -> 0
    assert miou(hm, [box, (1, 1, 0, 0)]) == pytest.approx(0.5)
    assert miou(torch.zeros(2, 2), [(1, 1, 0, 0)]) == 0.0


def test_auc_binned5_hand_worked_and_exact_auc_differs():
    # scores .1 .5 .7 .8, positives at .1 .7 .8 (torcheval's docstring example)
    hm = torch.tensor([[0.1, 0.5, 0.7, 0.8]])
    boxes = [(0, 0, 1, 1), (2, 0, 2, 1)]
    # levels 1, .75, .5, .25, 0 -> (FP, TP) = (0,0) (0,1) (1,2) (1,2) (1,3) after (0,0): area 1.5 / (1 x 3) = .5
    assert auc_binned5(hm, boxes) == pytest.approx(0.5)
    # exact: the negative .5 is below .7 and .8, above .1 -> 2/3
    assert auc_roc(hm, boxes) == pytest.approx(2 / 3)
    # NaN pixels drop out of the binned AUC, also inside a box (normalised by the counts at level 0)
    padded = torch.cat([hm, torch.full((1, 4), float("nan"))])
    assert auc_binned5(padded, [(0, 0, 1, 2), (2, 0, 2, 2)]) == pytest.approx(0.5)
    # a perfect map at the top level: (0,0) -> (0, n_pos) -> (n_neg, n_pos): 1
    assert auc_binned5(torch.tensor([[1.0, 0.0, 0.0]]), [(0, 0, 1, 1)]) == pytest.approx(1.0)


def test_auc_binned5_matches_torcheval():
    F = need("torcheval.metrics.functional")
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        hm = torch.rand(37, 29, generator=g)
        hm[:, :3] = float("nan")                            # a NaN band, partly under a box
        hm[hm > 0.97] = 1.0                                 # scores exactly on a level
        hm[hm < 0.03] = 0.0
        boxes = [(1, 2 + trial, 9, 11), (15, 20, 10, 12)]
        target = union_mask(boxes, hm.shape)
        ref = F.binary_binned_auroc(hm.flatten(), target.long().flatten(), threshold=5)[0].item()
        assert auc_binned5(hm, boxes) == pytest.approx(ref, abs=1e-6)


def test_protocol_is_checked():
    hm, boxes = _cnr_map()
    with pytest.raises(ValueError, match="metric_protocol"):
        cnr(hm, boxes, protocol="perbox")
    with pytest.raises(ValueError, match="metric_protocol"):
        miou(hm, boxes, protocol="Reference")


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


def test_summarise_counts_nan_values_and_survives_a_class_without_any():
    nan = float("nan")
    rows = [{"category": "A", "cnr": 1.0}, {"category": "A", "cnr": nan},     # one of A's two is NaN
            {"category": "B", "cnr": nan}, {"category": "C", "cnr": 0.0}]      # B has no finite CNR at all
    s = summarise(rows, ["cnr"], n=200)
    assert s["A"]["cnr"][0] == 1.0 and s["A"]["dropped"]["cnr"] == 1
    assert all(math.isnan(x) for x in s["B"]["cnr"])
    assert s["Average"]["cnr"][0] == pytest.approx(0.5) and s["Average"]["dropped"]["cnr"] == 2   # A and C only
    table = summary_markdown(s, ["cnr"])
    assert "| A | 2 | 1.00 [1.00, 1.00] (1 of 2) |" in table and "| B | 1 | nan |" in table
    assert all(math.isnan(x) for x in bootstrap_ci([nan, nan]))
