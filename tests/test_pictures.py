"""The README's pictures: scripts/figure.py (which pairs it shows, and that it refuses maps that do not give the run's
numbers) and scripts/generation_sides.py (where a generated finding lies)."""
import importlib.util
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", name + ".py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def figure_script():
    return load_script("figure")


def test_rows_cover_every_class_and_both_sides_at_the_median_cnr():
    fig = figure_script()
    rows = [{"pair_id": f"p{c}{s}{k}", "category": c, "cnr": cnr, **({"side": s} if s else {})}
            for c, s, cnrs in (("B", "right", [0.3, 0.1, 0.2]), ("B", "left", [2.0, 1.0, 4.0, 3.0]),
                               ("A", None, [5.0, 1.0, 3.0]), ("B", None, [9.0]))
            for k, cnr in enumerate(cnrs)]
    chosen = fig.choose_rows(rows)
    # classes sorted, left before right; a class naming no side gives its median; B's side-less pair is not shown
    assert [(c, s, n) for c, s, n, _ in chosen] == [("A", None, 3), ("B", "left", 4), ("B", "right", 3)]
    # the (lower) median CNR of each group: 3.0 of A; 2.0 of B-left's 1, 2, 3, 4; 0.2 of B-right
    assert [r["cnr"] for *_, r in chosen] == [3.0, 2.0, 0.2]


def test_side_share_uses_the_swap_tests_convention():
    fig = figure_script()
    hm = torch.zeros(4, 4)
    hm[:, 3] = 3.0          # mass on the IMAGE's right = the patient's left
    hm[:, 0] = 1.0
    assert fig.side_share(hm, "left") == pytest.approx(0.75)
    assert fig.side_share(hm, "right") == pytest.approx(0.25)


def test_a_map_that_does_not_give_the_recorded_numbers_is_refused():
    fig = figure_script()
    row = {"pair_id": "p1", "cnr": 1.0, "miou_percent": 25.0}
    fig.check({"cnr": 1.001, "miou_percent": 25.01}, row, "eval_tuned.jsonl")     # batching noise passes
    with pytest.raises(ValueError, match="eval_tuned.jsonl pair p1: cnr 1.0000 recorded, 1.5000"):
        fig.check({"cnr": 1.5, "miou_percent": 25.0}, row, "eval_tuned.jsonl")
    with pytest.raises(ValueError, match="miou"):
        fig.check({"cnr": 1.0, "miou_percent": 30.0}, row, "eval_tuned.jsonl")


def test_a_generated_finding_is_found_on_its_side_and_only_when_drawn():
    gen = load_script("generation_sides")
    normal = torch.full((1, 64, 64), 0.4)
    image = normal.clone()
    image[0, 30:40, 44:52] = 0.9        # a bright finding on the IMAGE's right = the patient's left
    image += 0.02 * torch.randn_like(image)   # the rest of a same-seed sample differs a little everywhere
    left = gen.side_row(image, normal, "left", (0.0, 1.0))
    assert (left["drawn"], left["on_side"], left["drawn_on_side"]) == (1.0, 1.0, 1.0)
    assert left["peak"] == pytest.approx(0.5, abs=0.05)
    assert gen.side_row(image, normal, "right", (0.0, 1.0))["on_side"] == 0.0
    # a dark finding (a pneumothorax removes markings) counts as well; in [-1, 1] images the range is rescaled
    dark = normal.clone()
    dark[0, 10:30, 4:14] = 0.1
    assert gen.side_row(dark, normal, "right", (0.0, 1.0))["drawn_on_side"] == 1.0
    assert gen.side_row(dark * 2 - 1, normal * 2 - 1, "right", (-1.0, 1.0))["peak"] == pytest.approx(0.3, abs=0.01)
    # a faint change is not a drawn finding (whatever side its peak falls on)
    faint = normal.clone()
    faint[0, 30:40, 44:52] += 0.05
    row = gen.side_row(faint, normal, "left", (0.0, 1.0))
    assert row["drawn"] == 0.0 and row["drawn_on_side"] == 0.0 and row["on_side"] != row["on_side"]   # NaN


def test_outlines_moved_by_a_pixel_or_two_are_not_a_finding():
    gen = load_script("generation_sides")
    normal = torch.full((1, 64, 64), 0.3)
    normal[0, 40:, :] = 0.8                      # a bright diaphragm below a dark lung
    moved = torch.full((1, 64, 64), 0.3)
    moved[0, 38:, :] = 0.8                       # the same outline 2 px higher: a 0.5 step along a whole row
    assert gen.side_row(moved, normal, "left", (0.0, 1.0))["drawn"] == 0.0
    moved[0, 20:30, 10:20] = 0.8                 # and a finding in the image's left lung = the patient's right
    row = gen.side_row(moved, normal, "right", (0.0, 1.0))
    assert (row["drawn"], row["on_side"]) == (1.0, 1.0)
