"""The phantom world's report wording: where each finding may sit, how a radiologist would phrase it, and the
FINDINGS / IMPRESSION text of a study (grounding/phantom/world.py samples the cases and writes the files).

The phrases vary the way real reports do ("left lower lobe" / "at the left lung base", severity words, negated
findings, normal sentences), so the report parser and the curation (grounding/data/) meet the same variety as on
MIMIC-CXR. On top of these easy forms come the hard ones that real reports use at realistic shares (SHARES): a
negation governing a list ("No pneumothorax, pleural effusion, or focal consolidation."), coordinated sides ("small
right and moderate left pleural effusions"), pleural fluid named by its place ("blunting of the left costophrenic
angle"), hedged findings ("may represent", "cannot exclude"), a finding followed by a negated one ("... without
effusion"), and hedged mentions of findings the study does NOT have ("Cannot exclude right lower lobe pneumonia.").
Every choice is drawn from the caller's numpy Generators, so a case's report is a pure function of its seed; the
hard forms draw from a stream of their own (`wrng`), so that adding them left every image, box and MS-CXR phrase of a
world as it was.
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


# ---------------------------------------------------------------------------------------------------
# The hard forms

# Shares of the hard forms: our estimates of how common each is in MIMIC-CXR reports, not measured on them (negated
# findings are listed in one sentence in most reports; bilateral findings are often written side by side; "likely",
# "possible" and "cannot exclude" qualify a good part of the findings).
SHARES = dict(negated_list=0.6,    # a report's 2-3 negated findings written as one list sentence
              coordinated=0.5,     # a bilateral finding written as its two sides ("right and left lower lobe")
              fluid_by_place=0.35,  # a pleural effusion named by its place ("blunting of the left costophrenic angle")
              likely=0.1,          # a finding leaned to ("retrocardiac opacity, likely atelectasis"): asserted
              hedged=0.1,          # a finding hedged ("may represent", "cannot exclude"): uncertain, yet true
              with_negation=0.15,  # a finding's FINDINGS sentence ends with a negated one ("... without effusion")
              hedged_absent=0.1)   # a report hedges a finding the study does not have ("Cannot exclude pneumonia.")
# The location a written location word stands for (the rest are already names of the 27).
TRUE_LOCATION = {"retrocardiac": "left lower"}
_LISTED = {"Pneumothorax": ["pneumothorax"],  # how a negated list names each finding
           "Pleural Effusion": ["pleural effusion", "effusion", "large pleural effusion"],
           "Consolidation": ["focal consolidation", "consolidation"], "Pneumonia": ["pneumonia"],
           "Edema": ["pulmonary edema", "edema"], "Atelectasis": ["atelectasis"], "Lung Opacity": ["focal opacity"]}
_OTHER_NEGATED = ["acute osseous abnormality", "vascular congestion", "pneumomediastinum"]
_OPACITY_OF = ("Atelectasis", "Consolidation", "Pneumonia")  # "an opacity, likely X" / "... may represent X"


def negated_list(rng, pathologies):
    """One sentence negating a list: "No pneumothorax, pleural effusion, or focal consolidation."."""
    items = [pick(rng, _LISTED[p]) for p in pathologies]
    if len(items) == 2 and rng.random() < 0.5:
        items.append(pick(rng, _OTHER_NEGATED))
    form = pick(rng, ["No {}.", "There is no {}.", "No evidence of {}.", "No {} is seen.", "{} are not seen."])
    conj = "and" if form.startswith("{}") else "or"  # "Pneumothorax, effusion, and edema are not seen."
    listed = f"{items[0]} {conj} {items[1]}" if len(items) == 2 else ", ".join(items[:-1]) + f", {conj} {items[-1]}"
    return _cap(form.format(listed))


def _side_by_side(rng, pathology, location):
    """A bilateral finding written as its two sides, or None where no such wording exists."""
    sev = lambda: pick(rng, ["small", "moderate", "large", "trace"] if pathology == "Pleural Effusion"  # noqa: E731
                       else ["mild", "moderate", "patchy"])
    a, b = ("right", "left") if rng.random() < 0.5 else ("left", "right")
    word = pick(rng, _WORDS[pathology]).replace("opacity concerning for ", "").replace("opacity compatible with ", "")
    if pathology == "Pleural Effusion":
        zone = {"bilateral": "", "bilateral pleural": "pleural ", "bibasilar": "basilar "}.get(location)
        if zone is None:
            return None
        return pick(rng, [f"{sev()} {a} and {sev()} {b} {zone}effusions", f"{a} greater than {b} {zone}effusions"])
    if location == "bibasilar":
        return pick(rng, [f"{a} and {b} basilar {word}", f"{word} at the {a} and {b} lung bases",
                          f"{a} greater than {b} basilar {word}"])
    if location == "bilateral lower":
        return pick(rng, [f"{a} and {b} lower lobe {word}", f"{word} in the {a} lower and {b} lower lobes",
                          f"{sev()} {a} and {sev()} {b} lower lobe {word}", f"{word} in the {a} and {b} lower lungs"])
    return None


def _fluid_by_place(rng, location):
    """A pleural effusion named by its place: a blunted angle, layering fluid, a meniscus (None: no such wording)."""
    side, _, zone = location.partition(" ")
    forms = {"costophrenic": [f"blunting of the {side} costophrenic angle", f"the {side} costophrenic angle is blunted",
                              f"small amount of fluid at the {side} costophrenic angle"],
             "base": [f"meniscus at the {side} lung base", f"layering fluid at the {side} base",
                      f"a fluid meniscus is seen at the {side} base"],
             "": [f"layering fluid on the {side}", f"layering fluid in the {side} hemithorax"],
             "pleural": [f"layering {side} pleural fluid", f"small amount of layering {side} pleural fluid"]}
    forms = {"bibasilar": ["layering fluid at both lung bases", "menisci at both lung bases"],
             "bilateral": ["layering fluid in both hemithoraces"]}.get(location) or forms.get(zone)
    return pick(rng, forms) if forms else None


def _cap(text):
    return text[0].upper() + text[1:]


def hard_wording(rng, finding):
    """(form, FINDINGS sentence, IMPRESSION sentence) of one finding; form "plain" keeps the easy sentences.

    The form is the finding's, so both sections say it the same way (a hedge in the FINDINGS is a hedge in the
    IMPRESSION too). Cardiomegaly and unlocated findings stay plain. SHARES["likely"] and ["hedged"] are shares of
    the findings not already written side by side or by place."""
    p, loc = finding["pathology"], finding["location"]
    r = rng.random()
    if p == "Cardiomegaly" or not finding["located"]:
        return "plain", None, None
    if r < SHARES["coordinated"] and (text := _side_by_side(rng, p, loc)):
        form, body = "coordinated", _cap(text) + "."
    elif p == "Pleural Effusion" and r < SHARES["fluid_by_place"] and (text := _fluid_by_place(rng, loc)):
        form, body = "fluid by place", _cap(text) + "."
    elif rng.random() < SHARES["likely"] + SHARES["hedged"]:
        hedge = rng.random() >= SHARES["likely"] / (SHARES["likely"] + SHARES["hedged"])
        form = "hedged" if hedge else "likely"
        if p in _OPACITY_OF:  # the opacity is certain, what it is is not
            opacity = finding_phrase(rng, "Lung Opacity", loc)
            word = {"Pneumonia": "pneumonia", "Consolidation": "consolidation"}.get(p, "atelectasis")
            body = pick(rng, [f"{_cap(opacity)} may represent {word}.", f"{_cap(opacity)}, possibly {word}."] if hedge
                        else [f"{_cap(opacity)}, likely {word}.", f"{_cap(opacity)} likely reflecting {word}."])
        else:
            phrase = finding["phrase"]
            body = pick(rng, [f"Possible {phrase}.", f"Cannot exclude {phrase}.", f"{_cap(phrase)} cannot be excluded."]
                        if hedge else [f"Probable {phrase}."])
    else:
        return "plain", None, None
    return form, body, body


def hedge_absent(rng, pathology, location):
    """A hedge about a finding the study does not have: "Cannot exclude small right apical pneumothorax."."""
    phrase = finding_phrase(rng, pathology, location)
    phrase = phrase.replace("opacity concerning for ", "").replace("opacity compatible with ", "")
    return pick(rng, [f"Cannot exclude {phrase}.", f"{_cap(phrase)} cannot be excluded.", f"Possible {phrase}."])


def with_negation(rng, sentence, absent):
    """A finding's sentence with a negated finding after it: "Left lower lobe atelectasis without effusion."."""
    item = pick(rng, _LISTED[absent])
    return sentence[:-1] + pick(rng, [f" without {item}.", f", no {item}.", f" and no {item}."])


def write_report(rng, findings, resolved=None, wrng=None):
    """MIMIC-CXR-style free text: FINDINGS (sometimes absent) and IMPRESSION headers, wrapped lines.

    wrng: the hard forms' own stream (None: the easy wording only). The easy draws from `rng` are all made even
    where a hard form replaces their text, so that every later draw of the case (its noise seed) stays as it was.
    Returns (report text, the absent findings it hedges: [(pathology, location)])."""
    present = {f["pathology"] for f in findings}
    body = [f.get("body") or f["sentence"] for f in findings]
    absent = [p for p in PATHOLOGIES if p not in present and _NEGATED[p]]
    chosen = [str(p) for p in rng.permutation(absent)[: int(rng.integers(1, 4))]]
    negated = [pick(rng, _NEGATED[p]) for p in chosen]
    hedged_absent = []
    if wrng is not None:
        others = [p for p in absent if p not in chosen]  # findings the report neither names nor negates yet
        for i, f in enumerate(findings):  # "... without effusion": a negated finding after a true one
            if f.get("form", "plain") == "plain" and others and wrng.random() < SHARES["with_negation"]:
                item = pick(wrng, others)
                others.remove(item)
                body[i] = with_negation(wrng, body[i], item)
        if len(chosen) > 1 and wrng.random() < SHARES["negated_list"]:
            negated = [negated_list(wrng, chosen)]
        hedgeable = [p for p in others if p not in ("Edema", "Lung Opacity")]
        if hedgeable and wrng.random() < SHARES["hedged_absent"]:
            p = pick(wrng, hedgeable)
            hedged_absent.append((p, pick(wrng, LOCATION_MENU[p])))
    body += negated
    if "Cardiomegaly" not in present:
        body.append("The cardiomediastinal silhouette is within normal limits.")
    body += list(rng.permutation(_NORMAL)[: int(rng.integers(1, 3))])
    if resolved:
        body.append(f"Previously seen {resolved} has resolved.")
    easy = [sentence(rng, f["phrase"]) for f in findings]  # drawn for every finding, used where no hard form is
    impression = [f.get("impression") or e for f, e in zip(findings, easy)]
    impression = impression or ["No acute cardiopulmonary process."]
    impression += [hedge_absent(wrng, p, loc) for p, loc in hedged_absent]
    wrap = lambda s: textwrap.fill(s, 72, initial_indent=" ", subsequent_indent=" ")  # noqa: E731
    head = (" " * 33 + "FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  ___ with cough.\n \n"
            " COMPARISON:  None.\n \n")
    findings_part = "" if rng.random() < 0.15 else f" FINDINGS:\n \n{wrap(' '.join(body))}\n \n"
    return head + findings_part + f" IMPRESSION:\n \n{wrap(' '.join(impression))}\n", hedged_absent
