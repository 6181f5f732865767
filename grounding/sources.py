"""Where an experiment's data comes from: the embedded phantom world or the credentialed datasets.

One function, `load(cfg)`, turns a train.py / evaluate.py config into everything both scripts need, read through
the SAME readers and curation for both sources (grounding/datasets.py, grounding/curation.py): the curated tuning
samples (MIMIC-CXR reports, MS-CXR patients excluded), the location -> Gaussian LUT (Chest ImaGenome gold boxes),
and the grounding splits (MS-CXR, MS-CXR-loc, VinDr-CXR with synthesised prompts). Every skipped record is counted
in `report`, and `description` says which data this is: synthetic data is never passed off as real.
"""
import dataclasses
import json
import os

from grounding import curation as cu
from grounding import datasets as ds
from grounding import phantom
from grounding.anatomy import build_lut, load_lut, save_lut
from grounding.preprocess import preprocess


@dataclasses.dataclass
class Data:
    description: str          # what data this is (printed by every script)
    samples: list             # curated tuning samples (dicts: image_path, prompt, locations, pathology, ...)
    lut: dict                 # location -> [(mu_x, mu_y, sigma_x, sigma_y)] in the 512 frame
    mscxr: list               # every MS-CXR test pair, its own phrase as the prompt
    mscxr_loc: list           # MS-CXR-loc test pairs: located phrases, standardised prompts
    val_pairs: list           # MS-CXR-loc pairs of the validation split (short validation during tuning)
    vindr: list               # VinDr-CXR test pairs with synthesised prompts ([] when not configured)
    report: str               # counts of everything dropped, by reason

    @property
    def test_pairs(self):
        return self.mscxr_loc

    def split(self, name):
        """Pairs of an evaluate.py split."""
        table = {"mscxr": self.mscxr, "mscxr-loc": self.mscxr_loc, "phantom": self.mscxr_loc, "vindr": self.vindr}
        if not table[name]:
            raise ValueError(f"split {name!r} has no pairs here ({self.description}); check the config's paths")
        return table[name]

    @staticmethod
    def image(sample, image_cfg):
        return preprocess(sample["image_path"], image_cfg)


def ensure_phantom(root, seed=0):
    """Build the phantom world into `root` unless a complete one with this seed is already there."""
    path = os.path.join(root, "world.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f)["config"]["seed"] == seed:
                return root
    print(f"building the phantom world (SYNTHETIC) into {root} ...")
    summary = phantom.build_world(root, phantom.PhantomConfig(seed=seed))
    print(f"built {summary['counts']['images']} images in {summary['build_seconds']}s")
    return root


def _paths(cfg):
    """(mimic root, reports root, MS-CXR CSV, ImaGenome scene-graph dir, VinDr CSV, VinDr image dir, description)."""
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
        return (cfg.mimic_root, cfg.reports_root, cfg.mscxr_csv, cfg.imagenome_root, cfg.vindr_csv, cfg.vindr_images,
                f"[data] MIMIC-CXR-JPG {cfg.mimic_root} + MS-CXR {cfg.mscxr_csv} (real)")
    raise ValueError(f"config key 'data': expected 'phantom' or 'mimic', got {cfg.data!r}")


def _lut(cfg, imagenome_dir, mimic_records, out_dir):
    """The saved LUT if there is one, else built from the gold scene graphs (and saved next to the run)."""
    if cfg.lut_path and os.path.exists(cfg.lut_path):
        return load_lut(cfg.lut_path), f"LUT {cfg.lut_path}"
    sizes = {r["dicom_id"]: (r["image_width"], r["image_height"]) for r in mimic_records}
    graphs, report = ds.read_imagenome(imagenome_dir, sizes=sizes)
    lut, counts = build_lut(graphs)
    path = cfg.lut_path or os.path.join(out_dir, "lut.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_lut(lut, path)
    return lut, f"LUT built from {len(graphs)} scene graphs ({report}), saved to {path}"


def load(cfg, family=None, need_samples=True, image_size=512):
    """Everything an experiment reads, from `cfg.data` ("phantom" | "mimic").

    image_size: the model's input side (pipe.image["size"]); boxes the centre crop cuts away are dropped for it.
    """
    mimic, reports, mscxr_csv, imagenome, vindr_csv, vindr_dir, description = _paths(cfg)
    lines = []
    on_missing = getattr(cfg, "on_missing", "error")  # "skip": missing/unreadable images are counted, not fatal
    records, rep = ds.read_mimic(mimic, reports, on_missing=on_missing)
    lines.append(str(rep))
    lut, lut_line = _lut(cfg, imagenome, records, cfg.out_dir)
    lines.append(lut_line)
    all_pairs, rep = ds.read_mscxr(mscxr_csv, image_root=mimic, on_missing=on_missing)
    lines.append(str(rep))
    samples = []
    if need_samples:  # MS-CXR patients never enter the tuning set
        train = [r for r in records if r["split"] == "train"]
        samples, rep = cu.curate_tuning_set(train, exclude_subjects={p["subject_id"] for p in all_pairs})
        lines.append(str(rep))
        if getattr(cfg, "max_train_samples", 0):
            samples = samples[:cfg.max_train_samples]
        samples, rep = ds.check_images(samples, on_missing, name="tuning images (headers read)")  # before the run
        lines.append(str(rep))
    all_pairs, rep = cu.drop_cropped_boxes(all_pairs, image_size, "MS-CXR")  # after the patient exclusion
    lines.append(str(rep))
    has_split = any(p.get("split") for p in all_pairs)
    test = [p for p in all_pairs if not has_split or p["split"] == "test"]
    val = [p for p in all_pairs if has_split and p["split"] == "val"]
    test_loc, rep = cu.mscxr_loc(test)
    lines.append(str(rep))
    val_loc, _ = cu.mscxr_loc(val)
    vindr = []
    if vindr_csv and os.path.exists(vindr_csv):
        vpairs, rep = ds.read_vindr(vindr_csv, vindr_dir, on_missing=on_missing)
        lines.append(str(rep))
        vpairs, rep = cu.drop_cropped_boxes(vpairs, image_size, "VinDr-CXR")
        lines.append(str(rep))
        vindr = cu.vindr_prompts(vpairs, lut)
    return Data(description=description, samples=samples, lut=lut, mscxr=test, mscxr_loc=test_loc,
                val_pairs=val_loc, vindr=vindr, report="\n".join(lines))
