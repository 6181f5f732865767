"""The phantom world: deterministic, read by the real-format readers, boxes contain the rendered findings."""
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
    """Negated, normal and "resolved" sentences in the world's reports never count as findings."""
    cfg = ph.PhantomConfig()
    for i in range(300):
        case = ph.sample_case(cfg, "train", i)
        found = {p for _, ps in cu.positive_sentences(case["report"]) for p in ps}
        assert found == {f["pathology"] for f in case["findings"]}, case["report"]


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
    (done / "world.json").write_text(json.dumps({"notice": "SYNTHETIC", "config": {"seed": 3}}))  # a build's last file
    assert ensure_phantom(str(done), seed=3) == str(done)                     # reused, nothing rebuilt
    for folder, seed in ((done, 4), (tmp_path / "mine", 0)):                 # another seed; a user's own folder
        folder.mkdir(exist_ok=True)
        (folder / "notes.txt").write_text("keep me")
        with pytest.raises(FileExistsError, match="delete it, or set phantom_root"):
            ensure_phantom(str(folder), seed=seed)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


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
