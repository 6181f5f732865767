"""Phrase-grounding evaluation with the paper's protocol (docs/paper.md sections 6-8).

    python evaluate.py --split mscxr-loc --prompts runs/tune/learned_rows.safetensors --baseline
    python evaluate.py --split vindr --config configs/mimic_monai.yaml --prompts ...
    torchrun --nproc_per_node 2 evaluate.py --split phantom ...        # pairs sharded over ranks, one table

Splits: "mscxr" (every MS-CXR pair, its own phrase as the prompt), "mscxr-loc" (pairs with a location, prompts
standardised to "{location} {pathology}": the paper's MS-CXR-loc), "vindr" (VinDr-CXR test, prompts synthesised from
the boxes by nearest LUT Gaussian), "phantom" (= mscxr-loc of the embedded synthetic world). Data paths come from
the same config as train.py (tune.yaml by default: the SYNTHETIC phantom world). Writes, under --out:
rows_<model>.jsonl (per pair, appended as it goes; a rerun resumes them only when its .provenance.json names the same
weights, prompts, split, heatmap settings and code, else it stops), table_<model>.md/.json (per class, 95% bootstrap
CIs), comparison.md (frozen vs tuned), swap.md (--swap: the location-swap test), overlays/<model>/*.png,
report.html (one self-contained page: header, tables, best and worst overlays per class; grounding/experiment/report.py),
and a header naming data, weights, prompts, code and the layers/steps of each model evaluated; it ends by listing
them (the Outputs block). `--help` says what each split is and how many pairs it holds. key=value overrides may go
anywhere on the command line. One inversion per image batch serves every model evaluated (--baseline, --untuned,
--prompts) and the swapped prompts. `--task classify` runs the grounded classification instead (classify.py).
"""
import argparse
import dataclasses
import json
import os
import sys

import torch

from ldm.weights.folder import load_pipeline
from grounding.experiment import distributed, preflight, provenance, sources
from grounding.experiment.provenance import code_version
from grounding.experiment.rows import apply_rows_settings, load_rows
from grounding.experiment.config import check_layers, load_config, TrainConfig
from grounding.data.curation import class_counts
from grounding.experiment.evaluation import Model, compare_models
from grounding.experiment.outputs import outputs_block
from grounding.prompts import LearnablePrompts


# What each --split scores and how many pairs it holds: the paper's counts on the real releases (docs/paper.md
# section 8), the phantom world's as the default world (phantom_seed 0) gives them (tests/test_evaluation.py checks)
SPLITS_HELP = """splits (--split), with their pairs: the real releases' as the paper counts them; the SYNTHETIC
phantom world's (data: phantom, as in tune.yaml) as the default world (phantom_seed 0) holds them. The data report
printed first gives the exact count of a run, and what it dropped and why.
  mscxr      every MS-CXR pair, its own phrase as the prompt. Real: MS-CXR v0.1 has 1,162 pairs.
             Phantom: 257 with tune.yaml's mscxr_split: test, 300 with mscxr_split: all.
  mscxr-loc  the MS-CXR pairs whose phrase names a location, the prompt standardised to "{location} {pathology}":
             the paper's MS-CXR-loc. Real: 1,043 pairs (mscxr_split: all, the default on real data).
             Phantom: 234 with mscxr_split: test (the quickstart's held-out table), 276 with all.
  vindr      VinDr-CXR test, out of distribution: no phrases, prompts made from the boxes (nearest LUT Gaussian).
             Real: 443 pairs in 7 classes (no edema; needs vindr_csv and vindr_images). Phantom: 169.
  phantom    the same pairs as mscxr-loc (the name for the phantom world): 234 with tune.yaml, 276 with all."""


def parse_args(argv=None):
    """(TrainConfig with the data paths and overrides, the command-line arguments); bad values end with the message."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=SPLITS_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", required=True, choices=["mscxr", "mscxr-loc", "vindr", "phantom"],
                   help="which pairs to score (listed below with their counts)")
    p.add_argument("--config", default="tune.yaml", help="train.py config giving the data paths (default tune.yaml)")
    p.add_argument("--weights", default=None, help="converted model folder (default: the config's weights)")
    p.add_argument("--prompts", default=None, help="learned anatomy rows (.safetensors from train.py); default: "
                   "<config out_dir>/learned_rows.safetensors when neither --prompts nor --baseline is given")
    p.add_argument("--baseline", action="store_true", help="also (or only) evaluate the frozen model")
    p.add_argument("--untuned", action="store_true", help="also score the tuned layers with the ORIGINAL embeddings "
                   "(tuned minus untuned = what the learned rows alone bring)")
    p.add_argument("--swap", action="store_true", help="location-swap test: score each one-sided prompt with left and "
                   "right swapped too (grounding/experiment/swap.py)")
    p.add_argument("--out", default=None, help="output folder (default runs/eval_<split>)")
    p.add_argument("--batch", type=int, default=16, help="images inverted together")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N pairs (0 = all)")
    p.add_argument("--overlays", type=int, default=8, help="heatmap overlay PNGs written per model")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--task", default="ground", choices=["ground", "classify"],
                   help="ground (this page) | classify: grounded classification, see classify.py")
    p.add_argument("--report-pairs", type=int, default=2, help="report.html: best and worst pairs shown per class "
                   "(by tuned-minus-frozen mIoU); 0 = no report.html")
    p.add_argument("--check", action="store_true", help="read every input of this split, print one report of what "
                   "is found and missing, write nothing; exit 1 if anything is missing (preflight.py)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come before, between or after the flags
    for flag, low in (("batch", 1), ("bootstrap", 1), ("limit", 0), ("overlays", 0), ("report_pairs", 0)):
        if getattr(args, flag) < low:
            p.error(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}")
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:  # a bad key or value: its message, not a traceback
        p.error(str(e))
    if args.prompts and not os.path.isfile(args.prompts):   # before the data and the model load
        p.error(f"--prompts {args.prompts}: no such file (train.py writes <out_dir>/learned_rows.safetensors)")
    return cfg, args


def main(argv=None):
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", default="ground", choices=["ground", "classify"])
    known, rest = task.parse_known_args(argv)
    if known.task == "classify":  # grounded classification (paper App. K): classify.py takes the other arguments
        import classify
        return classify.main(rest)
    cfg, args = parse_args(argv)
    if args.weights:
        cfg.weights = args.weights
    if args.check:
        sys.exit(preflight.main(cfg, args.config, f"evaluate.py --split {args.split}", vindr=args.split == "vindr",
                                outputs=[("--out", args.out or f"runs/eval_{args.split}")]))
    if cfg.threads:  # the config key train.py and classify.py honour too (it was silently ignored here)
        torch.set_num_threads(cfg.threads)
    if not args.prompts and not args.baseline:  # default: the frozen model, plus the config's tuned rows if present
        args.baseline = True
        default = os.path.join(cfg.out_dir, "learned_rows.safetensors")
        if os.path.exists(default):
            args.prompts = default
        print("no --prompts/--baseline given: evaluating the frozen model"
              + (f" and the learned rows {default} (the config's out_dir)" if args.prompts else ""))
    window, said = apply_rows_settings(cfg, args.prompts, args.overrides)   # the rows' own layers, steps, window
    if said:
        print(said)

    rank, world = distributed.setup(cfg.device)
    out = args.out or f"runs/eval_{args.split}"
    provenance.check_writable(out, "evaluate.py --out")

    pipe = load_pipeline(cfg.weights, device=cfg.device)
    check_layers("layers", cfg.layers, len(pipe.unet.cross_attention_layers()), f"{cfg.weights} (family {pipe.family})")
    # a LUT built here goes under --out: never into the training run's folder (cfg.out_dir), whose LUT is compared
    data = sources.load(cfg, need_samples=False, image_size=pipe.image["size"], lut_dir=out)
    os.makedirs(out, exist_ok=True)  # the inputs checked out: only now is the output folder made
    pairs = all_pairs = data.pairs(args.split)
    if args.limit:
        pairs = pairs[:args.limit]
    subset = f" (MS-CXR subset mscxr_split: {cfg.mscxr_split})" if args.split != "vindr" else ""
    header = (f"Data: {data.description}; split {args.split}{subset}: {len(pairs)} pairs; metric_protocol {cfg.metric_protocol}\n"
              f"Pairs per class: {class_counts(pairs)}"
              + (f" (--limit: the first {len(pairs)} of {len(all_pairs)})" if len(pairs) < len(all_pairs) else "") + "\n"
              f"Weights: {os.path.abspath(cfg.weights)} (family {pipe.family})\n"
              f"Prompts: {args.prompts or '(frozen text encoder only)'}\nCode: {code_version()}\n")
    # the models evaluated, and only they, in the header (and so in every file it opens)
    names = ["frozen"] * args.baseline + ["untuned"] * args.untuned + ["tuned"] * bool(args.prompts)
    hcfgs = {name: provenance.eval_heatmap_config(cfg, pipe.family, tuned=name != "frozen") for name in names}
    hcfgs = {name: dataclasses.replace(h, window=window or h.window) for name, h in hcfgs.items()}
    header += "Heatmaps: " + "; ".join(provenance.describe_heatmap(n, h) for n, h in hcfgs.items()) + "\n"
    if rank == 0:
        print(header + data.report)

    models = []
    if args.baseline:
        models.append(("frozen", None))
    if args.untuned:
        models.append(("untuned", None))
    if args.prompts:
        prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens=cfg.shared_tokens, n_ctx=cfg.n_ctx)
        load_rows(prompts, args.prompts)
        models.append(("tuned", prompts))
    cols = [Model(name, prompts, hcfgs[name],
                  os.path.join(out, f"rows_{name}.rank{rank}.jsonl" if world > 1 else f"rows_{name}.jsonl"),
                  provenance.rows_record(pipe, cfg.weights, hcfgs[name], prompts, args.prompts if prompts else None,
                                         split=args.split, data=data.description),
                  os.path.join(out, "overlays", name)) for name, prompts in models]
    # one inversion per image batch serves every model (and the swapped prompts); rank 0 writes the one table
    rows, summaries, tables, swap_md, table = compare_models(
        pipe, pairs, cols, batch_size=args.batch, swap=args.swap, n_boot=args.bootstrap, rank=rank, world_size=world,
        n_overlays=args.overlays if rank == 0 else 0, desc=args.split, protocol=cfg.metric_protocol)
    for name, md in tables.items():
        with open(os.path.join(out, f"table_{name}.md"), "w") as f:
            f.write(header + "\n" + md + "\n")
        with open(os.path.join(out, f"table_{name}.json"), "w") as f:
            json.dump({"header": header, "summary": summaries[name]}, f, indent=1)
        print(f"\n{name}:\n{md}")
    if swap_md:
        with open(os.path.join(out, "swap.md"), "w") as f:
            f.write(header + "\n" + swap_md + "\n")
        print(f"\n{swap_md}")
    if table:
        with open(os.path.join(out, "comparison.md"), "w") as f:
            f.write(header + "\n" + table + "\n")
        print(f"\n{table}")
    if rank == 0 and args.report_pairs:  # one self-contained page: header, tables, best/worst overlays
        from grounding.experiment.report import write_evaluation_report
        size = write_evaluation_report(os.path.join(out, "report.html"), pipe, header,
                                       [(name, hcfgs[name], pr) for name, pr in models], summaries, rows, pairs,
                                       batch=args.batch, swap=args.swap, n_show=args.report_pairs,
                                       title=f"Phrase grounding, split {args.split}")
        print(f"wrote {os.path.join(out, 'report.html')} ({size / 1e6:.1f} MB)")
    if rank == 0:
        page = os.path.join(out, "report.html")
        print("\n" + outputs_block(out, [f"open {page} in a browser: the tables, and per class the best and worst "
                                         "pairs under every model"] if args.report_pairs else []))
    distributed.teardown(world)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: its message, not a traceback
        sys.exit(f"evaluate.py: error: {e}")
