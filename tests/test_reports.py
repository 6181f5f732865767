"""Report parsing, pathology matching with negation/resolution, the rule-based location extractor, prompts."""
import json

import pytest

from grounding.data import reports as rp
from grounding.anatomy import LOCATIONS

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with fever, eval for pneumonia.

 FINDINGS:

 Patchy opacity at the right lung base measuring 2.5 cm, concerning for
 pneumonia. No pneumothorax.

 IMPRESSION:

 1. Right basilar pneumonia. 2. Previously seen left effusion has resolved.
"""

# (sentence, pathology it asserts, expected prompt): every one of the 27 locations, synonyms and plurals.
CASES = [
    ("Small left effusion.", "Pleural Effusion", "left pleural effusion"),
    ("Right-sided pneumothorax.", "Pneumothorax", "right pneumothorax"),
    ("Bilateral opacities.", "Lung Opacity", "bilateral lung opacity"),
    ("Small left apical pneumothorax.", "Pneumothorax", "left apical pneumothorax"),
    ("Tiny pneumothorax at the right apex.", "Pneumothorax", "right apical pneumothorax"),
    ("Bilateral apical pneumothoraces.", "Pneumothorax", "bilateral apical pneumothorax"),
    ("Left upper lobe consolidation.", "Consolidation", "left upper consolidation"),
    ("There is consolidation in the right upper lobe.", "Consolidation", "right upper consolidation"),
    ("Bilateral upper lobe opacities.", "Lung Opacity", "bilateral upper lung opacity"),
    ("Left mid lung opacity.", "Lung Opacity", "left middle lung opacity"),
    ("Right middle lobe pneumonia.", "Pneumonia", "right middle pneumonia"),
    ("Patchy opacities in both mid lung zones.", "Lung Opacity", "bilateral middle lung opacity"),
    ("Left lower lobe atelectasis.", "Atelectasis", "left lower atelectasis"),
    ("Atelectasis in the right lower lobe.", "Atelectasis", "right lower atelectasis"),
    ("Left and right lower lobe atelectasis.", "Atelectasis", "bilateral lower atelectasis"),
    # two pathologies in one clause: cut at "and", but not at the "and" joining two sides
    ("Left and right lower lobe opacities concerning for pneumonia.", "Pneumonia", "bilateral lower pneumonia"),
    ("Left and right basilar opacities, likely atelectasis.", "Atelectasis", "bibasilar atelectasis"),
    ("Atelectatic changes in both lower lobes.", "Atelectasis", "bilateral lower atelectasis"),
    ("Blunting of the left costophrenic angle from a small effusion.", "Pleural Effusion",
     "left costophrenic pleural effusion"),
    ("Small effusion at the right costophrenic angle.", "Pleural Effusion", "right costophrenic pleural effusion"),
    ("Blunting of both costophrenic angles from small effusions.", "Pleural Effusion",
     "bilateral costophrenic pleural effusion"),
    ("Small left pleural effusion.", "Pleural Effusion", "left pleural effusion"),
    ("Moderate right pleural effusion is unchanged.", "Pleural Effusion", "right pleural effusion"),
    ("Bilateral pleural effusions, left greater than right.", "Pleural Effusion", "bilateral pleural effusion"),
    ("Atelectasis at the left lung base.", "Atelectasis", "left base atelectasis"),
    ("Right basilar opacity concerning for pneumonia.", "Pneumonia", "right base pneumonia"),
    ("Bibasilar atelectasis.", "Atelectasis", "bibasilar atelectasis"),
    ("Subsegmental atelectasis at both lung bases.", "Atelectasis", "bibasilar atelectasis"),
    ("Bibasal consolidations.", "Consolidation", "bibasilar consolidation"),
    ("Lingular atelectasis.", "Atelectasis", "lingular atelectasis"),
    ("Hazy opacity in the lingula.", "Lung Opacity", "lingular lung opacity"),
    ("Moderate cardiomegaly.", "Cardiomegaly", "cardiomegaly"),
    ("The heart is moderately enlarged.", "Cardiomegaly", "cardiomegaly"),
    ("Mild pulmonary edema.", "Edema", "pulmonary edema"),
    ("Retrocardiac opacity, likely atelectasis.", "Atelectasis", "left lower atelectasis"),
    ("Opacity in the right upper and middle lobes.", "Lung Opacity", "right upper and right middle lung opacity"),
    ("Right lower lobe pneumonia and left pleural effusion.", "Pneumonia", "right lower pneumonia"),
    ("Right lower lobe pneumonia and left pleural effusion.", "Pleural Effusion", "left pleural effusion"),
    ("Right pleural effusion with left basilar atelectasis.", "Atelectasis", "left base atelectasis"),
]


def test_sections_and_body():
    secs = rp.report_sections(REPORT)
    assert set(secs) == {"examination", "indication", "findings", "impression"}
    body = rp.report_body(REPORT)
    assert "eval for pneumonia" not in body and "Right basilar pneumonia" in body
    no_findings = "FINAL REPORT\n IMPRESSION:\n Left lower lobe collapse.\n"
    assert rp.report_body(no_findings).strip() == "Left lower lobe collapse."
    assert rp.report_body("Bibasilar atelectasis. No effusion.").startswith("Bibasilar")


def test_sentence_split_keeps_decimals_and_drops_list_numbers():
    s = rp.split_sentences(rp.report_body(REPORT))
    assert s[0] == "Patchy opacity at the right lung base measuring 2.5 cm, concerning for pneumonia"
    assert s[1] == "No pneumothorax" and s[2] == "Right basilar pneumonia"
    assert len(s) == 4


@pytest.mark.parametrize("sentence,pathology,prompt", CASES)
def test_extractor_prompts(sentence, pathology, prompt):
    assert pathology in rp.find_pathologies(sentence)
    locs = rp.sentence_locations(sentence, pathology)
    assert all(loc in LOCATIONS for loc in locs)
    assert rp.standardise_prompt(locs, pathology) == prompt


def test_every_location_is_covered_by_the_cases():
    seen = {loc for s, p, _ in CASES for loc in rp.sentence_locations(s, p)}
    assert seen == set(LOCATIONS), sorted(set(LOCATIONS) - seen)


@pytest.mark.parametrize("sentence", [
    "No pneumothorax.", "There is no focal consolidation.", "Without evidence of pneumonia.",
    "Negative for pleural effusion.", "Lungs are free of edema.", "Previously seen left lower lobe pneumonia has resolved.",
    "The right effusion has resolved.", "Previously seen opacity consistent with pneumonia has resolved.", "Pulmonary edema has cleared.", "No evidence of cardiomegaly.",
])
def test_negated_or_resolved_sentences_assert_nothing(sentence):
    assert rp.find_pathologies(sentence) == []


def test_negation_scope_and_generic_opacity():
    assert rp.find_pathologies("Small left effusion, no pneumothorax.") == ["Pleural Effusion"]
    assert rp.find_pathologies("Small left effusion, no pneumothorax.", scope="sentence") == []  # paper's literal rule
    assert rp.find_pathologies("Opacity at the right base concerning for pneumonia.") == ["Pneumonia"]
    assert rp.find_pathologies("Consolidative opacity in the left lower lobe.") == ["Consolidation"]
    assert rp.find_pathologies("Patchy opacities in the left lower lobe.") == ["Lung Opacity"]
    assert rp.find_pathologies("Small pneumothoraces and enlarged heart.") == ["Cardiomegaly", "Pneumothorax"]


def test_symmetric_merging_and_prompt_rules():
    assert rp.merge_symmetric([("left", "lower"), ("right", "lower")]) == ["bilateral lower"]
    assert rp.merge_symmetric([("left", "base"), ("right", "base")]) == ["bibasilar"]
    assert rp.merge_symmetric([("left", ""), ("left", "lower")]) == ["left lower"]
    assert rp.merge_symmetric([("left", "upper"), ("right", "lower")]) == ["left upper", "right lower"]
    assert rp.standardise_prompt(["left lower", "right upper"], "Pneumonia") == "left lower and right upper pneumonia"
    assert rp.standardise_prompt(["bilateral pleural"], "Pleural Effusion") == "bilateral pleural effusion"
    assert rp.standardise_prompt([], "Edema") == "edema"


def test_load_radgraph_entities(tmp_path):
    data = {"s1": {"text": "Left lower lobe atelectasis .", "entities": {
        "3": {"tokens": "atelectasis", "label": "Observation::definitely present", "start_ix": 3},
        "2": {"tokens": "lobe", "label": "Anatomy::definitely present", "start_ix": 2},
        "1": {"tokens": "Left", "label": "ANAT-DP", "start_ix": 0},
        "4": {"tokens": "lower", "label": "Anatomy::definitely present", "start_ix": 1}}}}
    (tmp_path / "rg.json").write_text(json.dumps(data))
    ents = rp.load_radgraph_entities(tmp_path / "rg.json")
    assert ents == {"s1": ["Left", "lower", "lobe"]}
    assert rp.extract_locations(" ".join(ents["s1"])) == ["left lower"]
    (tmp_path / "bad.json").write_text(json.dumps({"s1": {"text": "x"}}))
    with pytest.raises(ValueError, match="'s1'"):
        rp.load_radgraph_entities(tmp_path / "bad.json")
