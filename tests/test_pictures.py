"""scripts/figure.py: which pairs the README figure shows, and that it refuses maps that do not give the run's numbers."""
import importlib.util
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def figure_script():
    spec = importlib.util.spec_from_file_location("figure_script", os.path.join(REPO, "scripts", "figure.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


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
    row = {"pair_id": "p1", "cnr": 1.0, "miou": 0.25}
    fig.check({"cnr": 1.001, "miou": 0.2501}, row, "eval_tuned.jsonl")     # batching noise passes
    with pytest.raises(ValueError, match="eval_tuned.jsonl pair p1: cnr 1.0000 recorded, 1.5000"):
        fig.check({"cnr": 1.5, "miou": 0.25}, row, "eval_tuned.jsonl")
    with pytest.raises(ValueError, match="miou"):
        fig.check({"cnr": 1.0, "miou": 0.30}, row, "eval_tuned.jsonl")
