"""Grounded classification (paper App. K): the heatmap-weighted error by hand on a tiny model, uniform weights =
the unweighted diffusion classifier, and AUROC / bootstrap / halves / one-sided tests on hand-worked cases."""
import itertools

import numpy as np
import pytest
import torch
from test_heatmap import tiny_pipe

from grounding.auroc import auroc, bin_aurocs, bootstrap_auroc, high_minus_low_test, miou_halves
from grounding.experiment.classify import case_generator, draw, error_maps, latent_weights, scores, weighted_error


# ---- weighted error ----------------------------------------------------------------------------------------


def test_weighted_error_by_hand():
    err = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert weighted_error(err, torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(2.5)
    assert weighted_error(err, torch.tensor([[0.0, 0.0], [0.5, 0.0]])).item() == pytest.approx(3.0)
    assert weighted_error(err).item() == pytest.approx(2.5)                     # uniform = plain mean
    assert torch.isnan(weighted_error(err, torch.zeros(2, 2)))                  # constant heatmap: undefined
    # score = err_normal - err_class: (1+2+3+4)/4 - 4 with the class map on the last pixel only
    assert scores(err, err, None, torch.tensor([[0.0, 0.0], [0.0, 2.0]])).item() == pytest.approx(-1.5)


def test_latent_weights_area_average():
    hm = torch.zeros(1, 4, 4)
    hm[0, :2, :2] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = latent_weights(hm, (2, 2))
    assert torch.allclose(w, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]))


def test_error_map_equals_hand_computation_on_tiny_model():
    """error_maps against the formula written out: z_t, v -> eps, squared error summed over channels, mean over
    the draws; then the weighted mean with a one-pixel map picks that pixel's error."""
    pipe = tiny_pipe()
    torch.manual_seed(3)
    image = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        z0 = pipe.vae.encode(image) * pipe.scale_factor                       # (1, 3, 16, 16)
        ctx = pipe.text_encoder(pipe.tokenizer(["right pneumothorax"]))
    t, eps = draw(case_generator(0, "case"), 3, 1000, z0.shape[1:])
    got = error_maps(pipe, z0, [ctx], t[None], eps[None], unet_batch=2)[0, 0]   # chunked UNet calls
    abar = pipe.scheduler.alphas_cumprod
    by_hand = torch.zeros(16, 16)
    for k in range(3):
        a = abar[t[k]]
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps[k][None]
        with torch.no_grad():
            v = pipe.unet(z_t, int(t[k]), ctx)
        eps_hat = a.sqrt() * v + (1 - a).sqrt() * z_t                             # v-prediction -> eps
        by_hand += ((eps[k][None] - eps_hat) ** 2).sum(1)[0] / 3
    assert torch.allclose(got, by_hand, atol=1e-5, rtol=1e-5)
    one = torch.zeros(16, 16)
    one[5, 7] = 1.0
    assert weighted_error(got, one).item() == pytest.approx(by_hand[5, 7].item(), rel=1e-5)
    l2 = error_maps(pipe, z0, [ctx], t[None], eps[None], norm="l2")[0, 0]
    assert (l2 > 0).all() and not torch.allclose(l2, got)


def test_uniform_heatmaps_give_the_unweighted_classifier():
    pipe = tiny_pipe()
    torch.manual_seed(4)
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        z0 = pipe.vae.encode(image) * pipe.scale_factor
        ctxs = [pipe.text_encoder(pipe.tokenizer([p] * 2)) for p in ("left lower atelectasis", "right pneumothorax")]
    t, eps = zip(*(draw(case_generator(0, i), 4, 1000, z0.shape[1:]) for i in range(2)))
    err_n, err_c = error_maps(pipe, z0, ctxs, torch.stack(t), torch.stack(eps))
    flat = latent_weights(torch.full((2, 32, 32), 0.7), (16, 16))              # any constant heatmap
    weighted = scores(err_n, err_c, flat, flat)
    unweighted = err_n.mean((-2, -1)) - err_c.mean((-2, -1))
    assert torch.allclose(weighted, unweighted, atol=1e-6)
    assert not torch.allclose(err_n, err_c)                                    # the prompts do differ


def test_draws_are_stratified_seeded_and_shared():
    t, eps = draw(case_generator(0, "a"), 8, 1000, (3, 4, 4))
    assert [int(x) // 125 for x in t] == list(range(8))                        # one timestep per stratum
    t2, eps2 = draw(case_generator(0, "a"), 8, 1000, (3, 4, 4))
    assert torch.equal(t, t2) and torch.equal(eps, eps2)
    t3, _ = draw(case_generator(0, "b"), 8, 1000, (3, 4, 4))
    assert not torch.equal(t, t3)


# ---- AUROC, bootstrap, halves, one-sided test ---------------------------------------------------------------


def test_auroc_hand_worked():
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    # pairs: (2>1) (2<3) (2=2) (4>1) (4>3) (4>2) -> (1 + 0 + 0.5 + 3) / 6
    assert auroc([2, 4], [1, 3, 2]) == pytest.approx(4.5 / 6)
    with pytest.raises(ValueError):
        auroc([1.0, float("nan")], [0.0])


def test_bootstrap_auroc_ci():
    a, lo, hi = bootstrap_auroc([3, 4, 5], [0, 1, 2], n=500)
    assert (a, lo, hi) == (1.0, 1.0, 1.0)                                      # separable: every resample is 1
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 60), rng.normal(0, 1, 60)
    a, lo, hi = bootstrap_auroc(pos, neg, n=2000)
    assert lo < a < hi and 0.05 < hi - lo < 0.4


def test_miou_halves():
    assert miou_halves([0.3, 0.1, 0.2, 0.4]).tolist() == [True, False, False, True]
    assert miou_halves([0.5, 0.1, 0.3]).tolist() == [True, False, True]        # odd: the middle goes high
    assert miou_halves([0.2, 0.2, 0.2, 0.2]).tolist() == [False, False, True, True]  # ties keep the order


def test_bin_aurocs_paired_and_all():
    pos, neg = [1, 5, 2, 6], [3, 0, 4, 7]
    high = np.array([False, True, False, True])
    # paired: low = pos {1, 2} vs neg {3, 4} -> 0; high = pos {5, 6} vs neg {0, 7} -> 2/4
    assert bin_aurocs(pos, neg, high, high) == (0.0, 0.5)
    # all: low = {1, 2} vs all four negatives: (1>0, 2>0) = 2/8; high = {5, 6}: (5>3,0,4; 6>3,0,4) = 6/8
    assert bin_aurocs(pos, neg, high, None) == (0.25, 0.75)


def test_permutation_test_matches_exact_enumeration():
    pos, neg = np.array([1.0, 2.0, 5.0, 6.0]), np.array([3.0, 4.0, 0.5, 0.2])
    high = np.array([False, False, True, True])
    delta, p = high_minus_low_test(pos, neg, high, high, method="permutation", n=20000, seed=1)
    assert delta == pytest.approx(1.0)                                         # high: 1.0, low: 0.0
    # exact p over the 6 ways to choose 2 high units of 4: count deltas >= 1
    exact = []
    for hi_units in itertools.combinations(range(4), 2):
        m = np.isin(np.arange(4), hi_units)
        lo_a, hi_a = bin_aurocs(pos, neg, m, m)
        exact.append(hi_a - lo_a >= 1.0 - 1e-12)
    assert np.mean(exact) == pytest.approx(1 / 6)
    assert p == pytest.approx(1 / 6, abs=0.01)
    # no difference: both bins 0.5; of the 6 splits only one gives delta < 0 (high negatives {3, 3}), p = 5/6
    m = np.array([False, True, False, True])
    d0, p0 = high_minus_low_test([2, 2, 2, 2], [1, 3, 3, 1], m, m, n=20000)
    assert d0 == 0.0 and p0 == pytest.approx(5 / 6, abs=0.01)


def test_bootstrap_test_and_all_mode():
    rng = np.random.default_rng(0)
    neg = rng.normal(0, 1, 40)
    pos_low, pos_high = rng.normal(0, 1, 20), rng.normal(3, 1, 20)             # the high half separates clearly
    pos = np.concatenate([pos_low, pos_high])
    high = np.arange(40) >= 20
    for method in ("bootstrap", "permutation"):
        delta, p = high_minus_low_test(pos, neg, high, None, method=method, n=2000)
        assert delta > 0.3 and p < 0.01
        d_rev, p_rev = high_minus_low_test(pos, neg, ~high, None, method=method, n=2000)
        assert d_rev == pytest.approx(-delta) and p_rev > 0.9
    with pytest.raises(ValueError, match="paired"):
        high_minus_low_test(pos, neg, high, ~high, method="permutation", n=10)


def test_read_no_finding_keeps_frontal_studies_labelled_one(tmp_path):
    from grounding.experiment.classify_data import read_no_finding
    csv = tmp_path / "mimic-cxr-2.0.0-chexpert.csv"
    csv.write_text("subject_id,study_id,No Finding,Pneumothorax\n1,100,1.0,\n2,200,,1.0\n3,300,-1.0,\n4,400,1.0,\n")
    recs = [dict(dicom_id=d, study_id=s, view=v) for d, s, v in
            [("a", "100", "PA"), ("b", "100", "LATERAL"), ("c", "200", "PA"), ("d", "300", "AP"), ("e", "400", "AP")]]
    kept, rep = read_no_finding(str(csv), recs)
    assert [r["dicom_id"] for r in kept] == ["a", "e"]
    assert rep["studies labelled No Finding == 1.0"] == 2
    assert rep["No Finding image with view LATERAL (not frontal, skipped)"] == 1
    csv.write_text("subject_id,study_id,No Finding\n1,100,yes\n")
    with pytest.raises(ValueError, match="row 2"):
        read_no_finding(str(csv), recs)


@pytest.mark.parametrize("item", ["n_draws=0", "error_norm=l3", "test=ttest", "normal_bins=some", "sources=[bogus]",
                                  "n_draw=4"])
def test_classify_settings_are_checked_before_anything_loads(item, capsys):
    import classify
    with pytest.raises(SystemExit):
        classify.main([item, "--out", "/nonexistent/never-written"])
    assert f"'{item.split('=')[0]}'" in capsys.readouterr().err
