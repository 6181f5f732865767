"""Grounded pneumothorax classification with the frozen LDM (paper App. K, Table 6).

    python classify.py                                   # phantom world, frozen heatmaps + runs/tune's learned rows
    python classify.py --prompts runs/tune/learned_rows.safetensors n_draws=32
    python classify.py --config configs/mimic_monai.yaml --prompts ... chexpert_csv=.../mimic-cxr-2.0.0-chexpert.csv
    python evaluate.py --task classify ...               # the same script

The frozen LDM scores "pneumothorax" against "No acute cardiopulmonary process" on the MS-CXR-loc pneumothorax pairs
and as many MIMIC-CXR "No Finding" test images, by its noise-prediction error weighted by each prompt's heatmap
(grounding/experiment/classify.py), with heatmaps from the frozen model (fixed or standardised prompt) or the tuned rows, and
without weights (the plain zero-shot diffusion classifier). AUROC overall and per mIoU half with 95% bootstrap CIs,
and a one-sided test that the high half's AUROC is the larger (grounding/auroc.py).
Keys: the data/weights keys of train.py's TrainConfig (--config) and ClassifyConfig's (grounding/experiment/classify.py), both
as key=value. Writes under --out (default runs/classify), once the inputs have checked out: rows.jsonl (per image,
appended; a rerun resumes), settings.json, table.md / table.json (Table 6's layout) with a header naming data,
weights, prompts, code and settings (and lut.json when the LUT is built here); the Outputs block at the end lists them.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from ldm.weights.folder import load_pipeline
from grounding.experiment import preflight, sources
from grounding.experiment.classify import ClassifyConfig, classification_summary, score_batch, summary_markdown
from grounding.experiment.classify_data import classification_cases
from grounding.experiment.rows import apply_rows_settings, load_rows
from grounding.experiment.config import load_config, TrainConfig
from grounding.experiment.evaluation import read_rows
from grounding.prompts import LearnablePrompts
from grounding.experiment.outputs import outputs_block
from grounding.experiment.provenance import (check_writable, code_version, describe_heatmap, eval_heatmap_config,
                                             folder_digest, prompts_digest)


def split_overrides(overrides):
    """key=value strings -> (TrainConfig ones, ClassifyConfig ones); a key known to neither is an error."""
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    cls_keys = {f.name for f in dataclasses.fields(ClassifyConfig)}
    train, cls = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in cls_keys:
            cls.append(item)
        elif key in train_keys:
            train.append(item)
        else:
            raise ValueError(f"unknown key {key!r}: classification keys are {sorted(cls_keys)}; data and model keys "
                             f"are train.py's TrainConfig fields")
    return train, cls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tune.yaml", help="train.py config giving data paths and weights")
    p.add_argument("--weights", default=None, help="converted model folder (default: the config's weights)")
    p.add_argument("--prompts", default=None, help="learned anatomy rows for the 'tuned' heatmaps (default: "
                   "<config out_dir>/learned_rows.safetensors if it exists; else the tuned source is left out)")
    p.add_argument("--out", default="runs/classify", help="output folder")
    p.add_argument("--check", action="store_true", help="read every input, print one report of what is found and "
                   "missing, write nothing (grounding/experiment/preflight.py); exit 1 if anything is missing")
    p.add_argument("overrides", nargs="*", help="key=value: TrainConfig or ClassifyConfig keys")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come before, between or after the flags
    try:
        train_over, cls_over = split_overrides(args.overrides)
        cfg = load_config(TrainConfig, args.config, train_over)
        ccfg = load_config(ClassifyConfig, None, cls_over)
    except (ValueError, FileNotFoundError) as e:  # a bad key or value: its message, not a traceback
        p.error(str(e))
    if args.weights:
        cfg.weights = args.weights
    if args.check:
        sys.exit(preflight.main(cfg, args.config, "classify.py", outputs=[("--out", args.out)],
                                chexpert_csv=(ccfg.chexpert_csv or "") if cfg.data == "mimic" else None))
    if args.prompts is None:
        default = os.path.join(cfg.out_dir, "learned_rows.safetensors")
        args.prompts = default if os.path.exists(default) else None
    window, said = apply_rows_settings(cfg, args.prompts, train_over)   # the rows' own layers, steps, window
    if said:
        print(said)
    if args.prompts is None and "tuned" in ccfg.sources:
        print("no learned rows (--prompts) found: the 'tuned' heatmap source is left out")
        ccfg.sources = [s for s in ccfg.sources if s != "tuned"]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_writable(args.out, "classify.py --out")   # before any work; the folder itself once the inputs check out

    pipe = load_pipeline(cfg.weights, device=cfg.device)
    prompts = None
    if args.prompts:
        prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens=cfg.shared_tokens, n_ctx=cfg.n_ctx)
        load_rows(prompts, args.prompts)
    data = sources.load(cfg, need_samples=False, image_size=pipe.image["size"],  # crop-band drops at the model size
                        lut_dir=args.out, write_lut=False)  # a LUT built here goes under --out, never into the run's
    positives, negatives, lines = classification_cases(cfg, data, ccfg)
    os.makedirs(args.out, exist_ok=True)   # the inputs checked out: only now is anything written
    data.save_lut()
    # the heatmaps the run's own evaluation reads (train.py's final table): layers, Otsu, DDIM steps of the config,
    # or of the rows file (apply_rows_settings above)
    hcfgs = {m: eval_heatmap_config(cfg, pipe.family, m == "tuned") for m in ("frozen", "tuned")}
    hcfgs = {m: dataclasses.replace(h, window=window or h.window) for m, h in hcfgs.items()}
    heatmaps = "; ".join(describe_heatmap(m, h) for m, h in hcfgs.items())
    # what the weights and rows ARE, not only where they lie: retraining into the same out_dir must not resume
    settings = dict(dataclasses.asdict(ccfg), weights=os.path.abspath(cfg.weights), prompts=args.prompts,
                    weights_sha256=folder_digest(cfg.weights), prompts_sha256=prompts_digest(prompts),
                    mscxr_split=cfg.mscxr_split, metric_protocol=cfg.metric_protocol, data=data.description,
                    heatmaps=heatmaps)
    settings.pop("limit")      # how many cases are scored does not change a row: a longer run resumes a shorter one
    header = (f"Data: {data.description}; {len(positives)} {ccfg.category} pairs vs {len(negatives)} No Finding images\n"
              f"Weights: {os.path.abspath(cfg.weights)} (family {pipe.family}, {pipe.prediction_type}; the error is "
              f"taken on eps, v converted as eps = sqrt(abar) v + sqrt(1 - abar) z_t)\n"
              f"Prompts: {args.prompts or '(frozen text encoder only)'}\nCode: {code_version()}\n"
              f"Settings: {ccfg.n_draws} paired (t, eps) draws per image (t stratified, seed {ccfg.draw_seed}), "
              f"{ccfg.error_norm} error, normals binned {ccfg.normal_bins}, {ccfg.test} test, "
              f"{ccfg.n_boot} bootstrap resamples, mIoU bins by metric_protocol {cfg.metric_protocol}\n"
              f"Heatmaps: {heatmaps}\n")
    print(header + data.report + "\n" + "\n".join(lines))

    # a rerun resumes only with the same settings (rows of other settings would mix silently otherwise)
    settings_path, rows_path = os.path.join(args.out, "settings.json"), os.path.join(args.out, "rows.jsonl")
    done = read_rows(rows_path)
    if os.path.exists(settings_path) and done:   # settings with no row scored bind nothing
        with open(settings_path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(settings)):
            changed = sorted(k for k in set(settings) | set(old) if old.get(k) != json.loads(json.dumps(settings)).get(k))
            raise ValueError(f"{args.out} holds rows made with other settings ({changed}): use another --out or "
                             "delete it")
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=1)
    cases = [c for pair in zip(positives, negatives) for c in pair]       # mixed batches, any interruption fair
    cases += positives[len(negatives):] + negatives[len(positives):]
    todo = [c for c in cases if c["pair_id"] not in done]
    if done:
        print(f"resuming: {len(cases) - len(todo)} of {len(cases)} images already scored in {rows_path}")
    t0 = time.time()
    with open(rows_path, "a") as out:
        for start in range(0, len(todo), ccfg.batch):
            chunk = todo[start:start + ccfg.batch]
            for row in score_batch(pipe, chunk, ccfg, prompts, hcfgs, protocol=cfg.metric_protocol):
                done[row["pair_id"]] = row
                out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"scored {min(start + ccfg.batch, len(todo))}/{len(todo)} images, "
                  f"{(time.time() - t0) / min(start + ccfg.batch, len(todo)):.2f} s/image", flush=True)
    seconds = time.time() - t0
    rows = [done[c["pair_id"]] for c in cases]
    summary = classification_summary(rows, ccfg)
    table = summary_markdown(summary, ccfg)
    timing = (f"Wall time: {seconds:.1f} s for {len(todo)} images ({seconds / max(len(todo), 1):.2f} s per image: "
              f"every source's heatmaps + {ccfg.n_draws} UNet calls per prompt text, on {cfg.device})\n"
              if todo else "")
    fallbacks = sum(len(r["fallback"]) for r in rows)
    note = (f"{fallbacks} (image, source) heatmaps were constant and were scored unweighted\n" if fallbacks else "")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(header + timing + note + "\n" + table + "\n")
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump({"header": header, "seconds": seconds, "images_scored": len(todo), "summary": summary}, f, indent=1)
    print("\n" + timing + note + table)
    print("\n" + outputs_block(args.out))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: its message, not a traceback
        sys.exit(f"classify.py: error: {e}")
