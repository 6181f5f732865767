"""The phantom chest X-ray world: a seeded, SYNTHETIC stand-in for MIMIC-CXR, MS-CXR, Chest ImaGenome and VinDr-CXR.

docs/phantom.md "The embedded default"; lessons from docs/phantom.md (the text must be needed to
denoise: findings vary in kind AND place, and the report names both). This file is the world as datasets:
its config, the per-case sampling of anatomy and findings (the 8 MS-CXR findings at anatomical locations), and the
writer of the REAL formats (docs/formats.md) so that grounding/data/readers.py reads it
exactly like the credentialed data. The report wording is grounding/phantom/wording.py; the drawing of each
frontal radiograph from a sampled case is grounding/phantom/render.py.

  root/world.json                          says SYNTHETIC; generator version, counts, paths, config
  root/truth.jsonl                         the answer key: every MIMIC-side study's true findings and locations
  root/mimic-cxr-jpg/files/p1X/p<subject>/s<study>/<dicom_id>.jpg + mimic-cxr-2.0.0-{metadata,split}.csv
  root/mimic-cxr-reports/files/p1X/p<subject>/s<study>.txt      FINDINGS / IMPRESSION free text
  root/ms-cxr/MS_CXR_Local_Alignment_v1.1.0.csv                  test pairs (images live in the MIMIC tree)
  root/chest-imagenome/silver_dataset/scene_graph/<dicom_id>_SceneGraph.json   gold subset anatomy boxes
  root/vindr-cxr/annotations_test.csv + test/<image_id>.png      out-of-distribution "scanner"

grounding/phantom/real.py `build_real_world` writes the same cases in the exact layouts of the credentialed releases
instead, traps included: the rehearsal of configs/mimic_monai.yaml (it imports this file; this file does not import
it).

Convention: radiological view, so the patient's RIGHT lung is on the image LEFT.
"""
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time

import numpy as np
from PIL import Image

from grounding.anatomy import PATHOLOGIES
from grounding.phantom.render import render_case
from grounding.phantom.wording import (LOCATION_MENU, TRUE_LOCATION, finding_phrase, hard_wording, pick, sentence,
                                      write_report)

SYNTHETIC_NOTICE = "SYNTHETIC phantom chest X-ray world (procedurally generated; no real patient data)"
# The generator's version, written to world.json: a world on disk built by another version is rebuilt (ensure_phantom).
#   1 (no "version" key): the easy report wording only, one negated finding per sentence
#   2: the hard report forms (wording.py SHARES) and the answer key truth.jsonl; images, boxes and phrases as in 1
WORLD_VERSION = 2
# What build_world writes at the top of a world (and build_normal_set adds later): nothing else is ever deleted.
WORLD_ENTRIES = ("world.json", "truth.jsonl", "mimic-cxr-jpg", "mimic-cxr-reports", "ms-cxr", "chest-imagenome",
                 "vindr-cxr", "classify-normals")


@dataclasses.dataclass
class PhantomConfig:
    seed: int = 0
    n_train: int = 3000          # MIMIC-style training studies (one frontal image each)
    n_validate: int = 60
    n_test: int = 300            # MS-CXR-format test studies (one pair each, a few with two)
    n_vindr: int = 200           # VinDr-style out-of-distribution images
    n_gold: int = 200            # training images that also get an ImaGenome scene graph
    size: int = 256              # short image side in pixels; some images are taller or wider
    nonsquare_frac: float = 0.3
    normal_frac: float = 0.15    # studies without any finding
    multi_frac: float = 0.1      # studies with two findings (the curation drops them)
    unlocated_frac: float = 0.08  # MS-CXR phrases without location words (MS-CXR-loc drops them)
    workers: int = 2

    @classmethod
    def tiny(cls, **kw):
        return cls(**{**dict(n_train=16, n_validate=2, n_test=10, n_vindr=6, n_gold=6, size=96, workers=1), **kw})




# ---------------------------------------------------------------------------------------------------
# Case sampling (all randomness is drawn here, from a per-case seed, so rendering is a pure function)

_KIND = {"train": 1, "validate": 2, "test": 3, "vindr": 4, "normal": 5}  # "normal": the classification set (own seeds)


def _render_zones(pathology, location):
    """Location name -> [(side, zone)] the finding is drawn in (base/pleural -> lower, lingular -> left middle)."""
    if location in ("pulmonary", "bilateral") or location == "cardiomegaly":
        zone = "lower" if pathology == "Pleural Effusion" and location == "bilateral" else ""
        return [("right", zone), ("left", zone)]
    special = {"bibasilar": ("bilateral", "lower"), "lingular": ("left", "middle"), "retrocardiac": ("left", "lower")}
    side, zone = special.get(location) or tuple(location.partition(" ")[::2])
    zone = {"base": "lower", "pleural": "lower"}.get(zone, zone)
    if zone == "" and pathology == "Pleural Effusion":
        zone = "lower"
    sides = ["right", "left"] if side == "bilateral" else [side]
    return [(s, zone) for s in sides]


def _ids(seed, kind, index):
    h = hashlib.sha1(f"{seed}/{kind}/{index}".encode()).hexdigest()
    subject = 10000000 + _KIND[kind] * 1000000 + index  # p1X folders, like MIMIC
    study = 50000000 + _KIND[kind] * 1000000 + index
    dicom = "-".join(h[i:i + 8] for i in range(0, 40, 8))
    return str(subject), str(study), dicom if kind != "vindr" else h[:32]


def sample_case(cfg, kind, index):
    """All parameters of one case: ids, size, anatomy, findings (with report text), noise seed."""
    rng = np.random.default_rng([cfg.seed, _KIND[kind], index])
    subject, study, dicom = _ids(cfg.seed, kind, index)
    W = H = cfg.size
    if rng.random() < cfg.nonsquare_frac:
        H = int(cfg.size * pick(rng, [1.125, 1.25]))
    if kind == "vindr":  # another "scanner": taller detector, harder gamma, more noise, collimation border
        W, H = int(cfg.size * 1.1), int(cfg.size * 1.25)
    vindr = kind == "vindr"
    anat = dict(W=W, H=H, cx=W * (0.5 + rng.uniform(-0.03, 0.03)), top=H * rng.uniform(0.1, 0.15),
                lung_h=H * 0.6 * rng.uniform(0.92, 1.05), half=W * 0.37 * rng.uniform(0.92, 1.05),
                gap=W * 0.06 * rng.uniform(0.9, 1.2), rot=np.deg2rad(rng.uniform(-4, 4)),
                heart_rx=W * 0.14 * rng.uniform(0.9, 1.1), heart_ry=H * 0.11 * rng.uniform(0.9, 1.1),
                lung_dens=rng.uniform(0.3, 0.4), ribs=rng.uniform(0.025, 0.05),
                gamma=rng.uniform(1.4, 1.8) if vindr else rng.uniform(0.85, 1.15),
                contrast=rng.uniform(0.75, 0.9) if vindr else rng.uniform(0.9, 1.1),
                noise=rng.uniform(0.03, 0.05) if vindr else rng.uniform(0.008, 0.02),
                border=int(W * rng.uniform(0.02, 0.05)) if vindr else 0, tex_seed=int(rng.integers(2**31)))
    r = rng.random()
    n_find = 1 if kind in ("test", "vindr") else (0 if r < cfg.normal_frac else 2 if r > 1 - cfg.multi_frac else 1)
    if kind == "vindr" and rng.random() < cfg.normal_frac:
        n_find = 0
    if kind == "normal":  # held-out "No Finding" test studies (build_normal_set); no other kind's draws change
        n_find = 0
    findings = []
    choices = [p for p in PATHOLOGIES if not (vindr and p == "Edema")]  # VinDr test has no edema (paper)
    wrng = np.random.default_rng([cfg.seed, _KIND[kind], index, 1])  # the hard wording's own stream (wording.py)
    for p in rng.permutation(choices)[:n_find]:
        loc = pick(rng, LOCATION_MENU[p])
        located = not (kind == "test" and p != "Cardiomegaly" and rng.random() < cfg.unlocated_frac)
        phrase = finding_phrase(rng, p, loc, located)
        f = dict(pathology=str(p), location=loc, phrase=phrase, sentence=sentence(rng, phrase),
                 zones=_render_zones(p, loc), seed=int(rng.integers(2**31)), located=located)
        f["form"], f["body"], f["impression"] = hard_wording(wrng, f)  # how the REPORT says it (the phrase: MS-CXR)
        findings.append(f)
    resolved = None
    if rng.random() < 0.1:
        gone = [p for p in ("Pneumonia", "Atelectasis", "Consolidation") if p not in {f["pathology"] for f in findings}]
        resolved = finding_phrase(rng, gone[0], pick(rng, LOCATION_MENU[gone[0]]))
    report, hedged_absent = write_report(rng, findings, resolved, wrng)
    return dict(kind=kind, index=index, subject_id=subject, study_id=study, dicom_id=dicom, anat=anat,
                findings=findings, report=report, hedged_absent=hedged_absent, noise_seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------------------------------------------
# Writing the world in the real formats

def _render_job(job):
    case, path = job
    img, info = render_case(case)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(np.round(img * 255).astype(np.uint8))
    im.save(path, quality=95) if path.endswith(".jpg") else im.save(path)
    return info


def _write_csv(path, header, rows):
    import csv
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _scene_graph(case, anatomy, rng):
    """An ImaGenome-style scene graph; ~10% of graphs get boxes poking outside the image, as real ones do."""
    W, H = case["anat"]["W"], case["anat"]["H"]
    objects, f224 = [], 224 / max(W, H)
    for name, (x1, y1, x2, y2) in anatomy.items():
        if rng.random() < 0.1:
            x1, y2 = x1 - int(rng.integers(1, 6)), y2 + int(rng.integers(1, 6))
        objects.append(dict(object_id=f"{case['dicom_id']}_{name}", bbox_name=name, name=name.title(), synsets=[],
                            x1=round(x1 * f224), y1=round(y1 * f224), x2=round(x2 * f224), y2=round(y2 * f224),
                            width=round((x2 - x1) * f224), height=round((y2 - y1) * f224),
                            original_x1=x1, original_y1=y1, original_x2=x2, original_y2=y2,
                            original_width=x2 - x1, original_height=y2 - y1))
    attributes = [dict(bbox_name="lungs", phrases=[f["sentence"]],
                       attributes=[[f"anatomicalfinding|yes|{f['pathology'].lower()}"]]) for f in case["findings"]]
    return dict(image_id=case["dicom_id"], patient_id=case["subject_id"], study_id=case["study_id"],
                viewpoint="PA", objects=objects, attributes=attributes, relationships=[])


def build_world(root, config=None):
    """Generate the phantom world under `root` in the real dataset formats (the quickstart's flat tree above);
    returns a summary dict. The releases' exact layouts: grounding/phantom/real.py `build_real_world`."""
    cfg = config or PhantomConfig()
    t0 = time.time()
    mimic, reps = os.path.join(root, "mimic-cxr-jpg"), os.path.join(root, "mimic-cxr-reports")
    cases = [sample_case(cfg, k, i) for k, n in (("train", cfg.n_train), ("validate", cfg.n_validate),
                                                 ("test", cfg.n_test), ("vindr", cfg.n_vindr)) for i in range(n)]
    jobs = []
    for c in cases:
        s = c["subject_id"]
        if c["kind"] == "vindr":
            c["rel_path"] = os.path.join("test", c["dicom_id"] + ".png")
            jobs.append((c, os.path.join(root, "vindr-cxr", c["rel_path"])))
        else:
            c["rel_path"] = os.path.join("files", f"p{s[:2]}", f"p{s}", f"s{c['study_id']}", c["dicom_id"] + ".jpg")
            jobs.append((c, os.path.join(mimic, c["rel_path"])))
    if cfg.workers > 1:
        with multiprocessing.get_context("fork").Pool(cfg.workers) as pool:
            infos = pool.map(_render_job, jobs, chunksize=32)
    else:
        infos = [_render_job(j) for j in jobs]

    meta, split, mscxr, vindr, truth = [], [], [], [], []
    rng = np.random.default_rng([cfg.seed, 99])
    n_gold = 0
    for c, info in zip(cases, infos):
        a, s = c["anat"], c["subject_id"]
        if c["kind"] == "vindr":
            names = {"Pleural Effusion": "Pleural effusion"}  # VinDr's own spelling
            for f, boxes in zip(c["findings"], info["boxes"]):
                vindr += [[c["dicom_id"], names.get(f["pathology"], f["pathology"]), x, y, x + w, y + h]
                          for x, y, w, h in boxes]
            if not c["findings"]:
                vindr.append([c["dicom_id"], "No finding", "", "", "", ""])
            continue
        view = "PA" if rng.random() < 0.7 else "AP"
        meta.append([c["dicom_id"], s, c["study_id"], f"CHEST ({view} AND LAT)", view, a["H"], a["W"], "21800101",
                     "120000.000", f"CHEST ({view} AND LAT)", "postero-anterior" if view == "PA" else "antero-posterior",
                     "Erect"])
        split.append([c["dicom_id"], c["study_id"], s, c["kind"]])
        true = [dict(pathology=f["pathology"], location=TRUE_LOCATION.get(f["location"], f["location"]), form=f["form"])
                for f in c["findings"]]  # "retrocardiac" is written, "left lower" is meant
        truth.append(dict(study_id=c["study_id"], dicom_id=c["dicom_id"], split=c["kind"], view=view, findings=true,
                          hedged_absent=[dict(pathology=p, location=loc) for p, loc in c["hedged_absent"]]))
        rp = os.path.join(reps, "files", f"p{s[:2]}", f"p{s}", f"s{c['study_id']}.txt")
        os.makedirs(os.path.dirname(rp), exist_ok=True)
        with open(rp, "w") as fh:
            fh.write(c["report"])
        if c["kind"] == "test":
            sp = "val" if c["index"] % 7 == 0 else "test"
            for f, boxes in zip(c["findings"], info["boxes"]):
                mscxr += [[c["dicom_id"], f["pathology"], f["phrase"], c["rel_path"], x, y, w, h, a["W"], a["H"], sp]
                          for x, y, w, h in boxes]
        if c["kind"] == "train" and n_gold < cfg.n_gold:
            sg = os.path.join(root, "chest-imagenome", "silver_dataset", "scene_graph", f"{c['dicom_id']}_SceneGraph.json")
            os.makedirs(os.path.dirname(sg), exist_ok=True)
            with open(sg, "w") as fh:
                json.dump(_scene_graph(c, info["anatomy"], rng), fh)
            n_gold += 1
    _write_csv(os.path.join(mimic, "mimic-cxr-2.0.0-metadata.csv"),
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"], meta)
    _write_csv(os.path.join(mimic, "mimic-cxr-2.0.0-split.csv"), ["dicom_id", "study_id", "subject_id", "split"], split)
    _write_csv(os.path.join(root, "ms-cxr", "MS_CXR_Local_Alignment_v1.1.0.csv"),
               ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height",
                "split"], mscxr)
    _write_csv(os.path.join(root, "vindr-cxr", "annotations_test.csv"),
               ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"], vindr)
    with open(os.path.join(root, "truth.jsonl"), "w") as fh:  # the answer key (grounding/phantom/truth.py)
        fh.writelines(json.dumps(t) + "\n" for t in truth)
    summary = dict(synthetic=True, notice=SYNTHETIC_NOTICE, version=WORLD_VERSION, config=dataclasses.asdict(cfg),
                   paths=dict(mimic="mimic-cxr-jpg", reports="mimic-cxr-reports", truth="truth.jsonl",
                              mscxr="ms-cxr/MS_CXR_Local_Alignment_v1.1.0.csv",
                              imagenome="chest-imagenome/silver_dataset/scene_graph",
                              vindr_csv="vindr-cxr/annotations_test.csv", vindr_images="vindr-cxr/test"),
                   counts=dict(images=len(cases), mimic_images=len(meta), mscxr_rows=len(mscxr),
                               vindr_rows=len(vindr), scene_graphs=n_gold),
                   build_seconds=round(time.time() - t0, 2))
    with open(os.path.join(root, "world.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


def _read_world_json(root):
    """root/world.json as a dict when it reads and holds config.seed and notice, else None (no file, or a broken
    one: an interrupted copy, say)."""
    path = os.path.join(root, "world.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            w = json.load(fh)
    except ValueError:  # not JSON, or not text
        return None
    whole = isinstance(w, dict) and "notice" in w and isinstance(w.get("config"), dict) and "seed" in w["config"]
    return w if whole else None


def world_notice(root):
    """The line every consumer prints: what data this is (raises if root is not a phantom world)."""
    path = os.path.join(root, "world.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: build the world first (grounding.phantom.build_world)")
    w = _read_world_json(root)
    if w is None:
        raise ValueError(f"{path} is not a whole phantom world.json (unreadable, or without config.seed or notice): "
                         f"delete {root} to rebuild the world")
    return f"[data] {w['notice']} at {root}, seed {w['config']['seed']}"


CHEXPERT_COLUMNS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                    "Pneumothorax", "Support Devices"]


def build_normal_set(root, n):
    """The "No Finding" test images of the grounded classification (paper App. K), as a SEPARATE small
    MIMIC-CXR-JPG tree at root/classify-normals (images, reports, metadata, split and chexpert CSVs in the real
    formats), so that the classification reads it with the real readers and no file of the world changes.

    Why new cases: the world's own normal studies are training images the phantom LDM was pretrained on (with
    normal captions), and its test studies all carry a finding. These are drawn like any other study (the
    world's config), from their own per-case seeds (kind "normal"), with no finding. Rebuilt when n changes.
    """
    out = os.path.join(root, "classify-normals")
    marker = os.path.join(out, "normals.json")
    with open(os.path.join(root, "world.json")) as fh:
        cfg = PhantomConfig(**json.load(fh)["config"])
    if os.path.exists(marker):
        with open(marker) as fh:
            done = json.load(fh)
        if done["n"] == n and done["seed"] == cfg.seed:
            return out
    print(f"building {n} phantom 'No Finding' test images (SYNTHETIC) into {out} ...")
    cases = [sample_case(cfg, "normal", i) for i in range(n)]
    meta, split, labels = [], [], []
    for c in cases:
        s, a = c["subject_id"], c["anat"]
        rel = os.path.join("files", f"p{s[:2]}", f"p{s}", f"s{c['study_id']}")
        _render_job((c, os.path.join(out, rel, c["dicom_id"] + ".jpg")))
        with open(os.path.join(out, rel + ".txt"), "w") as fh:
            fh.write(c["report"])
        meta.append([c["dicom_id"], s, c["study_id"], "PA", a["H"], a["W"]])
        split.append([c["dicom_id"], c["study_id"], s, "test"])
        labels.append([s, c["study_id"]] + ["1.0" if col == "No Finding" else "" for col in CHEXPERT_COLUMNS])
    _write_csv(os.path.join(out, "mimic-cxr-2.0.0-metadata.csv"),
               ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"], meta)
    _write_csv(os.path.join(out, "mimic-cxr-2.0.0-split.csv"), ["dicom_id", "study_id", "subject_id", "split"], split)
    _write_csv(os.path.join(out, "mimic-cxr-2.0.0-chexpert.csv"), ["subject_id", "study_id"] + CHEXPERT_COLUMNS,
               labels)
    with open(marker, "w") as fh:
        json.dump(dict(notice=SYNTHETIC_NOTICE, seed=cfg.seed, n=n, kind="normal"), fh)
    return out


def _complete(root, seed):
    """A whole world of this seed, built by this generator version (world.json is written last)."""
    w = _read_world_json(root)
    return w is not None and w["config"]["seed"] == seed and w.get("version", 1) == WORLD_VERSION


def _stale_version(root, seed):
    """The generator version of an OLDER phantom world of this seed in root, when its world.json proves it is one
    (synthetic, our notice, the phantom layout); else None."""
    w = _read_world_json(root)
    if (w is None or w["config"]["seed"] != seed or w.get("synthetic") is not True or w["notice"] != SYNTHETIC_NOTICE
            or w.get("layout", "phantom") != "phantom" or w.get("version", 1) == WORLD_VERSION):
        return None
    return w.get("version", 1)


def ensure_phantom(root, seed=0):
    """Build the phantom world into `root` unless a complete one with this seed and generator version is there.

    A world of an older generator version (world.json says so) is generated data that no longer matches the code (its
    reports, its answer key): it is rebuilt, once world.json proves the folder is a phantom world and the folder holds
    nothing the builder does not write (anything else: refused, nothing deleted). The world is built in a temporary
    folder beside `root` and renamed into place, so a process reading `root` (another torchrun rank, say) never sees
    a half-written tree, and an interrupted rebuild leaves the old world as it was.
    """
    if _complete(root, seed):
        return root
    stale = _stale_version(root, seed)
    if stale is not None:
        foreign = sorted(set(os.listdir(root)) - set(WORLD_ENTRIES))
        if foreign:
            raise FileExistsError(f"phantom_root {root} holds a phantom world of generator version {stale} (this "
                                  f"code writes version {WORLD_VERSION}) and also {foreign}, which a world never "
                                  "holds: move them out to have the world rebuilt, or set phantom_root to a new folder")
        print(f"{root} holds a phantom world of generator version {stale}; this code writes version {WORLD_VERSION} "
              "(grounding/phantom/world.py WORLD_VERSION): it is generated data, rebuilding it")
    elif os.path.exists(root) and os.listdir(root):   # never build over (or delete) a folder we did not finish
        raise FileExistsError(f"phantom_root {root} holds something other than the phantom world of seed {seed} "
                              "(another seed's world, an interrupted build or a broken world.json): delete it, or set "
                              "phantom_root to a new folder")
    print(f"building the phantom world (SYNTHETIC) into {root} ...")
    tmp = f"{os.path.abspath(root)}.building-{os.getpid()}"
    summary = build_world(tmp, PhantomConfig(seed=seed))
    if _complete(root, seed):            # another process (torchrun rank) finished the same world first
        shutil.rmtree(tmp)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
        old = f"{os.path.abspath(root)}.stale-{os.getpid()}"
        if stale is not None:
            os.rename(root, old)         # the old world set aside, replaced by one rename, then deleted
        elif os.path.isdir(root):
            os.rmdir(root)               # the empty folder checked above
        os.rename(tmp, root)
        if stale is not None:
            shutil.rmtree(old)
    print(f"built {summary['counts']['images']} images in {summary['build_seconds']}s")
    return root
