"""The location-swap test (grounding/experiment/swap.py), checked by hand, and the one-inversion-many-variants extraction
(grounding/heatmap.py extract_heatmaps_shared) checked against the per-model path."""
import math

import pytest
import torch

from conftest import cmp
from grounding.heatmap import HeatmapConfig, extract_heatmaps, extract_heatmaps_shared
from grounding.experiment.swap import (box_side, prompt_side, side_masses, swap_markdown, swap_pairs, swap_sides,
                                       swap_summary, true_side_hit)
from test_heatmap import tiny_pipe, tiny_heatmap_config


# ---- words ---------------------------------------------------------------------------------------------------


def test_prompt_side_by_hand():
    assert prompt_side("left lower atelectasis") == ("left", "one side")
    assert prompt_side("Right costophrenic pleural effusion") == ("right", "one side")
    assert prompt_side("right pneumothorax") == ("right", "one side")
    assert prompt_side("bilateral pleural effusion") == (None, "bilateral")
    assert prompt_side("bibasilar atelectasis") == (None, "bilateral")
    assert prompt_side("cardiomegaly") == (None, "no side word")
    assert prompt_side("pulmonary edema") == (None, "no side word")
    assert prompt_side("lingular consolidation") == (None, "no side word")     # lingula is left, but no word says so
    assert prompt_side("left lower and right upper pneumonia") == (None, "both sides named")
    assert prompt_side("leftover opacity") == (None, "no side word")           # whole words only


def test_swap_sides_by_hand():
    assert swap_sides("left lower atelectasis") == "right lower atelectasis"
    assert swap_sides("right pneumothorax") == "left pneumothorax"
    assert swap_sides("Left apical lung opacity") == "Right apical lung opacity"
    assert swap_sides("left lower and right upper pneumonia") == "right lower and left upper pneumonia"
    assert swap_sides("cardiomegaly") == "cardiomegaly"
    assert swap_sides("bright leftover") == "bright leftover"                   # not inside other words
    assert swap_sides(swap_sides("left base pleural effusion")) == "left base pleural effusion"


def test_swap_pairs_counts_every_exclusion():
    pairs = [{"prompt": p, "pair_id": i} for i, p in enumerate(
        ["left lower atelectasis", "right pneumothorax", "bibasilar atelectasis", "cardiomegaly",
         "left lower and right upper pneumonia", "bilateral edema"])]
    eligible, counts = swap_pairs(pairs)
    assert [p["pair_id"] for p in eligible] == [0, 1]
    assert [p["swapped_prompt"] for p in eligible] == ["right lower atelectasis", "left pneumothorax"]
    assert [p["side"] for p in eligible] == ["left", "right"]
    assert counts == {"one side": 2, "bilateral": 2, "no side word": 1, "both sides named": 1}
    assert sum(counts.values()) == len(pairs)


# ---- maps ----------------------------------------------------------------------------------------------------


def test_side_masses_and_radiological_convention():
    hm = torch.zeros(4, 6)
    hm[:, 4] = 1.0                                  # mass in column 4: the IMAGE's right half (centres 4.5 > 3)
    assert side_masses(hm) == (0.0, 4.0)
    # patient's left = image right, so a "left" finding here is hit, a "right" one missed
    assert true_side_hit(hm, "left") == 1.0
    assert true_side_hit(hm, "right") == 0.0
    assert true_side_hit(torch.ones(4, 6), "left") == 0.5            # equal masses: a coin flip
    # odd width: the centre column (centre 2.5 = 5 / 2) counts for neither side
    odd = torch.zeros(2, 5)
    odd[:, 2] = 9.0
    odd[0, 0], odd[0, 4] = 1.0, 3.0
    assert side_masses(odd) == (1.0, 3.0)
    # an explicit midline moves the split: at x = 5 column 4 (centre 4.5) is on the left
    assert side_masses(hm, midline=5) == (4.0, 0.0)


def test_nan_pixels_are_ignored():
    hm = torch.full((4, 6), float("nan"))
    hm[1:3, 0] = 0.2                                # image left: 0.4
    hm[1:3, 5] = 0.1                                # image right: 0.2
    left, right = side_masses(hm)
    assert math.isclose(left, 0.4, rel_tol=1e-6) and math.isclose(right, 0.2, rel_tol=1e-6)   # float32 maps
    assert true_side_hit(hm, "right") == 1.0 and true_side_hit(hm, "left") == 0.0
    with pytest.raises(ValueError, match="side must be"):
        true_side_hit(hm, "bilateral")


def test_box_side():
    assert box_side([(40, 10, 10, 10)], width=64) == "left"          # centre x = 45 > 32: image right = patient left
    assert box_side([(2, 10, 10, 10)], width=64) == "right"
    assert box_side([(27, 0, 10, 10)], width=64) is None             # centred on the midline


def test_swap_summary_by_hand():
    rows = [{"category": "A", "true_side": 1.0, "swap_side": 0.0, "miou_drop_percent": 20.0},
            {"category": "A", "true_side": 1.0, "swap_side": 1.0, "miou_drop_percent": 0.0},
            {"category": "B", "true_side": 0.0, "swap_side": 0.0, "miou_drop_percent": -10.0}]
    s = swap_summary(rows, n_boot=200)
    assert s["A"]["true_side"][0] == 1.0 and s["A"]["swap_side"][0] == 0.5
    assert math.isclose(s["Average"]["true_side"][0], 0.5)             # mean of the class means (1.0 and 0.0)
    assert math.isclose(s["Average"]["miou_drop_percent"][0], 0.0, abs_tol=1e-12)  # (10 + -10) / 2
    md = swap_markdown({"tuned": s})
    assert "side share swapped tuned" in md and "| A | 2 | 1.00" in md and "| Average | 3 |" in md
    assert "| A | 2 | 1.00 [1.00, 1.00] | 0.50 [0.00, 1.00] | 10.00 [" in md        # percentage points, as kept


# ---- one inversion, many variants == one extraction per variant ------------------------------------------------


def test_shared_extraction_equals_per_model_path():
    pipe = tiny_pipe()
    torch.manual_seed(3)
    images = torch.rand(2, 1, pipe.image_size, pipe.image_size)
    true = ["left lower atelectasis", "right pneumothorax"]
    swapped = [swap_sides(t) for t in true]
    base = tiny_heatmap_config(layers=(1, 2, 4))
    frozen = HeatmapConfig(num_steps=10, window=(400, 700), layers=(1, 2, 4), otsu=True)
    untuned = HeatmapConfig(num_steps=10, window=(400, 700), layers=(2, 3, 4), otsu=False)
    variants = [(true, None, [frozen, untuned]), (swapped, None, [base])]
    shared = extract_heatmaps_shared(pipe, images, variants)
    assert [len(v) for v in shared] == [2, 1]
    worst = 0.0
    for (texts, _, cfgs), maps in zip(variants, shared):
        for c, m in zip(cfgs, maps):
            ref = extract_heatmaps(pipe, images, texts, c)
            worst = max(worst, cmp(f"shared vs per-model {c.layers} otsu={c.otsu}", m, ref, atol=1e-5))
    assert worst <= 1e-5
    # the swapped prompt gives a different map (the variants are not mixed up)
    assert (shared[0][0] - extract_heatmaps(pipe, images, swapped, frozen)).abs().max() > 1e-4


def test_shared_extraction_with_prompts_of_different_lengths():
    # the shared store pads every prompt to the longest of ALL variants; a variant of short prompts must still read
    # only its own tokens (grounded classification mixes "pneumothorax" with "No acute cardiopulmonary process")
    pipe = tiny_pipe()
    torch.manual_seed(4)
    images = torch.rand(2, 1, pipe.image_size, pipe.image_size)
    cfg = tiny_heatmap_config(layers=(1, 2, 4))
    long, short = ["no acute cardiopulmonary process"] * 2, ["pneumothorax", "left pneumothorax"]
    shared = extract_heatmaps_shared(pipe, images, [(long, None, [cfg]), (short, None, [cfg])])
    for texts, (m,) in zip((long, short), shared):
        assert cmp(f"shared vs alone: {texts[0]!r}", m, extract_heatmaps(pipe, images, texts, cfg), atol=1e-5) <= 1e-5
