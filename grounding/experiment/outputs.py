"""The Outputs block a script prints when it is done: each file in its output folder, what it holds, what to open next.

train.py, evaluate.py and classify.py end with it, so a run says where its results are instead of leaving the reader
to list the folder and guess. The descriptions are keyed by file name pattern (the first match wins); a file that
matches none is listed without one, and lock and temporary files are left out.
"""
import fnmatch
import os
import textwrap

# (file name pattern, what it holds): the order of this list is the order of the block
FILES = [
    # train.py's run folder
    ("config.yaml", "the run's settings (every TrainConfig key); --resume checks against them"),
    ("config.resume_step*.yaml", "the changed settings a --resume --force continued with"),
    ("ckpt.pt", "learned rows + optimiser state of the last step (--resume continues from it)"),
    ("learned_rows.safetensors", "the tuned anatomy rows, with the layers, DDIM steps and window they are read with: "
                                 "--prompts of evaluate.py, classify.py, ground.py"),
    ("lut.json", "location -> Gaussian LUT built from the gold boxes: the tuning targets, VinDr's prompts"),
    ("tuning_set.jsonl", "the curated tuning samples used, one a line (image, prompt, locations)"),
    ("eval_frozen_vs_tuned.md", "the final table: CNR and mIoU % per class with 95% CIs, and the location-swap test"),
    ("eval_*.md", "each model's per-class table: CNR, mIoU %, pixel AUC, pointing game"),
    ("eval_*.jsonl", "each model's per-pair rows (a rerun resumes them)"),
    # evaluate.py's --out
    ("comparison.md", "frozen vs tuned: CNR and mIoU % per class with 95% CIs"),
    ("swap.md", "the location-swap test: do the words steer the map?"),
    ("table_*.md", "each model's per-class table: CNR, mIoU %, pixel AUC, pointing game"),
    ("table_*.json", "the same tables as numbers, with the header"),
    ("rows_*.jsonl", "each model's per-pair rows (a rerun resumes them)"),
    # classify.py's --out
    ("table.md", "Table 6's layout: AUROC overall and per mIoU half, with the header"),
    ("table.json", "the same table as numbers"),
    ("rows.jsonl", "per-image scores and mIoU % (a rerun resumes them)"),
    ("settings.json", "the settings the rows were scored with (a rerun with others stops)"),
    # any of them
    ("*.stale*", "rows set aside: made by other weights, prompts, settings or code"),
    ("*.provenance.json", "what made the rows file it is named after: weights, prompts, split, heatmaps, code"),
    ("overlays", "heatmap overlays (PNG, boxes in green) of the first pairs, a folder per model"),
    ("report.html", "one page: the header, the tables, per class the best and worst pairs under every model"),
]
SKIP = ("*.lock", "*.tmp")


def _describe(name):
    """(place in FILES, description) of a file name; unknown names go last, undescribed."""
    return next(((k, what) for k, (pattern, what) in enumerate(FILES) if fnmatch.fnmatch(name, pattern)),
                (len(FILES), ""))


def outputs_block(folder, next_steps=(), width=118):
    """The block's text: `Outputs in <folder>/:`, a line per kind of file (the files one description fits, e.g. each
    model's table, share it; a folder shows its file count), then `Next:` and the commands or files to open."""
    groups = {}                                                  # place in FILES -> [names]
    for name in sorted(os.listdir(folder)):
        if any(fnmatch.fnmatch(name, p) for p in SKIP):
            continue
        if os.path.isdir(os.path.join(folder, name)):
            name += f"/ ({sum(len(files) for _, _, files in os.walk(os.path.join(folder, name)))} files)"
        k = _describe(name.split("/")[0])[0]
        groups.setdefault((k, name if k == len(FILES) else ""), []).append(name)   # an unknown file: a line each
    entries = [(", ".join(names), _describe(names[0].split("/")[0])[1]) for _, names in sorted(groups.items())]
    col = min(max((len(n) for n, _ in entries), default=0), 26) + 4  # where the descriptions start
    lines = [f"Outputs in {folder.rstrip('/')}/:"]
    for names, what in entries:
        text = textwrap.wrap(what, width - col) or [""]
        if len(names) > col - 4:                                 # a long name: the description on the next lines
            lines.append(f"  {names}")
            lines += [" " * col + t for t in text]
        else:
            lines.append(f"  {names:<{col - 2}s}{text[0]}")
            lines += [" " * col + t for t in text[1:]]
    if next_steps:
        lines += ["Next:"] + [f"  {step}" for step in next_steps]
    return "\n".join(line.rstrip() for line in lines)
