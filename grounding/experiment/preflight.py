"""The data preflight: every input a config names, read at once, reported in one page; nothing is written.

    python train.py --config configs/mimic_monai.yaml --check
    python evaluate.py --split vindr --config configs/mimic_monai.yaml --check
    python classify.py --config configs/mimic_monai.yaml --check chexpert_csv=.../mimic-cxr-2.0.0-chexpert.csv.gz

Without it a real-data run meets its missing inputs one at a time (the weights, then VinDr, then the MIMIC metadata),
each after a model load. `check` tries every input with the readers' own code (ldm/weights/folder.py, the readers of
grounding/data/, grounding/anatomy.py's LUT loader), catches each reader's error instead of stopping at the first,
and returns one Finding per input: what was found (with counts), or the reader's message and what to do (the config
key and the remedy). Large trees are sampled: a few MIMIC-CXR-JPG images and reports of the tuning split, not all
377,110; the MS-CXR and VinDr-CXR images (about 1,200 and 3,000) have their headers read, as the run reads them
before it starts. Nothing is written: no out_dir, no LUT, no phantom world (a missing one is reported, not built).
"""
import collections
import dataclasses
import glob
import os

import torch

from ldm.weights.folder import load_pipeline
from grounding.data.lut import load_lut
from grounding.data import readers as ds
from grounding.data.curation import class_counts
from grounding.data.imagenome import read_gold_ids, read_imagenome_gold_csv, read_scene_graph
from grounding.data.vindr import read_vindr
from grounding.experiment import distributed
from grounding.experiment.config import check_layers
from grounding.experiment.sources import mscxr_subsets
from grounding.heatmap import LAYER_PRESETS
from grounding.phantom.real import world_notice_for
from grounding.phantom.world import _read_world_json

# The MIMIC-CXR-JPG tables and the columns read_mimic needs (tests/test_preflight.py checks read_mimic needs each)
MIMIC_CSVS = ds.MIMIC_TABLES
N_SAMPLE = 5           # MIMIC images and reports opened, spread evenly over the tuning split's rows
# what the readers count when on_missing: skip lets an image go (on_missing: error stops the run there instead)
IMAGE_LOSSES = ("missing image file", "unreadable image file (skipped)", "image size differs from the CSV (skipped)")


@dataclasses.dataclass
class Finding:
    key: str           # the config key (or flag) the input comes from
    status: str        # "ok" | "MISSING" (the run would stop: exit status 1) | "off" (optional, not configured)
    what: str          # what was found, with counts; or the reader's own message
    todo: str = ""     # for MISSING: what to do


def _try(fn, *args, **kwargs):
    """(fn's result, None), or (None, the reader's message): the error is kept, the next input still checked."""
    try:
        return fn(*args, **kwargs), None
    except (ValueError, FileNotFoundError, OSError) as e:  # every reader's bad-input errors (PipelineError: ValueError)
        return None, str(e)


def _n(x):
    return f"{x:,}"


def _which(path):
    """Which of NAME.csv / NAME.csv.gz a reader reads (grounding/data/readers.py find_csv), said when both exist."""
    read = ds.find_csv(path)
    twin = read[:-3] if read.endswith(".gz") else read + ".gz"
    return os.path.basename(read) + (f" (read; {os.path.basename(twin)} beside it is not)" if os.path.isfile(twin)
                                     else "")


def _writable(path):
    """None when `path` is (or can be created as) a writable folder, else why not. Creates nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} exists and is not a folder"
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not a writable folder"
    return None


# ---------------------------------------------------------------------------------------------------------------
# one check per input


def check_device(cfg):
    _, err = _try(distributed.setup, cfg.device)   # a plain (world size 1) run: only the CUDA check
    if err:
        return [Finding("device", "MISSING", err, "run --check on the GPU machine, or set device=cpu autocast=none")]
    if not cfg.device.startswith("cuda"):
        return [Finding("device", "ok", f"{cfg.device}, autocast {cfg.autocast}")]
    props = torch.cuda.get_device_properties(torch.device(cfg.device))
    out = [Finding("device", "ok", f"{cfg.device}: {props.name}, {props.total_memory / 2**30:.0f} GiB; autocast "
                   f"{cfg.autocast}")]
    if cfg.autocast == "bf16" and not torch.cuda.is_bf16_supported():
        out.append(Finding("autocast", "MISSING", f"bf16 is not supported by {props.name}", "set autocast=fp16"))
    return out


def check_weights(cfg):
    pipe, err = _try(load_pipeline, cfg.weights)   # model.yaml, tokenizer, every key and shape; tensors mmapped
    if err:
        return [Finding("weights", "MISSING", err, "docs/weights.md says where to get the checkpoint and how to "
                        "convert it; or set weights to a converted folder")]
    n = len(pipe.unet.cross_attention_layers())
    sizes = ", ".join(f"{name} {_n(sum(p.numel() for p in getattr(pipe, name).parameters()))}"
                      for name in ("unet", "vae", "text_encoder"))
    out = [Finding("weights", "ok", f"{cfg.weights}: family {pipe.family}, {n} cross-attention layers; "
                   f"parameters {sizes}; tokenizer {_n(len(pipe.tokenizer.encoder))} tokens")]
    layers = list(cfg.layers) or list(LAYER_PRESETS[(pipe.family, "tuning")])
    _, err = _try(check_layers, "layers", layers, n, f"{cfg.weights} (family {pipe.family})")
    out.append(Finding("layers", "MISSING", err, "choose layers in range (README: the family presets)") if err else
               Finding("layers", "ok", f"{layers} of 0-{n - 1}" + ("" if cfg.layers else " (the family preset)")))
    return out


def check_phantom(cfg):
    w = _read_world_json(cfg.phantom_root)
    if w is not None and w["config"]["seed"] == cfg.phantom_seed:
        return [Finding("phantom_root", "ok", f"{cfg.phantom_root}: {w['notice']} (seed {cfg.phantom_seed})")]
    if os.path.exists(cfg.phantom_root) and os.listdir(cfg.phantom_root):
        return [Finding("phantom_root", "MISSING", f"{cfg.phantom_root} holds something other than the phantom world "
                        f"of seed {cfg.phantom_seed}", "delete it, or set phantom_root to a new folder")]
    why = _writable(cfg.phantom_root)
    return [Finding("phantom_root", "MISSING" if why else "ok", why or f"{cfg.phantom_root}: not built yet; the first "
                    "run builds the SYNTHETIC phantom world there (about half a minute)", "set phantom_root to a "
                    "writable folder" if why else "")]


def check_mimic(cfg, tuning):
    """mimic_root (metadata and split CSVs, files/ sampled) and reports_root (sampled); tuning: train.py reads the
    tuning split's images and reports (evaluate.py and classify.py only the MS-CXR images, checked with MS-CXR)."""
    if not cfg.mimic_root or not os.path.isdir(cfg.mimic_root):
        what = "not set" if not cfg.mimic_root else f"folder {cfg.mimic_root} not found"
        return [Finding("mimic_root", "MISSING", what, "set mimic_root to the MIMIC-CXR-JPG 2.0.0 folder (files/, "
                        "mimic-cxr-2.0.0-metadata.csv.gz, mimic-cxr-2.0.0-split.csv.gz)"),
                check_reports(cfg, [], tuning)]
    out, tables = [], {}
    for name, columns in MIMIC_CSVS.items():
        path = os.path.join(cfg.mimic_root, name)
        tables[name], err = _try(ds._read_csv, path, columns)
        if err:
            out.append(Finding("mimic_root", "MISSING", err, f"put {name}.gz (as released) or {name} in mimic_root"))
    if not all(tables.values()):
        return out + [check_reports(cfg, [], tuning)]
    (meta_name, meta), (split_name, split_rows) = tables.items()
    split_of = {r["dicom_id"]: r["split"] for r in split_rows}
    views = collections.Counter(r["ViewPosition"] or "(empty)" for r in meta)
    splits = collections.Counter(split_of.get(r["dicom_id"], "(not in the split CSV)") for r in meta)
    out.append(Finding("mimic_root", "ok", f"{cfg.mimic_root}: {_which(os.path.join(cfg.mimic_root, meta_name))}: "
                       f"{_n(len(meta))} images; views " + ", ".join(f"{v} {_n(n)}" for v, n in views.most_common())))
    out.append(Finding("mimic_root", "ok", f"{_which(os.path.join(cfg.mimic_root, split_name))}: "
                       + ", ".join(f"{s} {_n(n)}" for s, n in splits.most_common())))
    # a few images of what tuning reads (train split, the configured views), spread evenly over the table
    tune = [r for r in meta if split_of.get(r["dicom_id"]) == "train" and r["ViewPosition"] in cfg.views]
    sample = [tune[i * len(tune) // N_SAMPLE] for i in range(min(N_SAMPLE, len(tune)))]
    rep = ds.DataReport("sampled images")
    n_read = 0
    for r in sample:
        path = ds.mimic_image_path(cfg.mimic_root, r["subject_id"], r["study_id"], r["dicom_id"])
        n_read += ds._check_image(path, "skip", rep, path) and ds._check_header(path, "skip", rep, path)
    files = os.path.join(cfg.mimic_root, "files")
    parts = sorted(d for d in os.listdir(files) if d.startswith("p")) if os.path.isdir(files) else []
    what = (f"files/: {len(parts)} top folders ({', '.join(parts[:3])}{' ...' if len(parts) > 3 else ''}); "
            f"{n_read} of {len(sample)} sampled train-split {'/'.join(cfg.views)} images read")
    if not tune and tuning:
        out.append(Finding("views", "MISSING", f"no train-split image with a view in {list(cfg.views)}",
                           "check views (PA, AP) against the metadata's ViewPosition counts above"))
    elif n_read < len(sample) and tuning and cfg.on_missing == "error":
        lost = "; ".join(line.strip() for line in str(rep).splitlines()[1:])
        out.append(Finding("mimic_root", "MISSING", f"{what}; {lost}", "finish the download of MIMIC-CXR-JPG's "
                           "files/ (or set on_missing: skip to count and skip missing images)"))
    else:
        out.append(Finding("mimic_root", "ok", what))
    return out + [check_reports(cfg, sample, tuning)]


def check_reports(cfg, sample, tuning):
    if not cfg.reports_root or not os.path.isdir(cfg.reports_root):
        what = "not set" if not cfg.reports_root else f"folder {cfg.reports_root} not found"
        return Finding("reports_root", "MISSING", what, "set reports_root to the MIMIC-CXR 2.0.0 folder (files/pXX/"
                       "p<subject>/s<study>.txt, unzipped from mimic-cxr-reports.zip)")
    paths = [ds.mimic_report_path(cfg.reports_root, r["subject_id"], r["study_id"]) for r in sample]
    missing = [p for p in paths if not os.path.isfile(p)]
    what = (f"{cfg.reports_root}: {len(paths) - len(missing)} of {len(paths)} sampled reports found" if paths else
            f"{cfg.reports_root}: folder found; no report sampled (no tuning image listed above)")
    if missing and tuning:
        return Finding("reports_root", "MISSING", f"{what}; e.g. {missing[0]} is missing", "unzip mimic-cxr-reports."
                       "zip into reports_root (files/pXX/p<subject>/s<study>.txt)")
    return Finding("reports_root", "ok", what + ("" if tuning else " (only train.py reads them)"))


def check_mscxr(cfg):
    if not cfg.mscxr_csv:
        return [Finding("mscxr_csv", "MISSING", "not set", "set mscxr_csv to MS_CXR_Local_Alignment_v1.1.0.csv")]
    # the reader itself: its columns, its grouping into pairs, every image header (skipped and counted, not fatal)
    got, err = _try(ds.read_mscxr, cfg.mscxr_csv, image_root=cfg.mimic_root, on_missing="skip")
    if err:
        return [Finding("mscxr_csv", "MISSING", err, "point mscxr_csv at MS-CXR's MS_CXR_Local_Alignment_v1.1.0.csv")]
    pairs, rep = got
    if not os.path.isdir(os.path.join(cfg.mimic_root, "files")):
        return [Finding("mscxr_csv", "ok", f"{_which(cfg.mscxr_csv)}: columns read; its images (in mimic_root's "
                        "files/) not checked: no such folder")]
    lost = {k: n for k, n in rep.counts.items() if k in IMAGE_LOSSES}
    what = f"{_which(cfg.mscxr_csv)}: {len(pairs)} pairs with their images ({class_counts(pairs)})"
    if lost and cfg.on_missing == "error":
        return [Finding("mscxr_csv", "MISSING", f"{what}; " + "; ".join(f"{k}: {n}" for k, n in lost.items()),
                        "MS-CXR's images live in the MIMIC-CXR-JPG tree: complete mimic_root's files/ (or set "
                        "on_missing: skip to count and skip such pairs)")]
    out = [Finding("mscxr_csv", "ok", what + "".join(f"; {k}: {n}" for k, n in lost.items()))]
    _, err = _try(mscxr_subsets, pairs, cfg.mscxr_split, cfg.mscxr_csv)
    if err:
        out.append(Finding("mscxr_split", "MISSING", err, "use mscxr_split: all with a v0.1 CSV"))
    return out


def check_lut(cfg):
    if cfg.lut_path and os.path.exists(cfg.lut_path):
        lut, err = _try(load_lut, cfg.lut_path)
        return [Finding("lut_path", "MISSING", err, f"delete {cfg.lut_path}: it is rebuilt from imagenome_root") if err
                else Finding("lut_path", "ok", f"{cfg.lut_path}: saved LUT, {len(lut)} locations (imagenome_root is "
                             "not read while it exists)")]
    root = cfg.imagenome_root
    if not root or not os.path.exists(root):
        return [Finding("imagenome_root", "MISSING", "not set" if not root else f"{root} not found",
                        "set imagenome_root to Chest ImaGenome's gold_dataset/gold_bbox_coordinate_annotations_"
                        "1000images.csv (or a folder of <dicom_id>_SceneGraph.json), or lut_path to a saved LUT")]
    if os.path.isfile(root):
        got, err = _try(read_imagenome_gold_csv, root)
        what = err or (f"{_which(root)}: gold boxes of {_n(len(got[0]))} images, "
                       f"{len({n for g in got[0] for n in g['boxes']})} regions")
    else:
        graphs = sorted(glob.glob(os.path.join(root, "*_SceneGraph.json")))
        got, err = (_try(read_scene_graph, graphs[0]) if graphs else
                    (None, f"no *_SceneGraph.json files in {root}"))
        what = err or f"{root}: {_n(len(graphs))} scene graphs (the first one read)"
        if not err and cfg.imagenome_gold_ids:
            ids, err = _try(read_gold_ids, cfg.imagenome_gold_ids)
            what = err or f"{what}; imagenome_gold_ids {cfg.imagenome_gold_ids}: {_n(len(ids))} gold ids"
    if err:
        return [Finding("imagenome_root", "MISSING", what, "point imagenome_root at the gold CSV as released")]
    dest = cfg.lut_path or os.path.join(cfg.out_dir, "lut.json")
    why = _writable(os.path.dirname(dest) or ".")
    return [Finding("imagenome_root", "ok", what),
            Finding("lut_path", "MISSING", why, "set lut_path to a writable place") if why else
            Finding("lut_path", "ok", f"{dest}: not there yet; the first run builds the LUT there")]


def check_vindr(cfg, required):
    if not cfg.vindr_csv:
        return [Finding("vindr_csv", "MISSING", "not set", "set vindr_csv to VinDr-CXR's annotations/annotations_"
                        "test.csv and vindr_images to its images as PNG") if required else
                Finding("vindr_csv", "off", "not set: VinDr-CXR is left out (evaluate.py --split vindr needs it)")]
    if not cfg.vindr_images or not os.path.isdir(cfg.vindr_images):
        what = "not set" if not cfg.vindr_images else f"folder {cfg.vindr_images} not found"
        return [Finding("vindr_images", "MISSING", what, "set vindr_images to the folder of VinDr-CXR test images "
                        "(<image_id>.png, converted from the DICOMs), or leave vindr_csv empty to run without VinDr")]
    got, err = _try(read_vindr, cfg.vindr_csv, cfg.vindr_images, on_missing="skip")
    if err:
        return [Finding("vindr_csv", "MISSING", err, "point vindr_csv at annotations_test.csv as released, or leave "
                        "it empty to run without VinDr-CXR")]
    pairs, rep = got
    labels = "image_labels_test.csv read" if "+" in rep.name else "no image_labels_test.csv beside it"
    what = f"{_which(cfg.vindr_csv)} ({labels}): {len(pairs)} pairs with their images ({class_counts(pairs)})"
    lost = {k: n for k, n in rep.counts.items() if k in IMAGE_LOSSES}
    if lost and cfg.on_missing == "error":
        return [Finding("vindr_images", "MISSING", f"{what}; " + "; ".join(f"{k}: {n}" for k, n in lost.items()),
                        f"convert every test DICOM to {cfg.vindr_images}/<image_id>.png (or set on_missing: skip)")]
    return [Finding("vindr_csv", "ok", what + "".join(f"; {k}: {n}" for k, n in lost.items()))]


def check_chexpert(path):
    from grounding.experiment.classify_data import read_no_finding
    if not path:
        return Finding("chexpert_csv", "MISSING", "not set", "set chexpert_csv to mimic-cxr-2.0.0-chexpert.csv.gz "
                       "(or -negbio.csv.gz) of MIMIC-CXR-JPG")
    got, err = _try(read_no_finding, path, [])   # the reader's columns and values; no image is matched
    if err:
        return Finding("chexpert_csv", "MISSING", err, "point chexpert_csv at mimic-cxr-2.0.0-chexpert.csv.gz")
    return Finding("chexpert_csv", "ok", f"{_which(path)}: {_n(got[1]['studies labelled No Finding == 1.0'])} "
                   "studies labelled No Finding")


# ---------------------------------------------------------------------------------------------------------------
# all of them, and the report


def check(cfg, script="train.py", outputs=None, vindr=False, chexpert_csv=None):
    """Every input `script` reads under `cfg`: a list of Findings (nothing is written).

    outputs: (key or flag, folder) the script writes (default: out_dir); vindr: VinDr-CXR is required (evaluate.py
    --split vindr); chexpert_csv: classify.py's key (None: not checked)."""
    out = check_device(cfg) + check_weights(cfg)
    if cfg.data == "phantom":
        out += check_phantom(cfg)
    else:
        out += check_mimic(cfg, tuning=script == "train.py")
        out += check_mscxr(cfg) + check_lut(cfg) + check_vindr(cfg, vindr)
        if chexpert_csv is not None:
            out.append(check_chexpert(chexpert_csv))
    for key, folder in outputs or [("out_dir", cfg.out_dir)]:
        why = _writable(folder)
        held = os.path.exists(os.path.join(folder, "ckpt.pt")) and script == "train.py"
        state = "exists" if os.path.isdir(folder) else "created by the run"
        out.append(Finding(key, "MISSING", why, f"set {key} to a writable folder") if why else
                   Finding(key, "ok", f"{folder}: {state}, writable"
                           + (" (holds a checkpoint: train.py needs --resume or --overwrite)" if held else "")))
    return out


def report(findings, title):
    """The one page: a line per finding, the remedy under each MISSING one, and a closing verdict."""
    lines = [title, ""]
    for f in findings:
        lines.append(f"  {f.status:<8} {f.key:<15} {f.what}")
        if f.status == "MISSING":
            lines.append(f"  {'':<8} {'':<15} -> {f.todo}")
    bad = [f.key for f in findings if f.status == "MISSING"]
    lines.append("")
    lines.append(f"{len(bad)} input(s) missing: {', '.join(bad)}. Fix {'them' if len(bad) > 1 else 'it'} and run "
                 "the same command with --check again." if bad else
                 "Every input is in place: run the same command without --check.")
    return "\n".join(lines)


def main(cfg, config_path, script="train.py", **kwargs):
    """Print the report of `check` and return the exit status: 1 when anything the run needs is missing."""
    notice = world_notice_for(cfg.mimic_root) if cfg.data == "mimic" and cfg.mimic_root else None
    what = ("the SYNTHETIC phantom world" if cfg.data == "phantom" else
            notice.replace("[data] ", "") if notice else "real data")
    findings = check(cfg, script, **kwargs)
    print(report(findings, f"{script} --check: the inputs of {config_path or 'the built-in defaults'}, read only "
                           f"(nothing is written)\ndata: {cfg.data}, {what}"))
    return 1 if any(f.status == "MISSING" for f in findings) else 0
