"""The phantom world's report wording: where each finding may sit, how a radiologist would phrase it, and the
FINDINGS / IMPRESSION text of a study (grounding/phantom/world.py samples the cases and writes the files).

The phrases vary the way real reports do ("left lower lobe" / "at the left lung base", severity words, negated
findings, normal sentences), so the report parser and the curation (grounding/data/) meet the same variety as on
MIMIC-CXR. Every choice is drawn from the caller's numpy Generator, so a case's report is a pure function of its seed.
"""
import textwrap

from grounding.anatomy import PATHOLOGIES

# Where each finding may sit: location names of the 27 (+ "retrocardiac", written as the word, = left lower).
LOCATION_MENU = {
    "Atelectasis": ["left lower", "right lower", "bibasilar", "right middle", "lingular", "left base", "right base",
                    "retrocardiac", "bilateral lower", "left upper", "right upper"],
    "Consolidation": ["left lower", "right lower", "right middle", "left upper", "right upper", "lingular",
                      "left middle", "left base", "right base"],
    "Pneumonia": ["left lower", "right lower", "right middle", "left upper", "right upper", "lingular", "bibasilar",
                  "left base", "right base", "left middle", "bilateral lower"],
    "Lung Opacity": ["left lower", "right lower", "left middle", "right middle", "left upper", "right upper",
                     "left apical", "right apical", "bibasilar", "left base", "right base"],
    "Pleural Effusion": ["left", "right", "left pleural", "right pleural", "bilateral pleural", "left base",
                         "right base", "bibasilar", "left costophrenic", "right costophrenic", "bilateral"],
    "Pneumothorax": ["left apical", "right apical", "left", "right", "left upper", "right upper"],
    "Edema": ["pulmonary", "bilateral"],
    "Cardiomegaly": ["cardiomegaly"],
}

# ---------------------------------------------------------------------------------------------------
# Report wording

_PRE = {"lower": ["{s} lower lobe", "{s} lower lung", "{s} lower zone"], "base": ["{s} basilar", "{s} basal"],
        "upper": ["{s} upper lobe", "{s} upper lung"], "middle": ["{s} mid lung", "{s} mid zone"],
        "apical": ["{s} apical"], "pleural": ["{s} pleural"], "": ["{s}", "{s}-sided"]}
_POST = {"lower": ["in the {s} lower lobe"], "base": ["at the {s} lung base", "at the {s} base"],
         "upper": ["in the {s} upper lobe"], "middle": ["in the {s} mid lung zone"], "apical": ["at the {s} apex"],
         "costophrenic": ["at the {s} costophrenic angle"], "": ["on the {s}"]}
_SPECIAL_PRE = {"bibasilar": ["bibasilar", "bibasal"], "lingular": ["lingular"], "retrocardiac": ["retrocardiac"],
                "pulmonary": ["pulmonary"], "bilateral": ["bilateral"], "bilateral lower": ["bilateral lower lobe"],
                "bilateral pleural": ["bilateral pleural"], "right middle": ["right middle lobe", "right mid lung"]}
_SPECIAL_POST = {"bibasilar": ["at both lung bases", "at the lung bases"], "lingular": ["in the lingula"],
                 "bilateral lower": ["in both lower lobes", "in the lower lobes"], "bilateral": ["in both lungs"]}
_WORDS = {"Atelectasis": ["atelectasis", "subsegmental atelectasis", "plate-like atelectasis"],
          "Consolidation": ["consolidation", "consolidative opacity", "airspace consolidation"],
          "Pneumonia": ["pneumonia", "opacity concerning for pneumonia", "opacity compatible with pneumonia"],
          "Lung Opacity": ["opacity", "hazy opacity", "ill-defined opacity", "opacification"],
          "Pleural Effusion": ["pleural effusion", "effusion"], "Pneumothorax": ["pneumothorax"],
          "Edema": ["edema"], "Cardiomegaly": ["cardiomegaly"]}
_SEVERITY = {"Pleural Effusion": ["small", "moderate", "large", ""], "Pneumothorax": ["small", "moderate", ""],
             "Edema": ["mild", "moderate", ""], "Cardiomegaly": ["mild", "moderate", ""]}
_NEGATED = {"Pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
            "Pleural Effusion": ["No pleural effusion.", "There is no large pleural effusion."],
            "Consolidation": ["No focal consolidation.", "There is no focal consolidation."],
            "Pneumonia": ["No evidence of pneumonia."], "Edema": ["No pulmonary edema.", "There is no edema."],
            "Atelectasis": ["No atelectasis."], "Lung Opacity": ["No focal opacity."], "Cardiomegaly": []}
_NORMAL = ["Osseous structures are unremarkable.", "Hilar contours are normal.",
           "The lungs are otherwise clear.", "Visualized upper abdomen is unremarkable."]


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def finding_phrase(rng, pathology, location, located=True):
    """An MS-CXR-like phrase for a finding at a location, e.g. "small left basilar effusion"."""
    if pathology == "Cardiomegaly":
        return pick(rng, ["cardiomegaly", "moderate cardiomegaly", "enlarged heart", "the heart is enlarged"])
    sev = pick(rng, _SEVERITY.get(pathology, ["mild", "patchy", ""]))
    word = pick(rng, _WORDS[pathology])
    if pathology == "Edema":
        word = "interstitial edema" if not located else ("pulmonary edema" if location == "pulmonary" else "edema")
        location = None if location == "pulmonary" else location
    if not located or location is None:
        return " ".join(w for w in (sev, word) if w)
    if location.startswith("bilateral") or location == "bibasilar":
        word = word.replace("effusion", "effusions")
    side, _, zone = location.partition(" ")
    if side in ("left", "right", "bilateral") and zone in ("pleural", ""):
        word = word.replace("pleural ", "")  # "left pleural" + "effusion"; "left" + "effusion" (not pleural)
    if location in _SPECIAL_PRE or location in _SPECIAL_POST:
        pre, post = _SPECIAL_PRE.get(location, []), _SPECIAL_POST.get(location, [])
    else:
        pre = [t.format(s=side) for t in _PRE.get(zone, [])]
        post = [t.format(s=side) for t in _POST.get(zone, [])]
    if post and (not pre or rng.random() < 0.35):
        return " ".join(w for w in (sev, word, pick(rng, post)) if w)
    return " ".join(w for w in (sev, pick(rng, pre), word) if w)


def sentence(rng, phrase):
    form = pick(rng, ["{P}.", "There is {p}.", "{P} is noted.", "{P} is again seen."])
    if phrase.startswith("the heart"):
        form = "{P}."
    return form.format(P=phrase[0].upper() + phrase[1:], p=phrase)


def write_report(rng, findings, resolved=None):
    """MIMIC-CXR-style free text: FINDINGS (sometimes absent) and IMPRESSION headers, wrapped lines."""
    present = {f["pathology"] for f in findings}
    body = [f["sentence"] for f in findings]
    absent = [p for p in PATHOLOGIES if p not in present and _NEGATED[p]]
    body += [pick(rng, _NEGATED[p]) for p in rng.permutation(absent)[: int(rng.integers(1, 4))]]
    if "Cardiomegaly" not in present:
        body.append("The cardiomediastinal silhouette is within normal limits.")
    body += list(rng.permutation(_NORMAL)[: int(rng.integers(1, 3))])
    if resolved:
        body.append(f"Previously seen {resolved} has resolved.")
    impression = [sentence(rng, f["phrase"]) for f in findings] or ["No acute cardiopulmonary process."]
    wrap = lambda s: textwrap.fill(s, 72, initial_indent=" ", subsequent_indent=" ")  # noqa: E731
    head = (" " * 33 + "FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  ___ with cough.\n \n"
            " COMPARISON:  None.\n \n")
    findings_part = "" if rng.random() < 0.15 else f" FINDINGS:\n \n{wrap(' '.join(body))}\n \n"
    return head + findings_part + f" IMPRESSION:\n \n{wrap(' '.join(impression))}\n"
