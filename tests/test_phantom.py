"""The phantom world: deterministic, read by the real-format readers, boxes contain the rendered findings."""
import collections
import filecmp
import json
import os

import numpy as np
import pytest

from grounding import anatomy as an
from grounding.data import curation as cu
from grounding.data import readers as ds
from grounding.data.imagenome import read_imagenome
from grounding.data.vindr import read_vindr
from grounding.phantom import world as ph
from grounding.phantom import render as pr
from grounding.data import reports as rp
from grounding.phantom.pretrain import training_captions
from grounding.phantom import truth as tr
from grounding.phantom import wording as wd

ph_config = ph.PhantomConfig  # the real class, for tests that patch ph.PhantomConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    summary = ph.build_world(root, ph.PhantomConfig.tiny())
    return root, summary


def test_world_is_deterministic_for_a_seed(world, tmp_path):
    root, _ = world
    again = str(tmp_path / "again")
    ph.build_world(again, ph.PhantomConfig.tiny())
    other = str(tmp_path / "other")
    ph.build_world(other, ph.PhantomConfig.tiny(seed=1))
    files = ["mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv", "ms-cxr/MS_CXR_Local_Alignment_v1.1.0.csv",
             "vindr-cxr/annotations_test.csv"]
    for f in files:
        assert filecmp.cmp(os.path.join(root, f), os.path.join(again, f), shallow=False), f
    assert not filecmp.cmp(os.path.join(root, files[1]), os.path.join(other, files[1]), shallow=False)
    recs, _ = ds.read_mimic(os.path.join(root, "mimic-cxr-jpg"))
    rel = os.path.relpath(recs[0]["image_path"], root)
    assert filecmp.cmp(recs[0]["image_path"], os.path.join(again, rel), shallow=False)


def test_world_json_says_synthetic(world):
    root, summary = world
    w = json.load(open(os.path.join(root, "world.json")))
    assert w["synthetic"] is True and "SYNTHETIC" in w["notice"] and summary["counts"]["scene_graphs"] == 6
    assert "SYNTHETIC" in ph.world_notice(root)


def test_readers_read_the_world(world):
    root, _ = world
    mimic = os.path.join(root, "mimic-cxr-jpg")
    recs, rep = ds.read_mimic(mimic, os.path.join(root, "mimic-cxr-reports"))
    assert len(recs) == 16 + 2 + 10 and rep.kept == 28
    pairs, rep = ds.read_mscxr(os.path.join(root, "ms-cxr", "MS_CXR_Local_Alignment_v1.1.0.csv"), mimic)
    assert len(pairs) == 10 and {p["split"] for p in pairs} <= {"test", "val"}
    loc, loc_rep = cu.mscxr_loc(pairs)
    print(loc_rep)
    assert len(loc) + sum(n for k, n in loc_rep.counts.items() if k.startswith("no location")) == len(pairs)
    train, _ = ds.read_mimic(mimic, os.path.join(root, "mimic-cxr-reports"), splits=("train",))
    samples, cur = cu.curate_tuning_set(train, exclude_subjects={p["subject_id"] for p in pairs})
    print(cur)
    assert samples and all(s["prompt"] and s["locations"] for s in samples)
    sizes = {r["dicom_id"]: (r["image_width"], r["image_height"]) for r in recs}
    sgs, _ = read_imagenome(os.path.join(root, "chest-imagenome", "silver_dataset", "scene_graph"), sizes)
    lut, counts = an.build_lut(sgs)
    assert all(n == 6 for n in counts.values())
    assert lut["right lower"][0][0] < 256 < lut["left lower"][0][0]  # patient's right lung on the image left
    assert lut["right apical"][0][1] < lut["right upper"][0][1] < lut["right middle"][0][1] < lut["right lower"][0][1]
    vpairs, vrep = read_vindr(os.path.join(root, "vindr-cxr", "annotations_test.csv"),
                                 os.path.join(root, "vindr-cxr", "test"))
    prompts = cu.vindr_prompts(vpairs, lut)
    assert prompts and all(p["prompt"].endswith(p["category"].lower()) for p in prompts)


@pytest.mark.parametrize("pathology", ph.PATHOLOGIES)
def test_boxes_contain_the_rendered_finding(pathology):
    """The finding's pixel difference (same patient with vs without it) lies mostly inside its box(es)."""
    cfg = ph.PhantomConfig(size=128)
    fractions = []
    for i in range(200):
        case = ph.sample_case(cfg, "test", i)
        if case["findings"][0]["pathology"] != pathology:
            continue
        with_f, info = pr.render_case(case)
        without, _ = pr.render_case(case, with_findings=False)
        diff = np.abs(with_f.astype(np.float64) - without)
        inside = np.zeros_like(diff, dtype=bool)
        for x, y, w, h in info["boxes"][0]:
            inside[y:y + h, x:x + w] = True
        fractions.append(diff[inside].sum() / diff.sum())
        # visible at the tiny LDM's 64x64: the mean change inside the box is well above the noise level
        assert diff[inside].mean() > 0.03, (pathology, i)
        if len(fractions) == 4:
            break
    print(pathology, [round(f, 3) for f in fractions])
    assert len(fractions) == 4 and min(fractions) > 0.75


def test_phrases_name_the_drawn_location():
    """The extractor recovers each located finding's location from the phrase the world wrote."""
    cfg = ph.PhantomConfig()
    for i in range(300):
        for f in ph.sample_case(cfg, "train", i)["findings"]:
            want = {"retrocardiac": "left lower"}.get(f["location"], f["location"])
            got = rp.sentence_locations(f["sentence"], f["pathology"])
            assert f["pathology"] in rp.find_pathologies(f["sentence"]), f["sentence"]
            assert got == [want], (f["sentence"], got, want)


def test_reports_assert_exactly_the_drawn_findings():
    """Negated lists, normal and "resolved" sentences in the world's reports never count as findings, and every
    sentence that asserts a finding gives it its true location. Hedged findings: dropped by default; with
    hedged="keep" they count, and so do the hedged mentions of findings the study does not have."""
    cfg = ph.PhantomConfig()
    for i in range(300):
        case = ph.sample_case(cfg, "train", i)
        true = {f["pathology"]: wd.TRUE_LOCATION.get(f["location"], f["location"]) for f in case["findings"]}
        for hedged in ("drop", "keep"):
            sents = cu.positive_sentences(case["report"], hedged=hedged)
            found = {p for _, ps in sents for p in ps}
            want = {f["pathology"] for f in case["findings"] if hedged == "keep" or f["form"] != "hedged"}
            if hedged == "keep":
                want |= {p for p, _ in case["hedged_absent"]}
            assert found == want, (hedged, case["report"])
            for s, ps in sents:
                for p in ps:
                    if p in true:
                        assert rp.sentence_locations(s, p, hedged) == [true[p]], (s, p, true[p])


def test_hard_forms_appear_at_their_shares():
    """Over 1,000 training studies each hard form of wording.py is used, near its share."""
    cfg = ph.PhantomConfig()
    cases = [ph.sample_case(cfg, "train", i) for i in range(1000)]
    forms = collections.Counter(f["form"] for c in cases for f in c["findings"])
    n = sum(forms.values())
    def negates_a_list(s):
        return (s.lower().startswith(("no ", "there is no ")) and " or " in s) or s.endswith("are not seen")
    lists = sum(any(negates_a_list(s) for s in rp.split_sentences(rp.report_body(c["report"]))) for c in cases)
    print(forms, "reports with a negated list:", lists, "hedged absent:", sum(bool(c["hedged_absent"]) for c in cases))
    assert 0.05 < forms["hedged"] / n < 0.15 and 0.05 < forms["likely"] / n < 0.15
    assert forms["coordinated"] > 20 and forms["fluid by place"] > 20
    assert 0.25 < lists / len(cases) < 0.6
    assert 0.05 < sum(bool(c["hedged_absent"]) for c in cases) / len(cases) < 0.15


def test_hard_wording_leaves_the_images_as_they_were():
    """The hard forms draw from their own stream: the case's main stream (and with it the noise seed, hence every
    image) moves on exactly as with the easy wording alone."""
    cfg = ph.PhantomConfig()
    for i in range(40):
        case = ph.sample_case(cfg, "train", i)
        hard = np.random.default_rng(7)
        easy = np.random.default_rng(7)
        wd.write_report(hard, case["findings"], None, np.random.default_rng(i))
        wd.write_report(easy, [dict(f, form="plain", body=None, impression=None) for f in case["findings"]], None)
        assert hard.integers(2**31) == easy.integers(2**31)


def test_world_writes_its_version_and_answer_key(world):
    root, _ = world
    w = json.load(open(os.path.join(root, "world.json")))
    truth = tr.read_truth(root)
    recs, _ = ds.read_mimic(os.path.join(root, "mimic-cxr-jpg"), os.path.join(root, "mimic-cxr-reports"))
    assert w["version"] == ph.WORLD_VERSION and set(truth) == {r["study_id"] for r in recs}
    case = ph.sample_case(ph.PhantomConfig.tiny(), "train", 3)
    assert [f["pathology"] for f in truth[case["study_id"]]["findings"]] == [f["pathology"] for f in case["findings"]]


def test_precision_and_recall_against_the_truth():
    """Hand-checkable: 4 samples, 3 right; 3 usable studies (one finding, an allowed view), 2 with a right sample."""
    truth = {"1": dict(findings=[dict(pathology="Atelectasis", location="left lower", form="plain")]),
             "2": dict(findings=[dict(pathology="Pleural Effusion", location="bilateral pleural", form="coordinated")]),
             "3": dict(findings=[dict(pathology="Pneumonia", location="right lower", form="hedged")]),
             "4": dict(findings=[]),
             "5": dict(findings=[dict(pathology="Edema", location="pulmonary", form="plain")])}
    records = [dict(study_id=s, view="PA") for s in "1234"] + [dict(study_id="5", view="AP")]
    sample = lambda st, p, locs: dict(study_id=st, pathology=p, locations=locs, prompt="x", sentence="y")  # noqa: E731
    samples = [sample("1", "Atelectasis", ["left lower"]), sample("1", "Atelectasis", ["left lower"]),
               sample("2", "Pleural Effusion", ["right", "left pleural"]), sample("4", "Pneumothorax", ["left"])]
    precision, recall, text = tr.score_tuning_set(samples, records, truth, ("PA",))
    assert (precision, recall) == (2 / 4, 1 / 3)
    assert "pathology the study does not have: 1" in text and "at a location it does not have: 1" in text
    assert "no correct sample (coordinated wording): 1" in text and "no correct sample (hedged wording): 1" in text
    with pytest.raises(ValueError, match="study 9 is not in truth.jsonl"):
        tr.score_tuning_set([sample("9", "Edema", [])], records, truth, ("PA",))


def test_training_captions_mix_prompts_and_sentences(world):
    root, _ = world
    caps = training_captions(root, prompt_frac=0.5, seed=0)
    assert len(caps) == 16 and all(c["caption"] for c in caps)
    kinds = {c["caption"] == c["caption"].lower() for c in caps}
    assert kinds == {True, False}  # some standardised prompts (lower case), some report sentences


def test_pretrain_config_defaults_are_the_committed_run():
    """configs/phantom_pretrain.yaml (the run that made assets/phantom_ldm) states PretrainConfig's defaults."""
    from grounding.experiment.config import load_config
    from grounding.phantom.pretrain import PretrainConfig
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert load_config(PretrainConfig, os.path.join(repo, "configs", "phantom_pretrain.yaml")) == PretrainConfig()


def test_ensure_phantom_reuses_a_finished_world_and_never_builds_over_other_files(tmp_path):
    from grounding.phantom.world import ensure_phantom
    done = tmp_path / "done"
    done.mkdir()
    (done / "world.json").write_text(json.dumps({"notice": "SYNTHETIC", "version": ph.WORLD_VERSION,
                                                 "config": {"seed": 3}}))  # a build's last file
    assert ensure_phantom(str(done), seed=3) == str(done)                     # reused, nothing rebuilt
    for folder, seed in ((done, 4), (tmp_path / "mine", 0)):                 # another seed; a user's own folder
        folder.mkdir(exist_ok=True)
        (folder / "notes.txt").write_text("keep me")
        with pytest.raises(FileExistsError, match="delete it, or set phantom_root"):
            ensure_phantom(str(folder), seed=seed)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _stale_world(folder):
    """A tiny world as generator version 1 wrote it: no version key, no answer key."""
    ph.build_world(str(folder), ph_config.tiny())
    w = json.load(open(folder / "world.json"))
    del w["version"]
    (folder / "world.json").write_text(json.dumps(w))
    os.remove(folder / "truth.jsonl")


def test_a_world_of_an_older_generator_is_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ph, "PhantomConfig", lambda seed: ph_config.tiny(seed=seed))  # tiny builds in the test
    root = tmp_path / "world"
    _stale_world(root)
    (root / "classify-normals").mkdir()                     # built later by classify.py: part of a world too
    ph.ensure_phantom(str(root), seed=0)
    assert "generator version 1; this code writes version 2" in capsys.readouterr().out
    assert json.load(open(root / "world.json"))["version"] == ph.WORLD_VERSION and (root / "truth.jsonl").exists()
    assert sorted(os.listdir(tmp_path)) == ["world"]         # the old world and the temporary build are gone


def test_an_older_world_holding_other_files_is_refused_and_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(ph, "PhantomConfig", lambda seed: ph_config.tiny(seed=seed))
    root = tmp_path / "world"
    _stale_world(root)
    (root / "my_notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"generator version 1 .*\['my_notes.txt'\], which a world never holds"):
        ph.ensure_phantom(str(root), seed=0)
    assert (root / "my_notes.txt").read_text() == "keep me" and not (root / "truth.jsonl").exists()
    w = json.load(open(root / "world.json"))                  # a world.json that does not prove a phantom world:
    (root / "my_notes.txt").unlink()
    (root / "world.json").write_text(json.dumps(dict(w, synthetic=False)))
    with pytest.raises(FileExistsError, match="holds something other than the phantom world"):
        ph.ensure_phantom(str(root), seed=0)
    assert (root / "mimic-cxr-reports").is_dir()


def test_pretraining_never_replaces_a_model_folder_silently(tmp_path, capsys):
    import importlib.util
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("pretrain_script", os.path.join(repo, "scripts", "pretrain_phantom.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.yaml").write_text("family: phantom\n")
    for bad, message in ((["weights=" + str(tmp_path / "model")], "pass --overwrite"),
                         (["caption_dropout=1.5"], "caption_dropout"), (["vocab_size=10"], "at least 514")):
        with pytest.raises(SystemExit):
            script.main(bad + ["out_dir=" + str(tmp_path / "run")])
        assert message in capsys.readouterr().err
    assert (tmp_path / "model" / "model.yaml").read_text() == "family: phantom\n" and not (tmp_path / "run").exists()
