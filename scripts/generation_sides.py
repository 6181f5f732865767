"""Where does the model DRAW the finding a prompt names? A side test of generation, frozen vs tuned, on the phantom.

    python scripts/generation_sides.py --run runs/tune --seeds 4

For every distinct one-sided prompt of the run's held-out pairs (the phantom world's MS-CXR-loc test split: 44
prompts) and every seed, three samples from the SAME starting noise (sample.py `generate`): the prompt through the
frozen text encoder, the prompt through the learned rows, and a normal study ("no acute cardiopulmonary process", a
caption the phantom model was pretrained on for normal studies). The finding is where a prompted sample differs
most from the normal one: |sample - normal| that a shift of up to 2 px cannot explain (outlines move a pixel or two
between same-seed samples whatever the prompt), box-filtered over 5 x 5 px, at its peak. Per sample:
- drawn:   the peak difference is at least 0.1 of the image range (something visible was drawn);
- on_side: among the drawn ones, the peak lies on the side the prompt names (radiological convention, as the swap
           test: patient left = image right; midline x = W/2);
- drawn_on_side: both, over all samples (the one number: a finding drawn where the words say).
Per class, the means with 95% bootstrap CIs (grounding/experiment/tables.py), frozen vs tuned, printed and written
to runs/samples/generation_sides.{md,jsonl}. The measure needs a world where a finding is a local change on an
otherwise normal image; it is meant for the phantom model, not for real weights.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm import load_pipeline  # noqa: E402
from grounding.experiment import sources  # noqa: E402
from grounding.experiment.config import TrainConfig, load_config  # noqa: E402
from grounding.experiment.swap import prompt_side  # noqa: E402
from grounding.experiment.tables import models_markdown, summarise  # noqa: E402
from sample import generate, load_learned  # noqa: E402

NORMAL = "no acute cardiopulmonary process"
DRAWN = 0.1          # peak |sample - normal| (image range 0..1) that counts as a drawn finding
METRICS = ("drawn", "on_side", "drawn_on_side")


def finding_peak(image, normal, shift=2, window=5):
    """(peak difference, x of the peak) between a prompted sample and the normal one, (C, H, W) each.

    The difference a displacement of up to `shift` px cannot explain: per pixel the smallest |image - normal| over the
    normal shifted by -shift..shift px in x and y. A same-seed sample moves the lung and diaphragm outlines by a pixel
    or two whatever the prompt (thin bright lines in a plain difference, as strong as a faint finding); a drawn finding
    is new intensity over an area. Then a window x window box filter and its peak.
    """
    C, H, W = image.shape
    padded = F.pad(normal[None], (shift,) * 4, mode="replicate")[0]                # (C, H + 2s, W + 2s)
    diff = torch.stack([(image - padded[:, dy:dy + H, dx:dx + W]).abs().mean(0)
                        for dy in range(2 * shift + 1) for dx in range(2 * shift + 1)]).amin(0)   # (H, W)
    diff = F.avg_pool2d(diff[None, None], window, stride=1, padding=window // 2, count_include_pad=False)[0, 0]
    peak = int(diff.argmax())
    return float(diff.max()), peak % W


def side_row(image, normal, side, value_range):
    """One sample's row: drawn, on_side, drawn_on_side (see the docstring), the peak in units of the image range."""
    lo, hi = value_range
    peak, x = finding_peak((image - lo) / (hi - lo), (normal - lo) / (hi - lo))
    W = image.shape[-1]
    # column x (centre x + 0.5) lies on the image's right half when x + 0.5 > W / 2: the patient's left
    on_side = float((x + 0.5 > W / 2) == (side == "left"))
    drawn = float(peak >= DRAWN)
    # where nothing was drawn the peak is noise (often the image border): on_side is left out (NaN) there
    return {"peak": peak, "drawn": drawn, "on_side": on_side if drawn else float("nan"),
            "drawn_on_side": drawn * on_side}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/tune", help="train.py's run folder (config.yaml, learned_rows.safetensors)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (0, 1, ...)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (sample.py's default)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance (sample.py's default)")
    p.add_argument("--out", default="runs/samples/generation_sides", help="writes <out>.md and <out>.jsonl")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    cfg = load_config(TrainConfig, os.path.join(args.run, "config.yaml"))
    pipe = load_pipeline(cfg.weights)
    learned = load_learned(pipe, os.path.join(args.run, "learned_rows.safetensors"))
    data = sources.load(cfg, need_samples=False, image_size=pipe.image["size"])
    cases = sorted({(q["category"], q["prompt"]) for q in data.test_pairs if prompt_side(q["prompt"])[0]})
    texts = [t for _, t in cases]
    print(f"{len(cases)} one-sided prompts x {args.seeds} seeds, frozen and tuned, against {NORMAL!r}; "
          f"{data.description}")
    rows = []
    for seed in range(args.seeds):
        frozen = generate(pipe, texts + [NORMAL], [seed], None, args.steps, args.guidance)
        tuned = generate(pipe, texts, [seed], learned, args.steps, args.guidance)
        normal = frozen.pop()[0]
        for model, images in (("frozen", frozen), ("tuned", tuned)):
            for (category, text), x in zip(cases, images):
                side = prompt_side(text)[0]
                rows.append({"model": model, "category": category, "prompt": text, "seed": seed, "side": side,
                             **side_row(x[0], normal, side, pipe.image["range"])})
        print(f"seed {seed}: done")
    summaries = {m: summarise([r for r in rows if r["model"] == m], list(METRICS)) for m in ("frozen", "tuned")}
    table = models_markdown(summaries, list(METRICS))
    head = (f"Generation side test ({len(cases)} one-sided held-out prompts x {args.seeds} seeds, DDIM {args.steps} "
            f"steps, guidance {args.guidance:g}; rows {args.run}/learned_rows.safetensors; {data.description}).\n"
            f"drawn: peak |sample - normal sample of the same seed| (a 2-px shift tolerated) >= {DRAWN}; "
            "on_side: of the drawn ones, that peak on the named side; drawn_on_side: both, over all samples. "
            "Class means [95% bootstrap CI].\n")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".jsonl", "w") as f:
        f.writelines(json.dumps({k: None if v != v else v for k, v in r.items()}) + "\n" for r in rows)  # NaN -> null
    with open(args.out + ".md", "w") as f:
        f.write(head + "\n" + table + "\n")
    print(head + "\n" + table)
    print(f"wrote {args.out}.md and {args.out}.jsonl")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"generation_sides.py: error: {e}")
