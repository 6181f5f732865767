"""How clean is the weak supervision? The curated tuning set scored against the phantom world's answer key.

On MIMIC-CXR nobody knows which findings a study truly has; the phantom world does. grounding/phantom/world.py writes
root/truth.jsonl, one line per MIMIC-side study: {study_id, dicom_id, split, view, findings: [{pathology, location,
form}], hedged_absent: [{pathology, location}]}, where `form` says how the report words the finding (plain,
coordinated, fluid by place, likely, hedged) and `hedged_absent` the findings its report hedges without the study
having them ("Cannot exclude pneumonia."). A curated sample (grounding/data/curation.py) is a (study, pathology,
locations) claim; here it is checked against that truth:

  precision = samples whose study has that pathology at exactly that location / samples
  recall    = studies the curation could use (train split, an allowed view, exactly one true finding: the paper's
              rule applied to the truth) that got at least one correct sample / such studies

The data reports of train.py and evaluate.py print both (grounding/experiment/sources.py), with examples of every
kind of miss.
"""
import json
import os

from grounding.data.readers import DataReport


def read_truth(root):
    """{study_id: truth record} from root/truth.jsonl; a world without one (built before version 2) is an error."""
    path = os.path.join(root, "truth.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: this phantom world predates the answer key; delete {root} to "
                                "rebuild it")
    with open(path) as f:
        return {t["study_id"]: t for t in map(json.loads, f)}


def score_tuning_set(samples, records, truth, views, n_used=None):
    """(precision, recall, text for the data report): curated samples against the truth, every miss counted by kind.

    records: the MIMIC records the curation read (grounding/data/readers.py read_mimic, train split), for the views
    each study has. n_used: the first n_used samples are the ones tuned on (max_train_samples); their precision too.
    """
    report = DataReport("")  # counts and examples of every miss
    right = []               # per sample: does it name a true (pathology, location)?
    for s in samples:
        if s["study_id"] not in truth:
            raise ValueError(f"study {s['study_id']} is not in truth.jsonl: the answer key belongs to another world; "
                             "delete the phantom world's folder to rebuild it")
        found = [(f["pathology"], f["location"]) for f in truth[s["study_id"]]["findings"]]
        true_locations = [loc for p, loc in found if p == s["pathology"]]  # [] or one: a study's findings differ
        right.append(true_locations == list(s["locations"]))
        claim = f"s{s['study_id']} {s['prompt']!r} from {s['sentence']!r} (truth: {found})"
        if not true_locations:
            report.add("sample naming a pathology the study does not have", claim)
        elif not right[-1]:
            report.add("sample of a true pathology at a location it does not have", claim)
    good = {s["study_id"] for s, ok in zip(samples, right) if ok}
    allowed = {r["study_id"] for r in records if r.get("view") in views}
    usable = [st for st in sorted(allowed) if st in truth and len(truth[st]["findings"]) == 1]
    for st in usable:
        if st not in good:
            f = truth[st]["findings"][0]
            report.add(f"study with one finding and no correct sample ({f['form']} wording)",
                       f"s{st} {f['location']} {f['pathology']}")
    precision = sum(right) / len(samples) if samples else float("nan")
    recall = len(good & set(usable)) / len(usable) if usable else float("nan")
    head = (f"curated tuning set against the phantom world's truth (truth.jsonl): precision {precision:.3f} "
            f"({sum(right)} of {len(samples)} samples name a true (pathology, location)), recall {recall:.3f} "
            f"({len(good & set(usable))} of {len(usable)} studies with one finding and a {'/'.join(views)} image)")
    if n_used is not None and n_used < len(samples):
        head += f"; the first {n_used} (tuned on): precision {sum(right[:n_used]) / n_used:.3f}"
    return precision, recall, "\n".join([head] + str(report).splitlines()[1:])
