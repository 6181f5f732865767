"""Tokenizer throughput: ours (ldm/tokenizer.py, pure Python) vs transformers' CLIPTokenizer, on radiology prompts.

transformers 5 has only the `tokenizers`-backed (Rust) CLIPTokenizer; the pure-Python "slow" one the issue
names is gone (with transformers 4 installed, `CLIPTokenizer` is the slow one and is what this script times).
Both tokenizers get the same vocabulary: the real CLIP BPE when tests/clip_vocab.py finds it (env
CLIP_BPE_PATH or its cache), else a BPE trained on the prompts. Ours is timed cold (a fresh tokenizer, empty
word cache) and warm (the cache filled by an earlier pass, as in a training loop that sees the same prompts).
Both produce (B, 77) id tensors; the ids are checked equal.

  python benchmarks/tokenizer.py --prompts 2000 --runs 5
"""
import itertools
import os
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not benchmarks/ (no shadowing)
from benchmarks.common import alternate, base_parser, env_line, median, write_json  # noqa: E402

import torch  # noqa: E402

from ldm.tokenizer import CLIPTokenizer, train_bpe  # noqa: E402

SIDES = ["left", "right", "bilateral"]
ZONES = ["apical", "upper", "middle", "lower", "basal", "retrocardiac", "costophrenic", "perihilar"]
FINDINGS = ["atelectasis", "pleural effusion", "pneumothorax", "consolidation", "lung opacity", "edema",
            "pneumonia", "nodular opacity", "scarring"]
MODIFIERS = ["small", "moderate", "large", "new", "persistent", "increased", "mild"]


def radiology_prompts(n):
    """n distinct-ish prompts in the paper's style ("small left lower atelectasis")."""
    combos = itertools.product(MODIFIERS, SIDES, ZONES, FINDINGS)
    out = [f"{m} {s} {z} {f}" for m, s, z, f in itertools.islice(itertools.cycle(combos), n)]
    return out


def load_tokenizers(prompts):
    """(ours, transformers', vocabulary name). Ours is rebuilt from the files for each cold run."""
    transformers = __import__("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    try:                                    # only the env variable or the cache: never a download from here
        from clip_vocab import CACHED
        path = os.environ.get("CLIP_BPE_PATH") or (str(CACHED) if CACHED.exists() else None)
    except ImportError:
        path = None
    if path:
        tok, name = CLIPTokenizer.from_openai_bpe(path, pad_id=49407), "real CLIP BPE (49,408 tokens)"
    else:
        tok = train_bpe(prompts, vocab_size=1000)
        name = f"BPE trained on the prompts ({tok.vocab_size} tokens; real CLIP vocabulary not found)"
    folder = Path(tempfile.mkdtemp(prefix="bench_tok_"))
    tok.save(folder)
    hf = transformers.CLIPTokenizer.from_pretrained(str(folder))
    return folder, hf, name


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=2000, help="prompts per call")
    args = p.parse_args(argv)
    prompts = radiology_prompts(args.prompts)
    folder, hf, vocab_name = load_tokenizers(prompts)
    warm = CLIPTokenizer.from_dir(folder)
    warm(prompts)                                                    # fills the word cache

    def ours_cold():
        return CLIPTokenizer.from_dir(folder)(prompts)               # includes reading the files

    def hf_call():
        enc = hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return enc["input_ids"]

    same = torch.equal(warm(prompts), hf_call())
    load_s = median(alternate({"load": lambda: CLIPTokenizer.from_dir(folder)}, 3, 0, "cpu")["load"])
    times = alternate({"ours_cold": ours_cold, "ours_warm": lambda: warm(prompts), "transformers": hf_call},
                      args.runs, args.warmup, "cpu")
    row = {"benchmark": "tokenizer", "vocab": vocab_name, "prompts": len(prompts), "ids_equal": same,
           "ours_load_s": load_s, **{f"{k}_s": median(v) for k, v in times.items()}}
    for k in ("ours_cold", "ours_warm", "transformers"):
        row[f"{k}_prompts_per_s"] = len(prompts) / row[f"{k}_s"]
    row["cold_ratio"] = row["ours_cold_s"] / row["transformers_s"]
    row["warm_ratio"] = row["ours_warm_s"] / row["transformers_s"]
    print(env_line("cpu"), f"| {vocab_name} | {len(prompts)} prompts per call | ids identical: {same}")
    print(f"ours (cold: load files + empty cache) {row['ours_cold_prompts_per_s']:,.0f} prompts/s "
          f"(of which loading {load_s * 1e3:.0f} ms)")
    print(f"ours (warm cache)                     {row['ours_warm_prompts_per_s']:,.0f} prompts/s")
    print(f"transformers CLIPTokenizer            {row['transformers_prompts_per_s']:,.0f} prompts/s")
    print(f"time ratio ours/transformers: cold {row['cold_ratio']:.2f}, warm {row['warm_ratio']:.2f}")
    write_json(args.json, {"benchmark": "tokenizer", "env": env_line("cpu"), "rows": [row]})
    return row


if __name__ == "__main__":
    main()
