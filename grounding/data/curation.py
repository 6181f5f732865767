"""Weak supervision from the records of grounding/data/readers.py: the curated tuning set, MS-CXR-loc, VinDr prompts.

Method: docs/paper.md sections 3 (weak supervision: report sentences -> location + pathology prompts) and 8
(evaluation sets: MS-CXR-loc, VinDr-CXR with synthesised prompts). Records are plain dicts (ARCHITECTURE.md
"Grounding data records"); a tuning sample is: dicom_id, subject_id, study_id, image_path, pathology,
locations, prompt, sentence. Every step returns or fills a DataReport: nothing is dropped without being counted.
"""
import collections
import os

from grounding.data import reports as rp
from grounding.anatomy import box_gaussian
from grounding.data.vindr import nearest_location, SINGLE_BOX_LOCATIONS
from grounding.data.readers import DataReport
from grounding.metrics import box_edges
from grounding.geometry import box_to_model, crop_window


def read_report(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def positive_sentences(text, scope="clause", hedged="drop"):
    """[(sentence, [pathologies it asserts])] for the FINDINGS + IMPRESSION sentences of one report."""
    return [(s, rp.find_pathologies(s, scope, hedged)) for s in rp.split_sentences(rp.report_body(text))]


FRONTAL_VIEWS = ("PA", "AP")


def check_views(views):
    """The `views` setting: a non-empty list drawn from PA and AP (lateral images never enter the tuning set)."""
    bad = [v for v in views if v not in FRONTAL_VIEWS]
    if not views or bad:
        raise ValueError(f"config key 'views': expected a non-empty list of {list(FRONTAL_VIEWS)} (frontal views only; "
                         f"lateral images never enter the tuning set), got {list(views)}")
    return tuple(views)


def curate_tuning_set(mimic_records, exclude_subjects=(), scope="clause", views=("PA",), hedged="drop"):
    """The paper's fine-tuning set (Sec. 3.1): studies with exactly one of the 8 pathologies.

    mimic_records: from read_mimic (all views; filter splits there, e.g. splits=("train",)).
    exclude_subjects: subject ids to leave out (MS-CXR patients: grounding/data/readers.py `mscxr_subjects`).
    views: the allowed ViewPosition values, in order of preference: PA only by default (the MONAI CXR LDM was
    trained on PA images), ("PA", "AP") to also allow AP; a study without an allowed view is skipped and counted.
    scope, hedged: how negation and hedges are read (grounding/data/reports.py find_pathologies): by default a
    hedged mention ("cannot exclude pneumonia") asserts nothing, so it neither makes a sample nor a second pathology.
    One image per study (the first allowed view, then the lowest dicom_id); one sample per distinct prompt of the
    study's positive sentences. Returns (samples, DataReport) with every dropped study counted by reason.
    """
    views = check_views(views)
    report = DataReport(f"curated tuning set (views {'/'.join(views)})")
    excluded = {str(s) for s in exclude_subjects}
    studies = collections.OrderedDict()
    for r in mimic_records:
        studies.setdefault((r["subject_id"], r["study_id"]), []).append(r)
    out = []
    for (subject_id, study_id), imgs in studies.items():
        if str(subject_id) in excluded:
            report.add("study of an excluded (MS-CXR) patient")
            continue
        allowed = [r for r in imgs if r.get("view") in views]
        if not allowed:
            seen = sorted({r.get("view") or "(empty)" for r in imgs})
            report.add(f"study without a {'/'.join(views)} image (skipped)", f"s{study_id}: {', '.join(seen)}")
            continue
        img = min(allowed, key=lambda r: (views.index(r["view"]), r["dicom_id"]))
        if not os.path.exists(img["report_path"]):
            report.add("report file missing", img["report_path"])
            continue
        sents = positive_sentences(read_report(img["report_path"]), scope, hedged)
        found = {p for _, ps in sents for p in ps}
        if len(found) != 1:
            report.add("no pathology" if not found else "several pathologies")
            continue
        (pathology,) = found
        prompts = []
        for sentence, ps in sents:
            if pathology not in ps:
                continue
            locs = rp.sentence_locations(sentence, pathology, hedged)
            if not locs:
                report.add(f"sentence without location ({pathology})", sentence)
                continue
            prompt = rp.standardise_prompt(locs, pathology)
            if prompt in prompts:
                continue
            prompts.append(prompt)
            out.append(dict(dicom_id=img["dicom_id"], subject_id=subject_id, study_id=study_id,
                            image_path=img["image_path"], view=img.get("view"), pathology=pathology, locations=locs,
                            prompt=prompt, sentence=sentence))
        if not prompts:
            report.add("study without any located sentence")
    report.kept = len(out)
    return out, report


def class_counts(pairs):
    """Pairs per class, e.g. "Atelectasis 55, Cardiomegaly 333, ... = 1,043" (printed in every table header)."""
    counts = collections.Counter(p["category"] for p in pairs)
    return ", ".join(f"{c} {n:,}" for c, n in sorted(counts.items())) + f" = {len(pairs):,}"


def mscxr_loc(pairs):
    """MS-CXR -> MS-CXR-loc (docs/paper.md section 8): keep pairs whose phrase names a location, prompt rewritten
    to "{location} {pathology}". Dropped pairs are counted per class. A hedged phrase ("possible left effusion") still
    gives its location: the box says the finding is there."""
    report = DataReport("MS-CXR-loc")
    out = []
    for p in pairs:
        locs = rp.sentence_locations(p["phrase"], p["category"], hedged="keep")
        if not locs:
            report.add(f"no location: {p['category']}", p["phrase"])
            continue
        out.append(dict(p, locations=locs, prompt=rp.standardise_prompt(locs, p["category"])))
    report.kept = len(out)
    return out, report


def drop_cropped_boxes(pairs, size, name="grounding pairs"):
    """Drop every box lying wholly in the band the centre crop cuts away, and every pair left with no box.

    Such a box has no pixel in the model's size x size view, so the heatmap mapped back to the original image is
    NaN over all of it and no metric can score it; the predecessor's loader drops it the same way. A box that only
    reaches into the band is kept whole. A box narrower than a pixel once its edges are rounded (the metrics' pixel
    grid) is dropped too. Every drop is counted in the returned DataReport.
    """
    report = DataReport(f"{name}, boxes inside the centre crop")
    out = []
    for p in pairs:
        W, H = p["image_width"], p["image_height"]
        ox, oy, m = crop_window(W, H, size)
        kept = []
        for b in p["boxes"]:
            x0, y0, x1, y1 = box_edges(b, (H, W))
            if x1 <= x0 or y1 <= y0:
                report.add("box without a whole pixel after rounding (dropped)", f"{p['pair_id']} {tuple(b)}")
            elif x0 < ox + m and x1 > ox and y0 < oy + m and y1 > oy:
                kept.append(b)
            else:
                report.add("box wholly in the cropped-away band (dropped)", f"{p['pair_id']} {tuple(b)}")
        if not kept:
            report.add("pair with no box left in the crop (dropped)", p["pair_id"])
            continue
        out.append(dict(p, boxes=kept) if len(kept) < len(p["boxes"]) else p)
    report.kept = len(out)
    return out, report


def vindr_prompts(pairs, lut, frame=512, mode="crop", merge=True):
    """Synthesise VinDr prompts (docs/paper.md section 8): each box -> its Gaussian in the 512 frame -> nearest
    LUT location (squared 2-Wasserstein) -> "{location} {class}", boxes joined with "and".

    Cardiomegaly boxes get "cardiomegaly"; other classes match single-region locations only (not the heart).
    merge: fold "left X and right X" into "bilateral X" (the vocabulary the prompts were tuned on).
    mode must match the LUT's (anatomy.build_lut): "crop" = model preprocessing, "stretch" = x/y scaled.
    """
    out = []
    for p in pairs:
        W, H = p["image_width"], p["image_height"]
        locs = []
        for b in p["boxes"]:
            if p["category"] == "Cardiomegaly":
                loc = "cardiomegaly"
            else:
                if mode == "crop":
                    x, y, w, h = box_to_model(b, W, H, frame)
                else:
                    x, y, w, h = b[0] * frame / W, b[1] * frame / H, b[2] * frame / W, b[3] * frame / H
                loc = nearest_location(box_gaussian((x, y, x + w, y + h)), lut, SINGLE_BOX_LOCATIONS)
            if loc not in locs:
                locs.append(loc)
        if merge:
            locs = rp.merge_symmetric([rp.split_location(n) for n in locs])
        out.append(dict(p, locations=locs, prompt=rp.standardise_prompt(locs, p["category"])))
    return out
