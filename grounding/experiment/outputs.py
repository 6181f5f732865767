"""The Outputs block a script prints when it is done: each file in its output folder, what it holds, what to open next.

train.py, evaluate.py and classify.py end with it, so a run says where its results are instead of leaving the reader
to list the folder and guess. The descriptions are keyed by file name pattern (the first match wins); a file that
matches none is listed without one, and lock and temporary files are left out.
"""
import fnmatch
import os

# (file name pattern, what it holds): the order of this list is the order of the block
FILES = [
    # train.py's run folder
    ("config.yaml", "the run's settings (every TrainConfig key); --resume checks against them"),
    ("config.resume_step*.yaml", "the changed settings a --resume --force continued with"),
    ("ckpt.pt", "learned rows + optimiser state of the last step (--resume continues from it)"),
    ("learned_rows.safetensors", "the tuned anatomy rows, with the layers, DDIM steps and window they are read with: "
                                 "--prompts of evaluate.py, classify.py, ground.py"),
    ("lut.json", "location -> Gaussian LUT (from the gold boxes): the tuning targets"),
    ("tuning_set.jsonl", "the curated tuning samples used, one a line (image, prompt, locations)"),
    ("eval_frozen_vs_tuned.md", "the final table: CNR and mIoU % per class with 95% CIs, and the location-swap test"),
    ("eval_*.md", "one model's per-class table: CNR, mIoU %, pixel AUC, pointing game"),
    ("eval_*.jsonl", "one model's per-pair rows (a rerun resumes them)"),
    # evaluate.py's --out
    ("comparison.md", "frozen vs tuned: CNR and mIoU % per class with 95% CIs"),
    ("swap.md", "the location-swap test: do the words steer the map?"),
    ("table_*.md", "one model's per-class table: CNR, mIoU %, pixel AUC, pointing game"),
    ("table_*.json", "the same table as numbers, with the header"),
    ("rows_*.jsonl", "one model's per-pair rows (a rerun resumes them)"),
    # classify.py's --out
    ("table.md", "Table 6's layout: AUROC overall and per mIoU half, with the header"),
    ("table.json", "the same table as numbers"),
    ("rows.jsonl", "per-image scores and mIoU % (a rerun resumes them)"),
    ("settings.json", "the settings the rows were scored with (a rerun with others stops)"),
    # any of them
    ("*.stale*", "rows set aside: made by other weights, prompts, settings or code"),
    ("*.provenance.json", "what made the rows file beside it: weights, prompts, split, heatmap settings, code"),
    ("overlays", "heatmap overlays (PNG, boxes in green) of the first pairs, a folder per model"),
    ("report.html", "one page: the header, the tables, per class the best and worst pairs under every model"),
]
SKIP = ("*.lock", "*.tmp")


def _describe(name):
    """(place in FILES, description) of a file name; unknown names go last, undescribed."""
    return next(((k, what) for k, (pattern, what) in enumerate(FILES) if fnmatch.fnmatch(name, pattern)),
                (len(FILES), ""))


def outputs_block(folder, next_steps=()):
    """The block's text: `Outputs in <folder>/:`, a line per file (a folder as one line with its file count), then
    `Next:` and the commands or files to open."""
    names = [n for n in os.listdir(folder) if not any(fnmatch.fnmatch(n, p) for p in SKIP)]
    shown = []                                                   # (as listed, description)
    for name in sorted(names, key=lambda n: (_describe(n)[0], n)):
        path = os.path.join(folder, name)
        what = _describe(name)[1]
        if os.path.isdir(path):
            name = f"{name}/ ({sum(len(files) for _, _, files in os.walk(path))} files)"
        shown.append((name, what))
    width = min(max((len(n) for n, _ in shown), default=0), 40)
    lines = [f"Outputs in {folder.rstrip('/')}/:"]
    lines += [f"  {n:<{width}s}  {what}" if len(n) <= width else f"  {n}\n  {'':<{width}s}  {what}" for n, what in shown]
    if next_steps:
        lines += ["Next:"] + [f"  {step}" for step in next_steps]
    return "\n".join(line.rstrip() for line in lines)
