"""Radiology report text -> weak supervision: sections, sentences, pathologies, locations, prompts.

Mirrors Vilouras et al., MIDL 2026, Sec. 3.1 / App. D (docs/paper.md section 3). The paper tags location
words with RadGraph-XL ("ANAT-DP" entities), a model we cannot ship; here a transparent rule-based
lexicon does the same job, and `load_radgraph_entities` accepts precomputed RadGraph-XL output instead.

Pipeline for one report: `report_sections` (FINDINGS / IMPRESSION, or the whole text when neither header
exists) -> `split_sentences` -> `scopes` (the NegEx reading: which pieces of a sentence are asserted, negated or
hedged; a negation runs over the list it introduces) -> `find_pathologies` (synonyms, plurals, pleural fluid named
by its place; hedged mentions dropped by default) -> `extract_locations` (lexicon, side/zone binding, coordinated
sides, symmetric merging) -> `standardise_prompt` ("{location} {pathology}", several locations joined with "and").
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
# Pathologies, and the scope of negation and hedge cues

# Pleural fluid named by its place instead of by "effusion": a blunted costophrenic angle, layering fluid, a meniscus,
# fluid in a fissure. Counted as Pleural Effusion wording; the side comes from the location words as usual.
FLUID_BY_PLACE = [
    r"blunt(?:ing|ed)(?: [\w-]+){0,4} costophrenic",                          # "blunting of the left costophrenic"
    r"costophrenic (?:angles?|sulc(?:us|i))(?: [\w-]+){0,3} blunt(?:ed|ing)",  # "costophrenic angle is blunted"
    r"fluid (?:at|in|within|along|filling) the(?: [\w-]+){0,2} costophrenic",  # "fluid at the right costophrenic"
    r"layering(?: [\w-]+){0,2} fluid", r"fluid layering",                     # "layering right pleural fluid"
    r"menisc(?:us|i)",                                                        # "a meniscus at the left base"
    r"fluid (?:in|within|along) the(?: [\w-]+){0,2} fissure", r"fissural fluid",
]
# NegEx (Chapman et al., 2001): a cue negates a span of the sentence, not the sentence. A pre-negation cue negates
# what FOLLOWS it ("left lower lobe atelectasis without effusion" keeps the atelectasis), and its scope runs on over
# the list it introduces ("no pneumothorax, effusion, or consolidation"); the other cues negate their whole clause
# ("pneumothorax is not seen").
PRE_NEGATION_CUES = [r"no(?! longer)", r"without", r"negative for", r"free of", r"absence of"]
NEGATION_CUES = [r"not", r"absent", r"rule[sd]? out", r"ruled out", r"no longer", r"removed", r"unlikely"]
# Not negations although they hold a cue word: the finding is still there ("no change in the right effusion").
PSEUDO_NEGATIONS = [r"no (?:[\w-]+ ){0,2}(?:change|increase|decrease|improvement|worsening|progression)",
                    r"not (?:[\w-]+ )?(?:changed|increased|decreased|improved|worsened)",
                    r"without (?:[\w-]+ ){0,2}change"]
# Hedges that leave the finding uncertain; find_pathologies(hedged=...) decides what they count as. Words that lean
# to the finding ("likely", "probable", "consistent with", "concerning for") are not hedges here: they assert.
HEDGE_CUES = [r"may", r"might", r"could", r"possibl[ey]", r"questionabl[ey]", r"equivocal", r"indeterminate",
              r"uncertain", r"versus", r"difficult to (?:exclude|rule out)",  # and "cannot (be entirely) excluded":
              r"(?:can ?not|could not|not) (?:be )?(?:[\w-]+ly )?(?:exclude[ds]?|rule[sd]? out)"]
# Resolution words refer back to the sentence's subject ("Previously seen opacity consistent with pneumonia
# has resolved"), so they cancel the whole sentence, not just their clause.
RESOLUTION_CUES = [r"resolved", r"resolving", r"resolution", r"cleared", r"clearing"]
# Where every scope ends (NegEx's termination words); commas are weaker: a list runs on over them.
TERMINATION = [r"[;:]", r"\bbut\b", r"\bhowever\b", r"\balthough\b", r"\bthough\b", r"\bwhile\b", r"\bwhereas\b",
               r"\bwith\b", r"\bexcept\b", r"\baside from\b", r"\bapart from\b", r"\bwhich\b"]
# Words that open a clause of their own rather than continue a list of negated findings ("no pneumothorax, small
# left effusion"): size and change words; determiners, "there" and hedges (_OPENERS); a side word or a verb.
_SIZE = {"small", "moderate", "large", "mild", "minimal", "minor", "trace", "tiny", "severe", "massive", "extensive",
         "subtle", "slight", "marked", "stable", "persistent", "persisting", "unchanged", "increased", "increasing",
         "decreased", "decreasing", "improved", "improving", "worsened", "worsening", "new", "residual", "patchy"}
_OPENERS = {"a", "an", "the", "there", "this", "these", "it", "its", "possible", "possibly", "likely", "probable",
                "probably", "questionable", "may", "could", "suspected"}
_SIDE_WORDS = {"left", "right", "bilateral", "bibasilar", "retrocardiac"}
_VERB = re.compile(r"\b(?:is|are|was|were|has|have|had|remains?|persists?|appears?|seen|noted|present|demonstrated)\b")


def _words(patterns):
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b")


_PRE_NEG, _NEG_CLAUSE, _PSEUDO, _HEDGE = (_words(PRE_NEGATION_CUES), _words(NEGATION_CUES), _words(PSEUDO_NEGATIONS),
                                          _words(HEDGE_CUES))
_RESOLVED = _words(RESOLUTION_CUES)
_BREAK = re.compile("|".join(TERMINATION))
_AND_CLAUSE = re.compile(r"\band (?=(?:" + "|".join(sorted(_SIZE | _OPENERS)) + r")\b)")  # "... and a small ..."
_PATHO = {p: re.compile(r"\b(?:" + "|".join(PATHOLOGY_SYNONYMS[p] + (FLUID_BY_PLACE if p == "Pleural Effusion" else []))
                        + r")\b") for p in PATHOLOGIES}
_SPECIFIC = ("Atelectasis", "Consolidation", "Edema", "Pneumonia", "Pleural Effusion", "Pneumothorax")


def _blank(text, pattern):
    """text with every match of pattern replaced by spaces (same length, so positions still line up)."""
    return pattern.sub(lambda m: " " * len(m.group()), text)


def _continues_list(piece, closed_later=False):
    """Does this piece, after a comma, continue the list a cue introduced ("no pneumothorax, effusion, or
    consolidation") rather than open a clause of its own ("no pneumothorax, small left effusion")?

    closed_later: a later piece of the clause begins with "or" / "nor", so this one sits inside a serial list and a
    size word does not open a clause ("no consolidation, large effusion, or pneumothorax")."""
    words = piece.split()
    conj = words[0] if words and words[0] in ("or", "and", "nor") else None
    item = words[1:] if conj else words
    if not item:
        return bool(conj)
    first = item[0].split("-")[0]
    if first in _OPENERS or (conj != "or" and not closed_later and first in _SIZE):  # "or large effusion" is listed
        return False
    return bool(conj) or (not _VERB.search(piece) and (closed_later or first not in _SIDE_WORDS))


def _negation_end(text, start):
    """Where a negation running from `start` stops inside one comma piece: at "and" opening a clause of its own
    ("no pneumothorax and a small left effusion"), else at the piece's end."""
    m = _AND_CLAUSE.search(text, start)
    return m.start() if m else len(text)


def scopes(sentence):
    """A sentence cut into pieces, each "asserted", "negated" or "uncertain" (hedged): the NegEx reading.

    Termination words and ; : end every scope. A comma does not end a list: a cue's status carries on over the comma
    pieces that continue its list, forwards ("no pneumothorax, effusion, or consolidation") and, for a clause-level
    cue at the list's end, backwards ("pleural effusion, pneumothorax, and consolidation are not seen").
    """
    pieces = []  # [text, status, joined to the piece before by a comma, a clause-level cue at a list's end]
    for clause in _BREAK.split(sentence.lower()):
        carry = None  # the status a cue passes on to the list items after it
        texts = [t.strip() for t in clause.split(",")]
        for k, text in enumerate(texts):
            if not text:
                continue
            masked = _blank(_blank(text, _PSEUDO), _HEDGE)  # "no change in", "not excluded": not negations
            hedged = _HEDGE.search(_blank(text, _PSEUDO)) is not None
            closed_later = any(t.split()[:1] in (["or"], ["nor"]) for t in texts[k + 1:])
            listed = carry is not None and _continues_list(text, closed_later)
            if _NEG_CLAUSE.search(masked):
                negated = [(0, len(text))]
            else:  # each pre-negation cue (and a negation carried over the list) negates what follows it
                negated = [(m.start(), _negation_end(text, m.start())) for m in _PRE_NEG.finditer(masked)]
                if listed and carry == "negated":
                    negated.append((0, _negation_end(text, 0)))
            free = "uncertain" if hedged or (listed and carry == "uncertain") else "asserted"
            cuts = sorted({0, len(text)} | {i for span in negated for i in span})
            first = len(pieces)
            for a, b in zip(cuts, cuts[1:]):
                if text[a:b].strip():
                    neg = any(s <= a and b <= e for s, e in negated)
                    pieces.append([text[a:b].strip(), "negated" if neg else free, k > 0 and a == 0, False])
            if text.split()[0] in ("or", "and", "nor") and (hedged or _NEG_CLAUSE.search(masked)):
                pieces[first][3] = True
            carry = pieces[-1][1] if pieces[-1][1] != "asserted" else None
    for i in range(len(pieces)):  # a clause-level cue at a list's end reaches back over the bare items before it
        j = i
        while (pieces[i][3] and pieces[j][2] and pieces[j - 1][1] == "asserted"
               and _continues_list(pieces[j - 1][0], closed_later=True)):
            pieces[j - 1][1] = pieces[i][1]
            j -= 1
    return [(text, status) for text, status, _, _ in pieces]


def mentions(text, pathology):
    return _PATHO[pathology].search(text) is not None


def is_negated(text):
    """True when the text carries a negation or resolution cue ("no", "without", "not", "resolved", ...), leaving
    aside pseudo-negations ("no change in") and hedges ("not excluded")."""
    masked = _blank(_blank(text.lower(), _PSEUDO), _HEDGE)
    return any(p.search(masked) for p in (_PRE_NEG, _NEG_CLAUSE, _RESOLVED))


HEDGED = ("drop", "keep")


def find_pathologies(sentence, scope="clause", hedged="drop"):
    """Pathologies a sentence asserts: named in a piece that is neither negated nor (by default) hedged.

    scope="clause" (default) reads negation the NegEx way (`scopes`): "Small left effusion, no pneumothorax." counts
    the effusion, "No pneumothorax, effusion, or consolidation." counts nothing. scope="sentence" is the paper's
    literal rule (skip the whole sentence if any negation cue appears).
    hedged: what a hedged mention ("may represent atelectasis", "cannot exclude pneumonia") counts as: "drop"
    (default: not asserted; weak supervision wants a clean set more than a large one) or "keep" (asserted).
    "Lung Opacity" is the generic word ("opacity concerning for pneumonia"): it only counts where no specific
    pathology is named, hedged or not ("left basilar opacity may represent atelectasis" asserts neither).
    """
    if hedged not in HEDGED:
        raise ValueError(f"hedged must be one of {list(HEDGED)}, got {hedged!r}")
    low = sentence.lower()
    if _RESOLVED.search(low):
        return []
    if scope == "sentence":
        pieces = [(low, "negated" if is_negated(low) else "uncertain" if _HEDGE.search(low) else "asserted")]
    else:
        pieces = scopes(sentence)
    found, named = [], []
    for text, status in pieces:
        if status == "negated":
            continue
        hits = [p for p in PATHOLOGIES if mentions(text, p)]
        if any(p in _SPECIFIC for p in hits) or "Cardiomegaly" in hits:
            hits = [p for p in hits if p != "Lung Opacity"]
        named += hits
        if status == "asserted" or hedged == "keep":
            found += [p for p in hits if p not in found]
    # generic opacity in a sentence that names a specific pathology elsewhere belongs to that pathology
    if "Lung Opacity" in found and any(p in _SPECIFIC for p in named):
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
_JOINERS = {"and", "or", "to", "&", "than"}  # "left and right lower lobes", "right greater than left effusions":
                                            # the zone distributes over both sides


def _joined(words, i):
    """Is side word i coordinated with the side before it? The word before, skipping size words ("large right and
    trace left effusions") and the "greater" / "less" of "right greater than left", is a joiner."""
    j = i - 1
    while j >= 0 and (words[j] in _SIZE or words[j] in ("greater", "less", "more")):
        j -= 1
    return j >= 0 and words[j] in _JOINERS


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
            elif g and g["side"] and g["zone"] is None and not g["pending"] and _joined(words, i):
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


def sentence_locations(sentence, pathology, hedged="drop"):
    """Locations that a sentence gives one of its pathologies: from the pieces that assert it when they name any
    ("right effusion with left basilar atelectasis" -> atelectasis: left base), else from all the sentence's asserted
    pieces ("retrocardiac opacity, likely atelectasis"). Negated pieces never give a location ("left effusion, no
    right pneumothorax"); hedged ones only with hedged="keep" (MS-CXR phrases: the box is the truth, the hedge moot)."""
    usable = [t for t, s in scopes(sentence) if s == "asserted" or (s == "uncertain" and hedged == "keep")]
    units = [t for t in usable if mentions(t, pathology)]
    # "right lower lobe pneumonia and left pleural effusion": cut a piece naming two pathologies at "and"
    units = [part for u in units for part in (_cut_at_and(u) if _n_pathologies(u) > 1 else [u])
             if mentions(part, pathology)]
    locs = []
    for u in units:
        locs += [loc for loc in extract_locations(u, pathology) if loc not in locs]
    if locs:
        return merge_symmetric([split_location(n) for n in locs])
    return extract_locations(", ".join(usable), pathology)


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
