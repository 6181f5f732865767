"""Where an experiment's data comes from: the embedded phantom world or the credentialed datasets.

One function, `load(cfg)`, turns a train.py / evaluate.py config into everything both scripts need, read through
the SAME readers and curation for both sources (grounding/data/readers.py, grounding/data/curation.py): the curated tuning
samples (MIMIC-CXR reports, MS-CXR patients excluded), the location -> Gaussian LUT (Chest ImaGenome gold boxes),
and the grounding splits (MS-CXR, MS-CXR-loc, VinDr-CXR with synthesised prompts). Every skipped record is counted
in `report`, and `description` says which data this is: synthetic data is never passed off as real. On the phantom
world the report also scores the curated tuning set against the world's answer key (grounding/phantom/truth.py).
"""
import collections
import dataclasses
import json
import os

from grounding.data import curation as cu
from grounding.data import readers as ds
from grounding.data.imagenome import read_gold_ids, read_imagenome, read_imagenome_gold_csv
from grounding.data.vindr import read_vindr
from grounding.phantom import world as phantom
from grounding.anatomy import build_lut
from grounding.data.lut import load_lut, save_lut
from grounding.phantom.real import world_notice_for
from grounding.phantom.truth import read_truth, score_tuning_set
from grounding.data.images import preprocess
from grounding.phantom.world import ensure_phantom


@dataclasses.dataclass
class Data:
    description: str          # what data this is (printed by every script)
    samples: list             # curated tuning samples (dicts: image_path, prompt, locations, pathology, ...)
    lut: dict                 # location -> [(mu_x, mu_y, sigma_x, sigma_y)] in the 512 frame
    mscxr: list               # the scored MS-CXR pairs (config key mscxr_split), their own phrase as the prompt
    mscxr_loc: list           # MS-CXR-loc pairs of that subset: located phrases, standardised prompts
    val_pairs: list           # MS-CXR-loc pairs for the short validation during tuning (see val_note)
    vindr: list               # VinDr-CXR test pairs with synthesised prompts ([] when not configured)
    report: str               # counts of everything dropped, by reason
    val_note: str = ""        # what the validation pairs are, and whether the final table scores them too
    lut_writer: object = None  # writes the LUT built here (load(write_lut=False) leaves that to the caller)

    def save_lut(self):
        if self.lut_writer:
            self.lut_writer()

    @property
    def test_pairs(self):
        """What train.py's final table scores: the MS-CXR-loc pairs (standardised prompts)."""
        return self.mscxr_loc

    def pairs(self, split):
        """The pairs of an evaluate.py split (mscxr, mscxr-loc, phantom, vindr)."""
        table = {"mscxr": self.mscxr, "mscxr-loc": self.mscxr_loc, "phantom": self.mscxr_loc, "vindr": self.vindr}
        if not table[split]:
            raise ValueError(f"split {split!r} has no pairs here ({self.description}); check the config's paths")
        return table[split]

    @staticmethod
    def image(sample, image_cfg):
        return preprocess(sample["image_path"], image_cfg)


def _paths(cfg):
    """(mimic root, reports root, MS-CXR CSV, ImaGenome gold CSV or scene-graph dir, VinDr CSV, VinDr image dir,
    description)."""
    if cfg.data == "phantom":
        root = ensure_phantom(cfg.phantom_root, cfg.phantom_seed)
        j = lambda *p: os.path.join(root, *p)
        return (j("mimic-cxr-jpg"), j("mimic-cxr-reports"), j("ms-cxr", "MS_CXR_Local_Alignment_v1.1.0.csv"),
                j("chest-imagenome", "silver_dataset", "scene_graph"), j("vindr-cxr", "annotations_test.csv"),
                j("vindr-cxr", "test"), phantom.world_notice(root))
    if cfg.data == "mimic":
        missing = [k for k in ("mimic_root", "reports_root", "mscxr_csv") if not getattr(cfg, k)]
        if missing:
            raise ValueError(f"data: mimic needs the config keys {missing} (see configs/mimic_monai.yaml)")
        if cfg.vindr_csv and not os.path.exists(cfg.vindr_csv):  # empty = VinDr-CXR not configured
            raise ValueError(f"config key vindr_csv: {cfg.vindr_csv} not found; correct the path, or leave vindr_csv "
                             "empty to run without VinDr-CXR")
        if cfg.vindr_csv and cfg.vindr_images and not os.path.isdir(cfg.vindr_images):
            raise ValueError(f"config key vindr_images: folder {cfg.vindr_images} not found (the VinDr-CXR test "
                             "images, <image_id>.png)")
        # a phantom world written in the real layout (grounding/phantom/real.py) is still named as synthetic
        notice = world_notice_for(cfg.mimic_root)
        return (cfg.mimic_root, cfg.reports_root, cfg.mscxr_csv, cfg.imagenome_root, cfg.vindr_csv, cfg.vindr_images,
                notice or f"[data] MIMIC-CXR-JPG {cfg.mimic_root} + MS-CXR {cfg.mscxr_csv} (real)")
    raise ValueError(f"config key 'data': expected 'phantom' or 'mimic', got {cfg.data!r}")


def _lut(cfg, imagenome, mimic_records, out_dir):
    """The saved LUT if there is one, else built from the Chest ImaGenome gold boxes (to be saved in out_dir).

    imagenome: the gold CSV (gold_bbox_coordinate_annotations_1000images.csv) or a folder of *_SceneGraph.json
    (restricted to the ids in cfg.imagenome_gold_ids when that is set). Returns (lut, lines for the data report,
    save: a function that writes a built LUT, or None): load() saves it only once all the data has been read.
    """
    if cfg.lut_path and os.path.exists(cfg.lut_path):
        lut = load_lut(cfg.lut_path)  # checks the file before its provenance keys are read here
        with open(cfg.lut_path) as f:
            saved = json.load(f)
        return lut, (f"LUT {cfg.lut_path} (saved earlier; delete it to rebuild from {imagenome}), "
                     f"built from {saved.get('source', 'an unrecorded source')}\n"
                     f"  boxes averaged per region: {saved.get('boxes_per_region', '(not recorded)')}"), None
    if not imagenome:
        raise ValueError("no LUT: set the config key imagenome_root (the Chest ImaGenome gold CSV or a scene-graph "
                         "folder) or lut_path (a saved LUT)")
    if not os.path.exists(imagenome):
        raise FileNotFoundError(f"config key imagenome_root: {imagenome} not found (the Chest ImaGenome gold CSV or a "
                                "folder of <dicom_id>_SceneGraph.json)")
    sizes = {r["dicom_id"]: (r["image_width"], r["image_height"]) for r in mimic_records}
    if os.path.isfile(imagenome):
        if getattr(cfg, "imagenome_gold_ids", ""):
            raise ValueError(f"config key imagenome_gold_ids applies to a scene-graph folder; imagenome_root "
                             f"{imagenome} is a file (the gold CSV holds only gold images): leave it empty")
        graphs, report = read_imagenome_gold_csv(imagenome, sizes=sizes)
        source = f"the gold CSV {imagenome}"
    else:
        gold_file = getattr(cfg, "imagenome_gold_ids", "")
        gold = read_gold_ids(gold_file) if gold_file else None
        graphs, report = read_imagenome(imagenome, sizes=sizes, gold_ids=gold)
        source = f"scene graphs in {imagenome}" + (f", gold ids {gold_file}" if gold else
                                                   " (no imagenome_gold_ids: EVERY graph in the folder)")
    lut, counts = build_lut(graphs)
    path = cfg.lut_path or os.path.join(out_dir, "lut.json")
    per_region = ", ".join(f"{r} {n}" for r, n in counts.items())
    save = lambda: save_lut(lut, path, source=f"{len(graphs)} images of {source}", boxes_per_region=per_region)
    return lut, (f"LUT built from {len(graphs)} images of {source}, saved to {path}\n{report}\n"
                 f"  boxes averaged per region: {per_region}"), save


def _compare_run_lut(lut, run_dir):
    """A line naming how `lut` differs from the LUT a training run in run_dir saved (its rows were tuned on it)."""
    path = os.path.join(run_dir, "lut.json")
    if not os.path.isfile(path):
        return None
    try:
        theirs = load_lut(path)
    except ValueError as e:
        return f"note: the training run's LUT {path} cannot be read ({e})"
    differ = sorted(k for k in set(lut) | set(theirs) if lut.get(k) != theirs.get(k))
    if not differ:
        return f"LUT: the same as the training run's {path}"
    return (f"note: this LUT differs from the training run's {path}, which its learned rows were tuned with, in "
            f"{len(differ)} location(s) (e.g. {', '.join(differ[:3])}); that file is left as it is")


MSCXR_SPLITS = ("all", "train", "val", "test")


def mscxr_subsets(pairs, split, csv_path=""):
    """(scored pairs, validation candidates, note) for config key mscxr_split.

    "all" (default) scores every pair whatever its v1.1.0 `split` column (the paper's MS-CXR-loc has 1,043 pairs
    drawn from all of MS-CXR). Validation during tuning uses the `val` split when the final table does not score
    it; with "all" it does, and the note says so: validation is then a monitor only (no checkpoint is chosen from
    it; train.py keeps the last step's rows).
    """
    if split not in MSCXR_SPLITS:
        raise ValueError(f"config key 'mscxr_split': expected one of {list(MSCXR_SPLITS)}, got {split!r}")
    has_split = any(p.get("split") for p in pairs)
    if split != "all" and not has_split:
        raise ValueError(f"config key mscxr_split: {split!r} needs the `split` column of MS-CXR v1.1.0; {csv_path} has "
                         "none (v0.1): use mscxr_split: all")
    scored = pairs if split == "all" else [p for p in pairs if p["split"] == split]
    if not has_split:
        return scored, [], "no validation pairs (this MS-CXR CSV has no split column): periodic validation is off"
    val = [p for p in pairs if p["split"] == "val"]
    if split == "val":  # score val: validate on train-split pairs, disjoint from the table
        val = [p for p in pairs if p["split"] == "train"]
        return scored, val, "validation pairs: the MS-CXR 'train' split (disjoint from the scored 'val' split)"
    if split == "all":
        return scored, val, ("validation pairs: the MS-CXR 'val' split, which the final table ALSO scores "
                             "(mscxr_split: all): a monitor only, no checkpoint is chosen from it")
    return scored, val, f"validation pairs: the MS-CXR 'val' split (disjoint from the scored {split!r} split)"


def _no_samples(cfg, n_train, reports, lines):
    """The error for a curation that leaves no tuning sample (train.py would divide by zero far later)."""
    drops = collections.Counter()
    for r in reports:
        drops.update(r.counts)
    top = "; ".join(f"{reason}: {n}" for reason, n in drops.most_common(3)) or "nothing dropped"
    keys = (f"phantom_root {cfg.phantom_root} (delete it to rebuild the world)" if cfg.data == "phantom" else
            f"mimic_root {cfg.mimic_root} (images, metadata and split CSVs), reports_root {cfg.reports_root} (the "
            "report .txt files)")
    return (f"no tuning sample left after curation ({n_train} MIMIC images of the train split; most dropped: {top}); "
            f"check the config keys {keys} and views {list(cfg.views)}. The data report so far:\n" + "\n".join(lines))


def load(cfg, need_samples=True, image_size=512, lut_dir=None, write_lut=True):
    """Everything an experiment reads, from `cfg.data` ("phantom" | "mimic").

    image_size: the model's input side (pipe.image["size"]); boxes the centre crop cuts away are dropped for it.
    lut_dir: where a LUT built here is saved (default cfg.out_dir, train.py's run folder; evaluate.py passes its
    --out, so that it never writes into a training run's folder, and the run's own LUT is compared instead). Nothing
    is written until every input has been read; write_lut=False leaves it to the caller (Data.save_lut: train.py
    writes into its run folder only once the run starts).
    """
    mimic, reports, mscxr_csv, imagenome, vindr_csv, vindr_dir, description = _paths(cfg)
    lines = []
    on_missing = getattr(cfg, "on_missing", "error")  # "skip": missing/unreadable images are counted, not fatal
    records, mimic_rep = ds.read_mimic(mimic, reports, on_missing=on_missing)
    lines.append(str(mimic_rep))
    lut, lut_line, save_lut_file = _lut(cfg, imagenome, records, lut_dir or cfg.out_dir)
    lines.append(lut_line)
    if lut_dir and os.path.abspath(lut_dir) != os.path.abspath(cfg.out_dir):
        lines += [line for line in [_compare_run_lut(lut, cfg.out_dir)] if line]
    all_pairs, rep = ds.read_mscxr(mscxr_csv, image_root=mimic, on_missing=on_missing)
    lines.append(str(rep))
    samples = []
    # the phantom world knows every study's findings: its data report (evaluate.py's too) says how clean the weak
    # supervision is, so the tuning set is curated there even when no sample is needed
    if need_samples or cfg.data == "phantom":  # MS-CXR patients never enter the tuning set; frontal views only
        train = [r for r in records if r["split"] == "train"]
        samples, curation_rep = cu.curate_tuning_set(train, exclude_subjects=ds.mscxr_subjects(mscxr_csv),
                                                     views=cfg.views)
        lines.append(str(curation_rep))
        if cfg.data == "phantom":
            lines.append(score_tuning_set(samples, train, read_truth(cfg.phantom_root), cfg.views,
                                          n_used=getattr(cfg, "max_train_samples", 0) or None)[2])
    if not need_samples:
        samples = []
    else:
        if getattr(cfg, "max_train_samples", 0) and len(samples) > cfg.max_train_samples:
            lines.append(f"max_train_samples: the first {cfg.max_train_samples} of {len(samples)} curated samples "
                         "are used")
            samples = samples[:cfg.max_train_samples]
        samples, rep = ds.check_images(samples, on_missing, name="tuning images (headers read)")  # before the run
        lines.append(str(rep))
        if not samples:
            raise ValueError(_no_samples(cfg, len(train), [mimic_rep, curation_rep, rep], lines))
    all_pairs, rep = cu.drop_cropped_boxes(all_pairs, image_size, "MS-CXR")  # after the patient exclusion
    lines.append(str(rep))
    test, val, val_note = mscxr_subsets(all_pairs, cfg.mscxr_split, mscxr_csv)
    lines.append(f"MS-CXR pairs scored (mscxr_split: {cfg.mscxr_split}): {cu.class_counts(test)}")
    test_loc, rep = cu.mscxr_loc(test)
    lines.append(str(rep))
    lines.append(f"MS-CXR-loc pairs scored: {cu.class_counts(test_loc)}")
    val_loc, _ = cu.mscxr_loc(val)
    vindr = []
    if vindr_csv:
        vpairs, rep = read_vindr(vindr_csv, vindr_dir, on_missing=on_missing)
        lines.append(str(rep))
        vpairs, rep = cu.drop_cropped_boxes(vpairs, image_size, "VinDr-CXR")
        lines.append(str(rep))
        vindr = cu.vindr_prompts(vpairs, lut)
        lines.append(f"VinDr-CXR pairs: {cu.class_counts(vindr)}")
    data = Data(description=description, samples=samples, lut=lut, mscxr=test, mscxr_loc=test_loc,
                val_pairs=val_loc, vindr=vindr, report="\n".join(lines), val_note=val_note, lut_writer=save_lut_file)
    if write_lut:  # the inputs checked out: only now is anything written
        data.save_lut()
    return data
