"""Ground any image: where does the model put each word of a phrase, frozen and tuned?

    python ground.py IMAGE... --prompt "left lower lobe atelectasis" [--box x,y,w,h]
    python ground.py FOLDER --prompt "right pleural effusion"         # every image in the folder
    python ground.py pairs.csv                                        # rows image,prompt[,box]

Defaults: the committed phantom LDM (assets/phantom_ldm) and its tuned rows (assets/phantom_tuned_rows.safetensors,
the quickstart's output: assets/README.md), so a fresh clone shows frozen vs tuned at once. Images: PNG / JPEG (8
or 16 bit, grey or RGB), TIFF and DICOM (pydicom; rescale, VOI LUT / window, MONOCHROME1: grounding/data/images.py),
any aspect ratio, preprocessed as evaluate.py does (shortest side to the model size, centre crop); the maps go back
to the original frame (NaN where the crop cut the image away). Boxes are (x, y, w, h) in original pixels.

One inversion per image batch serves every word, both models and the left/right-swapped prompt
(grounding/experiment/grounder.py). Each model is read as evaluate.py reads it: "frozen" (the paper's baseline
reading), "untuned" (original embeddings at the tuned layers) and "tuned" (the learned rows). The layers, DDIM
steps and window are the rows file's own (the ones it was tuned and evaluated with), unless --layers / --steps /
--window say otherwise; the command prints which apply and where each comes from.
Writes under --out (default runs/ground): one folder per image (result.json with every setting and the numbers,
.npy maps in the original frame, PNG overlays, grid.png: grounding/experiment/ground_files.py) and viewer.html (one
self-contained page to explore them: grounding/experiment/viewer.py). Deterministic: the same command writes the
same maps (the DDIM inversion draws no noise; --seed seeds torch all the same and is recorded).
"""
import argparse
import csv
import os
import sys
import time
from types import SimpleNamespace

import torch
from PIL import Image

from ldm.weights.folder import load_pipeline
from ldm.weights.safetensors import read_header
from grounding.data.images import load_dicom, load_image, preprocess
from grounding.geometry import crop_window
from grounding.heatmap import TEST_WINDOW
from grounding.prompts import LearnablePrompts
from grounding.experiment.grounder import ground_batch, pixel_cell, rank_words, readings
from grounding.experiment.ground_files import write_image_outputs, write_json
from grounding.experiment.provenance import code_version, file_digest, folder_digest, prompts_digest
from grounding.experiment.rows import describe_settings, load_rows, rows_settings
from grounding.experiment.viewer import image_entry, ranked_units, write_viewer
from grounding.experiment.words import prompt_words, select_words

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WEIGHTS = os.path.join(REPO, "assets", "phantom_ldm")
DEFAULT_ROWS = os.path.join(REPO, "assets", "phantom_tuned_rows.safetensors")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("inputs", nargs="+", help="image files, folders of images, or CSV files with columns "
                   "image,prompt[,box] (relative image paths are read from the CSV's folder)")
    p.add_argument("--prompt", default=None, help="the phrase, for the images and folders given")
    p.add_argument("--box", default=None, help="x,y,w,h in original pixels: scores every map (CNR, mIoU)")
    p.add_argument("--word", action="append", default=[], help="write only this word's maps (repeatable; default: "
                   "every word)")
    p.add_argument("--tokens", action="store_true", help="also one map per token of a word split into several")
    p.add_argument("--special", action="store_true", help="also the maps of <bos>, <eos> and <padding> (and <ctx>)")
    p.add_argument("--weights", default=None, help="converted model folder (default assets/phantom_ldm)")
    p.add_argument("--prompts", default=None, help="learned rows (.safetensors from train.py); default: "
                   "assets/phantom_tuned_rows.safetensors with the default weights, none with other weights")
    p.add_argument("--no-prompts", action="store_true", help="the frozen model only")
    p.add_argument("--steps", type=int, default=None, help="DDIM inversion steps (default: the rows file's, else 100)")
    p.add_argument("--layers", default=None, help="cross-attention layers of the tuned-layer reading, e.g. 4,5 "
                   "(default: the rows file's, else the family preset)")
    p.add_argument("--window", default=None, help="recorded timesteps lo,hi (default: the rows file's, else 400,600)")
    p.add_argument("--no-swap", action="store_true", help="skip the left/right-swapped prompt")
    p.add_argument("--out", default="runs/ground", help="output folder (default runs/ground)")
    p.add_argument("--npy", choices=("original", "model", "none"), default="original",
                   help="maps as .npy in the original frame (default), the model frame, or none")
    p.add_argument("--batch", type=int, default=8, help="images inverted together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    args.weights = args.weights or DEFAULT_WEIGHTS
    if args.batch < 1 or (args.steps is not None and args.steps < 1):
        p.error("--batch and --steps must be >= 1")
    if args.prompts and args.no_prompts:
        p.error("--prompts and --no-prompts: choose one")
    try:
        args.box = parse_box(args.box, "--box") if args.box else None
        args.layers = _ints(args.layers, "--layers") if args.layers else None
        args.window = _ints(args.window, "--window", 2) if args.window else None
    except ValueError as e:
        p.error(str(e))
    if args.window and not 0 <= args.window[0] < args.window[1]:
        p.error(f"--window {args.window}: expected lo,hi timesteps with 0 <= lo < hi")
    return args


def _ints(text, what, n=None):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected whole numbers separated by commas") from None
    if (n and len(values) != n) or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"{what} {text!r}: expected {n or 'some'} different numbers >= 0")
    return values


def parse_box(text, where):
    """'x,y,w,h' -> (x, y, w, h) floats with w, h > 0."""
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or box[2] <= 0 or box[3] <= 0:
        raise ValueError(f"{where}: box {text!r} should be x,y,w,h in original pixels with w, h > 0")
    return box


# ---------------------------------------------------------------------------------------------------------
# inputs


def read_inputs(args):
    """[{"path", "prompt", "box", "where"}] from the image files, folders and CSV files given, or ValueError."""
    jobs, problems = [], []
    for item in args.inputs:
        if os.path.isdir(item):
            names = sorted(os.listdir(item))
            images = [n for n in names if n.lower().endswith(IMAGE_EXTS)]
            others = [n for n in names if n not in images and not n.startswith(".")]
            if others:
                print(f"{item}: {len(others)} file(s) that are not images skipped ({', '.join(others[:5])}"
                      f"{' ...' if len(others) > 5 else ''})")
            if not images:
                problems.append(f"{item}: no image file ({', '.join(IMAGE_EXTS)})")
            jobs += [dict(path=os.path.join(item, n), prompt=args.prompt, box=args.box, where=item) for n in images]
        elif item.lower().endswith(".csv"):
            try:
                jobs += read_csv(item, args.prompt)
            except ValueError as e:
                problems.append(str(e))
        else:
            jobs.append(dict(path=item, prompt=args.prompt, box=args.box, where=item))
    for job in jobs:
        if not job["prompt"]:
            problems.append(f"{job['where']}: no prompt for {job['path']}: give --prompt \"...\" (or a CSV with a "
                            "prompt column)")
    if problems:
        raise ValueError("\n  ".join(["bad input:"] + list(dict.fromkeys(problems))))
    return jobs


def read_csv(path, prompt):
    """A CSV of image,prompt[,box] rows (box "x,y,w,h"); --prompt is refused with it (the CSV says the prompts)."""
    if prompt:
        raise ValueError(f"{path}: the CSV gives the prompts; leave out --prompt")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such CSV file")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"image", "prompt"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a header with columns image,prompt[,box] and at least one row")
    folder, jobs = os.path.dirname(os.path.abspath(path)), []
    for n, r in enumerate(rows, start=2):
        where = f"{path} row {n}"
        if not (r["image"] or "").strip() or not (r["prompt"] or "").strip():
            raise ValueError(f"{where}: empty image or prompt")
        box = parse_box(r["box"], where) if (r.get("box") or "").strip() else None
        image = r["image"].strip()
        jobs.append(dict(path=image if os.path.isabs(image) else os.path.join(folder, image), prompt=r["prompt"],
                         box=box, where=where))
    return jobs


def read_image(job, size):
    """Decode one image: (grey (H, W) in [0, 1], how it was read); ValueError / FileNotFoundError name the file."""
    path = job["path"]
    if not os.path.isfile(path):
        raise ValueError(f"image {path} not found")
    if path.lower().endswith((".dcm", ".dicom")):
        grey, info = load_dicom(path)
        return grey, dict(info, format="DICOM")
    try:
        with Image.open(path) as im:
            how = {"format": im.format, "mode": im.mode}
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    try:
        grey = load_image(path)
    except ValueError as e:   # the reader's message names the file; drop its advice about dataset configs
        raise ValueError(f"cannot read image {path}: {e.__cause__ or e} (truncated or corrupt file?)") from e
    return grey, how


def check_box(box, W, H, size):
    """Refuse a box outside the image; warn (return a line) when part of it lies outside the model's crop."""
    if box is None:
        return None
    x, y, w, h = box
    if x < 0 or y < 0 or x + w > W or y + h > H:
        raise ValueError(f"box {box} lies outside the {W} x {H} image (x, y >= 0, x + w <= {W}, y + h <= {H})")
    ox, oy, m = crop_window(W, H, size)
    inside = max(0.0, min(x + w, ox + m) - max(x, ox)) * max(0.0, min(y + h, oy + m) - max(y, oy))
    if inside == 0:
        raise ValueError(f"box {box} lies wholly outside the model's centre crop ({ox}, {oy}, {m}, {m}) of this "
                         f"{W} x {H} image: the maps cover only the crop")
    if inside < w * h:
        return (f"{100 * (1 - inside / (w * h)):.0f}% of the box lies outside the model's centre crop ({ox}, {oy}, "
                f"{m}, {m}): there the map is NaN and counts as a miss for mIoU")
    return None


# ---------------------------------------------------------------------------------------------------------
# model, rows and settings


def load_model(args):
    """A namespace: pipe, rows (LearnablePrompts or None), rows_path, settings {"num_steps", "window", "layers"},
    source {setting: where it comes from}, reads (grounder.readings), size (the model frame's side)."""
    rows_path = None if args.no_prompts else args.prompts or (
        DEFAULT_ROWS if os.path.realpath(args.weights) == os.path.realpath(DEFAULT_WEIGHTS) else None)
    if rows_path and not os.path.isfile(rows_path):
        raise ValueError(f"--prompts {rows_path}: no such file (train.py writes <out_dir>/learned_rows.safetensors)")
    pipe = load_pipeline(args.weights, device=args.device)
    rows, recorded = None, None
    if rows_path:   # the file says its own shared_tokens mode and CoOp length; load_rows checks the rest
        meta = read_header(rows_path).get("__metadata__") or {}
        rows = LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens=meta.get("shared_tokens", "positional"),
                                n_ctx=int(meta.get("n_ctx", 0) or 0)).to(args.device)
        load_rows(rows, rows_path)          # refuses rows of another model, naming what differs
        recorded = rows_settings(rows_path)
    n_layers = len(pipe.unet.cross_attention_layers())
    if args.layers and max(args.layers) >= n_layers:
        raise ValueError(f"--layers {args.layers}: {args.weights} has {n_layers} cross-attention layers "
                         f"(0-{n_layers - 1})")
    settings, source = {}, {}   # the command line, else the rows file's own, else the defaults
    for key, given, default in (("num_steps", args.steps, 100), ("window", args.window, TEST_WINDOW),
                                ("layers", args.layers, None)):
        if given is not None:
            settings[key], source[key] = given, "the command line"
        elif recorded is not None:
            settings[key], source[key] = recorded[key], "the rows file"
        else:
            settings[key], source[key] = default, "the default" + (" (the rows file records none)" if rows else "")
    reads = readings(pipe.family, settings["num_steps"], settings["window"], settings["layers"], tuned=rows is not None)
    return SimpleNamespace(pipe=pipe, rows=rows, rows_path=rows_path, settings=settings, source=source, reads=reads,
                           size=pipe.image["size"], code=code_version())


def prepare(job, run, args):
    """Read and check one input (image, box, prompt): fills job's grey size, model input, words and warnings."""
    grey, job["read_as"] = read_image(job, run.size)
    job["width"], job["height"] = grey.shape[1], grey.shape[0]
    job["x"] = preprocess(grey, run.pipe.image)
    job["warnings"] = [w for w in [check_box(job["box"], job["width"], job["height"], run.size)] if w]
    pw = prompt_words(run.pipe.tokenizer, job["prompt"], run.rows.n_ctx if run.rows is not None else 0,
                      tokens=args.tokens, specials=args.special, swap=not args.no_swap)
    job["words"] = select_words(pw, args.word)
    job["warnings"] += pw.warnings


# ---------------------------------------------------------------------------------------------------------
# the run


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    jobs = read_inputs(args)
    run = load_model(args)
    problems = []                      # every input is read and checked before anything is written
    for job in jobs:
        try:
            prepare(job, run, args)
        except (ValueError, ImportError) as e:
            problems.append(f"{job['where']}: {e}" if job["where"] != job["path"] else str(e))
    if problems:
        raise ValueError("\n  ".join(["bad input (nothing written):"] + problems))

    shown = describe_settings(dict(run.settings, layers=run.reads[-1].cfg.resolved_layers()))
    print(f"weights {os.path.abspath(args.weights)} (family {run.pipe.family}); learned rows "
          f"{run.rows_path or '(none: the frozen model only)'}")
    print(f"heatmaps: {shown} (DDIM steps from {run.source['num_steps']}, window from {run.source['window']}, "
          f"layers from {run.source['layers']})")
    for r in run.reads:
        print(f"  {r.name}: {r.about}")
    n_maps = sum(len(j["words"].units) + (len(j["words"].swapped.units) if j["words"].swapped else 0) for j in jobs)
    size_gb = sum(j["width"] * j["height"] for j in jobs) / len(jobs) * n_maps * len(run.reads) * 4 / 1e9
    if args.npy == "original" and size_gb > 1:
        print(f"note: the .npy maps in the original frame will take about {size_gb:.1f} GB ({n_maps * len(run.reads)} "
              f"maps); --npy model writes them at {run.size} x {run.size} (placed by result.json's crop_window)")
    os.makedirs(args.out, exist_ok=True)
    names, entries, t0, seconds_maps = {}, [], time.time(), 0.0
    for start in range(0, len(jobs), args.batch):
        chunk = jobs[start:start + args.batch]
        t1 = time.time()
        results = ground_batch(run.pipe, torch.stack([j["x"] for j in chunk]), [j["words"] for j in chunk], run.rows,
                               run.reads)
        seconds_maps += time.time() - t1
        for job, res in zip(chunk, results):
            entries.append(write_one(job, res, run, args, names))
    seconds = time.time() - t0
    header = (f"Weights: {_shown(args.weights)} (family {run.pipe.family})\nLearned rows: "
              f"{_shown(run.rows_path) if run.rows_path else '(none)'}\nHeatmaps: {shown} (the tuned-layer "
              f"reading; frozen: layers {run.reads[0].cfg.resolved_layers()} + Otsu)\nCode: {run.code}")
    mb = write_viewer(os.path.join(args.out, "viewer.html"), "ground.py: per-word heatmaps", header, entries) / 1e6
    print(f"{len(jobs)} image(s) in {seconds:.1f} s ({seconds / len(jobs):.2f} s per image, of which the inversion and "
          f"the maps {seconds_maps / len(jobs):.2f} s) on {args.device}")
    print(f"wrote {os.path.join(args.out, 'viewer.html')} ({mb:.1f} MB): open it in a browser")


def _shown(path):
    """A path as the page shows it: relative to the working folder when inside it (result.json keeps it absolute)."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else os.path.abspath(path)


def write_one(job, res, run, args, names):
    """One image's folder (maps, overlays, grid.png, result.json) and its line on the console; returns its viewer
    entry. names counts the image stems already used (a repeated stem gets -2, -3, ...)."""
    stem = os.path.splitext(os.path.basename(job["path"]))[0]
    names[stem] = names.get(stem, 0) + 1
    name = stem if names[stem] == 1 else f"{stem}-{names[stem]}"
    folder = os.path.join(args.out, name)
    os.makedirs(folder, exist_ok=True)
    grey = read_image(job, run.size)[0]              # read again: a batch of originals is not kept in memory
    image = {"grey": grey, "width": job["width"], "height": job["height"], "box": job["box"]}
    pw = job["words"]
    entries = write_image_outputs(folder, image, pw, res, run.reads, npy=args.npy)
    # the words ranked at the peak of each reading's phrase map (what the viewer lists when hovering there)
    ranked = {}
    for r in run.reads:
        peak = entries[(r.name, "prompt", "phrase")]["peak"]
        raw = res["raw"][(r.model, "prompt")]
        side = int(round(next(iter(raw.values())).shape[-1] ** 0.5))
        cell = pixel_cell(int(peak["x"]), int(peak["y"]), job["width"], job["height"], run.size, side)
        layers = [res["layers"].index(l) for l in r.cfg.resolved_layers()]
        ranked[r.name] = [[n, round(v, 6)] for n, v in rank_words(raw, ranked_units(pw), cell,
                                                                   range(len(res["timesteps"])), layers)]
    maps = {}
    for (reading, which, unit), e in entries.items():
        maps.setdefault(reading, {}).setdefault(which, {})[unit] = e
    rows, n = run.rows, pw.n_tokens
    result = {
        "image": {"path": os.path.abspath(job["path"]), "sha256": file_digest(job["path"]), "width": job["width"],
                  "height": job["height"], "read_as": job["read_as"]},
        "prompt": {"given": pw.given, "used": pw.text, "tokens": pw.tokens, "side": pw.side,
                   "swapped": pw.swapped.text if pw.swapped else None, "dropped": pw.dropped or None,
                   "punctuation (in the phrase map only)": pw.punctuation},
        "words": [{"word": u.name, "tokens": [pw.tokens[o] for o in u.offsets],
                   "columns": dict(frozen=u.columns(n), **({"tuned": u.columns(n, rows.n_ctx)} if rows else {}))}
                  for u in pw.words()],
        "box": list(job["box"]) if job["box"] else None,
        "settings": {
            "weights": os.path.abspath(args.weights), "weights_sha256": folder_digest(args.weights),
            "family": run.pipe.family, "rows": os.path.abspath(run.rows_path) if run.rows_path else None,
            "rows_sha256": file_digest(run.rows_path) if run.rows_path else None, "rows_digest": prompts_digest(rows),
            "num_steps": run.settings["num_steps"], "spacing": run.reads[0].cfg.spacing,
            "window": list(run.settings["window"]), "timesteps": res["timesteps"], "recorded_layers": res["layers"],
            "from": run.source,
            "readings": {r.name: {"model": r.model, "layers": list(r.cfg.resolved_layers()),
                                  "otsu": r.cfg.resolved_otsu(), "about": r.about} for r in run.reads},
            "model_frame": {"size": run.size, "crop_window": list(crop_window(job["width"], job["height"], run.size))},
            "npy": args.npy, "seed": args.seed, "device": args.device, "code": run.code},
        "maps": maps,
        "ranked_at_phrase_peak": ranked,
        "warnings": job["warnings"],
    }
    write_json(os.path.join(folder, "result.json"), result)
    for w in job["warnings"]:
        print(f"warning: {job['path']}: {w}")
    phrase = {r.name: maps[r.name]["prompt"]["phrase"] for r in run.reads}
    text = pw.text if len(pw.text) <= 60 else pw.text[:60] + "..."
    print(f"{job['path']}: {text!r}: " + "; ".join(
        f"{name} peak {e['peak']['side']}" + (f" CNR {e['cnr']:.2f} mIoU {e['miou_percent']:.1f}%" if "cnr" in e else "")
        for name, e in phrase.items()) + f" -> {folder}")
    return image_entry(name, image, pw, res, run.reads, run.size, entries)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:   # bad input: its message, not a traceback
        sys.exit(f"ground.py: error: {e}")
