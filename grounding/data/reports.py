"""Radiology report text -> weak supervision: sections, sentences, pathologies, locations, prompts.

Mirrors Vilouras et al., MIDL 2026, Sec. 3.1 / App. D (docs/paper.md section 3). The paper tags location
words with RadGraph-XL ("ANAT-DP" entities), a model we cannot ship; here a transparent rule-based
lexicon does the same job, and `load_radgraph_entities` accepts precomputed RadGraph-XL output instead.

Pipeline for one report: `report_sections` (FINDINGS / IMPRESSION, or the whole text when neither header
exists) -> `split_sentences` -> `find_pathologies` (synonyms and plurals; a clause with a negation or
resolution cue does not count) -> `extract_locations` (lexicon, side/zone binding, symmetric merging)
-> `standardise_prompt` ("{location} {pathology}", several locations joined with "and").
"""
import json
import re

from grounding.anatomy import PATHOLOGIES, PATHOLOGY_WORDS, location_name

# Report wording of each pathology (regex alternatives, matched as whole words on lower-cased text).
# Plurals and the common radiology synonyms; "Lung Opacity" is the generic finding and is only counted
# when no more specific pathology is named in the same clause (see find_pathologies).
PATHOLOGY_SYNONYMS = {
    "Atelectasis": [r"atelecta(?:sis|ses|tic)", r"collapse[d]?", r"volume loss"],
    "Cardiomegaly": [r"cardiomegaly", r"enlarged (?:heart|cardiac silhouette)",
                     r"(?:heart|heart size|cardiac silhouette) (?:is |remains |appears )?(?:mildly |moderately |severely |markedly )?enlarged",
                     r"enlargement of the (?:heart|cardiac silhouette)"],
    "Consolidation": [r"consolidations?", r"consolidative", r"airspace disease"],
    "Edema": [r"o?edema", r"edematous", r"interstitial fluid"],
    "Lung Opacity": [r"opacit(?:y|ies)", r"opacification", r"opacified", r"densit(?:y|ies)", r"haziness"],
    "Pleural Effusion": [r"effusions?", r"pleural fluid", r"hydrothorax"],
    "Pneumonia": [r"pneumonias?", r"bronchopneumonia", r"infectious process", r"pneumonic"],
    "Pneumothorax": [r"pneumothora(?:x|ces|xes)", r"ptx"],
}

# ---------------------------------------------------------------------------------------------------
# Sections and sentences

_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z &/()-]{2,40}):", re.M)


def report_sections(text):
    """{lower-case header: body} for every "HEADER:" line of a MIMIC-CXR report."""
    heads = list(_HEADER.finditer(text))
    out = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        out[m.group(1).strip().lower()] = text[m.end():end].strip()
    return out


def report_body(text, sections=("findings", "impression")):
    """FINDINGS + IMPRESSION text; reports without either header are used whole (minus "FINAL REPORT")."""
    found = report_sections(text)
    parts = [found[s] for s in sections if found.get(s)]
    if parts:
        return "\n\n".join(parts)
    if found:  # headers exist but none we want (e.g. only INDICATION): keep what follows the last one
        return list(found.values())[-1]
    return re.sub(r"^\s*FINAL REPORT\s*", "", text)


def split_sentences(text):
    """Sentences of a report body: unwrap lines, split at . ! ? (not inside numbers like 1.5 cm)."""
    text = re.sub(r"\s+", " ", text.replace("___", " "))
    pieces = re.split(r"(?<!\d)\.(?!\d)|(?<=\d)\.(?=\s|$)|[!?]", text)
    # "1. Large effusion" leaves a bare "1" piece: keep only pieces with letters.
    return [p.strip(" ,;:") for p in pieces if re.search(r"[A-Za-z]{2}", p)]


# ---------------------------------------------------------------------------------------------------
# Pathologies, negation, resolution

NEGATION_CUES = [r"no", r"not", r"without", r"negative for", r"free of", r"absence of", r"absent", r"no evidence of",
                 r"rule[sd]? out", r"ruled out", r"no longer", r"removed"]
# Resolution words refer back to the sentence's subject ("Previously seen opacity consistent with pneumonia
# has resolved"), so they cancel the whole sentence, not just their clause.
RESOLUTION_CUES = [r"resolved", r"resolving", r"resolution", r"cleared", r"clearing"]
_NEG = re.compile(r"\b(?:" + "|".join(NEGATION_CUES + RESOLUTION_CUES) + r")\b")
_RESOLVED = re.compile(r"\b(?:" + "|".join(RESOLUTION_CUES) + r")\b")
_PATHO = {p: re.compile(r"\b(?:" + "|".join(PATHOLOGY_SYNONYMS[p]) + r")\b") for p in PATHOLOGIES}
_CLAUSE = re.compile(r",|;|:|\bbut\b|\bhowever\b|\bwhile\b|\bwith\b|\balthough\b")
_SPECIFIC = ("Atelectasis", "Consolidation", "Edema", "Pneumonia", "Pleural Effusion", "Pneumothorax")


def clauses(sentence):
    """A sentence cut at commas, semicolons and contrast words: the scope of a negation cue."""
    return [c.strip() for c in _CLAUSE.split(sentence.lower()) if c.strip()]


def mentions(clause, pathology):
    return _PATHO[pathology].search(clause) is not None


def is_negated(clause):
    """True when the clause carries a negation ("no", "without", "negative for", ...) or resolution cue."""
    return _NEG.search(clause) is not None


def find_pathologies(sentence, scope="clause"):
    """Pathologies a sentence asserts: mentioned in a clause (or sentence) that has no negation/resolution cue.

    scope="clause" (default) lets "Small left effusion, no pneumothorax." count the effusion; scope="sentence"
    is the paper's literal rule (skip the whole sentence if any cue appears). "Lung Opacity" is the generic
    word ("opacity concerning for pneumonia"): it only counts where no specific pathology is named.
    """
    units = clauses(sentence) if scope == "clause" else [sentence.lower()]
    if _RESOLVED.search(sentence.lower()) or (scope == "sentence" and is_negated(units[0])):
        return []
    found = []
    for u in units:
        if is_negated(u):
            continue
        hits = [p for p in PATHOLOGIES if mentions(u, p)]
        if any(p in _SPECIFIC for p in hits) or "Cardiomegaly" in hits:
            hits = [p for p in hits if p != "Lung Opacity"]
        found += [p for p in hits if p not in found]
    # generic opacity in a sentence that names a specific pathology elsewhere belongs to that pathology
    if "Lung Opacity" in found and any(p in _SPECIFIC for p in found):
        found.remove("Lung Opacity")
    return found


# ---------------------------------------------------------------------------------------------------
# Location extraction

# word -> (side, zone, plural). side None = no side; zone None = no zone. Checked on whole words.
_LEXICON = {
    "left": ("left", None, False), "right": ("right", None, False),
    "bilateral": ("bilateral", None, False), "bilaterally": ("bilateral", None, False),
    "both": ("bilateral", None, True),
    "bibasilar": ("bilateral", "base", True), "bibasal": ("bilateral", "base", True),
    "bibasally": ("bilateral", "base", True), "biapical": ("bilateral", "apical", True),
    "retrocardiac": ("left", "lower", False),  # behind the heart = left lower lobe
    "apical": (None, "apical", False), "apex": (None, "apical", False), "apices": (None, "apical", True),
    "apically": (None, "apical", False),
    "upper": (None, "upper", False), "middle": (None, "middle", False), "mid": (None, "middle", False),
    "lower": (None, "lower", False),
    "base": (None, "base", False), "bases": (None, "base", True), "basal": (None, "base", False),
    "basilar": (None, "base", False), "basally": (None, "base", False),
    "costophrenic": (None, "costophrenic", False),
    "pleural": (None, "pleural", False),
}
_PLURAL_NOUNS = {"lobes", "zones", "lungs", "angles", "bases", "apices", "hemithoraces", "sides"}
_JOINERS = {"and", "or", "to", "&"}  # "left and right lower lobes": the zone distributes over both sides


def _groups(text):
    """Bind side and zone words into (side, zone, plural) groups, left to right.

    A side word opens a group; a zone word fills the open group if it is near (<= 4 words) and has no zone
    yet, else opens a new group that inherits the side ("left upper and lower lobes"). A side that follows a
    side-less zone fills it ("lower lobe on the left", "base of the right lung"). Sides chained by "and"
    with no zone of their own share the next zone ("left and right lower lobes").
    """
    words = re.findall(r"[a-z]+", text.lower().replace("-", " "))
    groups, last_i = [], -99
    for i, w in enumerate(words):
        if w in _PLURAL_NOUNS and groups and i - last_i <= 3:
            groups[-1]["plural"] = True
        if w not in _LEXICON:
            continue
        side, zone, plural = _LEXICON[w]
        g = groups[-1] if groups and i - last_i <= 4 else None
        if side and zone:  # compound words: bibasilar, retrocardiac, ...
            groups.append({"side": side, "zone": zone, "plural": plural, "pending": False})
        elif side:
            # a side directly followed by its own zone word ("... effusion at the left costophrenic angle")
            # starts a new group instead of filling an earlier side-less zone ("pleural" of "pleural effusion")
            own_zone = any(_LEXICON.get(n, ("x",))[0] is None for n in words[i + 1:i + 3])
            if g and g["side"] is None and g["zone"] and not own_zone:
                g["side"] = side
            elif g and g["side"] and g["zone"] is None and not g["pending"] and words[i - 1] in _JOINERS:
                g["pending"] = True  # "left and right ...": left waits for right's zone
                groups.append({"side": side, "zone": None, "plural": plural, "pending": False})
            else:
                groups.append({"side": side, "zone": None, "plural": plural, "pending": False})
        else:
            if g and g["zone"] is None:
                g["zone"] = zone
                g["plural"] |= plural
                for p in groups[:-1]:  # sides that waited for a zone get this one too
                    if p["pending"] and p["zone"] is None:
                        p["zone"], p["pending"] = zone, False
            elif g and g["zone"] and g["side"] and words[i - 1] in _JOINERS | {"the"}:
                groups.append({"side": g["side"], "zone": zone, "plural": plural, "pending": False})
            else:
                groups.append({"side": None, "zone": zone, "plural": plural, "pending": False})
        last_i = i
    return groups


def merge_symmetric(pairs):
    """[(side, zone)] -> location names; left X + right X -> bilateral X; bilateral base -> bibasilar."""
    out = []
    for side, zone in pairs:
        other = "left" if side == "right" else "right"
        if side in ("left", "right") and ((other, zone) in pairs or ("bilateral", zone) in pairs):
            side = "bilateral"
        name = location_name(side, zone)
        if name not in out:
            out.append(name)
    # a bare side is implied by a zone on the same side ("left lower lobe ... left lung"): keep the zone
    return [n for n in out if not (n in ("left", "right", "bilateral") and any(o.startswith(n + " ") for o in out))]


def extract_locations(text, pathology=None):
    """Location names (of the 27) that a sentence or phrase mentions, symmetric pairs merged.

    pathology: Cardiomegaly always gives ["cardiomegaly"] (the heart is its location); "pulmonary" is
    taken from the words "pulmonary" / "perihilar" only, as in "pulmonary edema".
    """
    low = text.lower()
    if pathology == "Cardiomegaly":
        return ["cardiomegaly"]
    pairs = []
    for g in _groups(low):
        side = g["side"] or ("bilateral" if g["plural"] and g["zone"] else None)
        if side is None:
            continue  # a zone without a side ("lower lobe") names no location of the 27
        pair = (side, g["zone"] or "")
        if pair not in pairs:
            pairs.append(pair)
    out = merge_symmetric(pairs)
    if re.search(r"\blingula(?:r)?\b", low) and "lingular" not in out:
        out.append("lingular")
    if re.search(r"\b(?:pulmonary|perihilar)\b", low) and not out:
        out.append("pulmonary")
    if pathology is None and re.search(r"\bcardiomegaly\b|enlarged heart|heart (?:size )?is enlarged", low):
        out.append("cardiomegaly")
    return out


def sentence_locations(sentence, pathology):
    """Locations that a sentence gives one of its pathologies: from the clauses that assert it when they
    name any ("right effusion with left basilar atelectasis" -> atelectasis: left base), else the sentence."""
    units = [c for c in clauses(sentence) if mentions(c, pathology) and not is_negated(c)]
    # "right lower lobe pneumonia and left pleural effusion": cut a clause naming two pathologies at "and"
    units = [part for u in units for part in (_cut_at_and(u) if _n_pathologies(u) > 1 else [u])
             if mentions(part, pathology)]
    locs = []
    for u in units:
        locs += [loc for loc in extract_locations(u, pathology) if loc not in locs]
    return merge_symmetric([split_location(n) for n in locs]) if locs else extract_locations(sentence, pathology)


_SIDE_AND_SIDE = re.compile(r"\b(?:left|right)\s+and\s+(?:the\s+)?(?:left|right)\b")


def _cut_at_and(text):
    """Cut at every "and" except one joining two sides: "left and right lower lobe opacities concerning for
    pneumonia" names ONE location (bilateral lower), which a cut would reduce to "right lower"."""
    keep = [m.span() for m in _SIDE_AND_SIDE.finditer(text)]
    parts, start = [], 0
    for m in re.finditer(r"\band\b", text):
        if not any(a <= m.start() < b for a, b in keep):
            parts.append(text[start:m.start()])
            start = m.end()
    return parts + [text[start:]]


def _n_pathologies(text):
    return sum(mentions(text, p) for p in PATHOLOGIES)


def split_location(name):
    """Location name -> (side, zone) for re-merging ("lingular" etc. pass through as their own side)."""
    if name == "bibasilar":
        return ("bilateral", "base")
    side, _, zone = name.partition(" ")
    return (side, zone)


def standardise_prompt(locations, pathology):
    """"{location} {pathology}" with several locations joined by "and".

    A word shared by the location's end and the pathology's start is written once:
    "left pleural" + "pleural effusion" -> "left pleural effusion", "cardiomegaly" + "cardiomegaly" -> "cardiomegaly".
    """
    word = PATHOLOGY_WORDS.get(pathology, pathology.lower())
    loc = " and ".join(locations)
    if not loc:
        return word
    first = word.split()[0]
    if loc == word or loc.endswith(" " + word):
        return loc
    if loc.split()[-1] == first:
        return loc + word[len(first):]
    return f"{loc} {word}"


# ---------------------------------------------------------------------------------------------------
# Precomputed RadGraph-XL entities

def load_radgraph_entities(path):
    """Read RadGraph-XL output and return {key: [anatomy entity strings in text order]}.

    Accepted JSON (what the `radgraph` package writes): {key: {"text": str, "entities": {id: {"tokens": str,
    "label": str, "start_ix": int, ...}}}}, or a list of such objects (keys become "0", "1", ...). Labels
    "ANAT-DP" (RadGraph 1) and "Anatomy::definitely present" (RadGraph-XL) are kept; key is whatever the
    user keyed the sentences by (e.g. dicom_id or the sentence text). Feed `" ".join(entities)` to
    `extract_locations` to use them in place of the lexicon's own word finding.
    """
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, list):
        data = {str(i): d for i, d in enumerate(data)}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by report/sentence id")
    out = {}
    for key, item in data.items():
        if not isinstance(item, dict) or not isinstance(item.get("entities"), dict):
            raise ValueError(f"{path}: entry {key!r} has no 'entities' object; expected RadGraph output")
        ents = [e for e in item["entities"].values()
                if e.get("label") in ("ANAT-DP", "Anatomy::definitely present")]
        ents.sort(key=lambda e: e.get("start_ix", 0))
        out[key] = [e["tokens"] for e in ents]
    return out
