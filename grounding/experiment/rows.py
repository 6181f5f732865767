"""The learned anatomy rows as a file: save them alone (train.py's learned_rows.safetensors) and load them back,
checked against the model they are loaded into.

A rows file is a safetensors file with the tensors `anatomy` (K, D) (and `ctx` (n_ctx, D) with CoOp context
tokens) and __metadata__: the codebook's tokens and ids, shared_tokens, n_ctx, the vocabulary size, a sha256 of the
frozen text encoder's input embedding table, "heatmap" (the layers, DDIM steps and window the rows were tuned and
evaluated with, and the training window) and "format": "anatomy-prompts/1" (docs/formats.md "Files this repository
writes"). Rows learned against one text encoder mean nothing to another with the same tokenizer, so loading refuses
a file whose identity differs from the model's, naming what differs. Rows read best with the layers and steps they
were tuned on, so a loaded LearnablePrompts carries its file's heatmap settings (`prompts.heatmap_settings`): the
default of extract_heatmaps(cfg=None), evaluate.py, classify.py and ground.py, where an explicit setting wins.
"""
import json
import os

import torch

from ldm.weights.safetensors import load_file, read_header, save_file
from grounding.experiment.provenance import tensor_digest


def rows_identity(prompts):
    """What learned rows are only valid with: vocabulary size, token ids, shared_tokens, text encoder fingerprint.

    The fingerprint is a sha256 of the frozen input embedding table (fp32 bytes).
    """
    return {"vocab_size": str(prompts.tokenizer.vocab_size), "ids": json.dumps(prompts.anatomy_ids),
            "shared_tokens": prompts.shared_tokens,
            "text_encoder_sha256": tensor_digest(prompts.text_encoder.token_embedding.weight)}


def save_rows(prompts, path, hcfg=None, train_window=None):
    """Write the learned rows of a LearnablePrompts (and its context tokens) with their identity, and with the
    heatmap settings they are read with (a HeatmapConfig: its resolved layers, DDIM steps and window; train.py
    passes its evaluation's) and the training window."""
    tensors = {"anatomy": prompts.anatomy.detach().cpu().contiguous()}
    if prompts.n_ctx:
        tensors["ctx"] = prompts.ctx.detach().cpu().contiguous()
    meta = {"tokens": json.dumps(prompts.token_strings(prompts.anatomy_ids)), "ids": json.dumps(prompts.anatomy_ids),
            "shared_tokens": prompts.shared_tokens, "n_ctx": str(prompts.n_ctx), **rows_identity(prompts),
            "format": "anatomy-prompts/1"}
    if hcfg is not None:
        meta["heatmap"] = json.dumps({"layers": list(hcfg.resolved_layers()), "num_steps": int(hcfg.num_steps),
                                      "window": [int(t) for t in hcfg.window],
                                      "train_window": [int(t) for t in train_window] if train_window else None})
    save_file(tensors, path, metadata=meta)


def rows_settings(path):
    """The heatmap settings a rows file records, as HeatmapConfig fields {"layers", "num_steps", "window"}
    (tuples), or None for a file written before they were recorded. Reads the header only."""
    meta = read_header(path).get("__metadata__") or {}
    if "heatmap" not in meta:
        return None
    try:
        h = json.loads(meta["heatmap"])
        layers, steps, window = tuple(int(i) for i in h["layers"]), int(h["num_steps"]), tuple(int(t) for t in h["window"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: __metadata__ 'heatmap' should be JSON with layers, num_steps and window, got "
                         f"{_short(meta['heatmap'])}") from None
    if not layers or min(layers) < 0 or steps < 1 or len(window) != 2 or not 0 <= window[0] < window[1]:
        raise ValueError(f"{path}: __metadata__ 'heatmap' {_short(meta['heatmap'])} is out of range (layers >= 0, "
                         "num_steps >= 1, window [lo, hi) with 0 <= lo < hi)")
    return {"layers": layers, "num_steps": steps, "window": window}


def describe_settings(s):
    """'layers (4, 5), 25 DDIM steps, window [400, 600)' for a rows_settings dict."""
    return f"layers {tuple(s['layers'])}, {s['num_steps']} DDIM steps, window [{s['window'][0]}, {s['window'][1]})"


def apply_rows_settings(cfg, rows_path, overrides=()):
    """Make a rows file's heatmap settings the defaults of an evaluation of `cfg` (evaluate.py, classify.py): its
    layers and DDIM steps replace the config's `layers` and `num_inference_steps` unless given as key=value on the
    command line (`overrides`: those win), and its window replaces the test window. Returns (the window to use,
    or None for the test window, a line saying which settings apply and where each comes from)."""
    if not rows_path:
        return None, ""
    s = rows_settings(rows_path)
    if s is None:
        return None, (f"note: {rows_path} records no heatmap settings (written before they were): the config's "
                      f"apply, layers {tuple(cfg.layers) or 'the family preset'}, {cfg.num_inference_steps} DDIM "
                      "steps, the test window")
    given = {o.split("=", 1)[0].strip() for o in overrides}
    said = []
    for key, value in (("layers", list(s["layers"])), ("num_inference_steps", s["num_steps"])):
        if key in given and getattr(cfg, key) != value:
            said.append(f"{key}={getattr(cfg, key)} from the command line instead of the rows' {value}")
        else:
            setattr(cfg, key, value)
    return s["window"], (f"heatmap settings of the learned rows {rows_path}: {describe_settings(s)}"
                         + (f" ({'; '.join(said)})" if said else ""))


def load_rows(prompts, path):
    """Load rows written by `save_rows` into `prompts`; tokens, ids, vocabulary, mode and text encoder must match.

    Returns `prompts`, carrying the file's heatmap settings (`heatmap_settings`, None for an older file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"learned rows {path} not found (train.py writes <out_dir>/learned_rows.safetensors)")
    meta = read_header(path).get("__metadata__") or {}
    if "tokens" not in meta:
        raise ValueError(f"{path}: no 'tokens' in __metadata__; not a file written by save_rows")
    for key in ("tokens", "ids"):
        if key in meta:
            try:
                json.loads(meta[key])
            except json.JSONDecodeError:
                raise ValueError(f"{path}: __metadata__ {key!r} is not JSON ({_short(meta[key])}); "
                                 "not a file written by save_rows") from None
    if not str(meta.get("n_ctx", "0")).isdigit():
        raise ValueError(f"{path}: __metadata__ 'n_ctx' must be a whole number, got {meta['n_ctx']!r}")
    mine = rows_identity(prompts)
    missing = [k for k in mine if k not in meta]
    if missing:  # a file from before these were recorded: it loads, but cannot be checked
        print(f"note: {path} does not record {missing}; it cannot be checked against this model")
    diffs = [k for k in mine if k in meta and meta[k] != mine[k]]
    if diffs == ["ids"]:  # same vocabulary, encoder and mode: another codebook, reported by its tokens below
        diffs = [] if json.loads(meta["tokens"]) != prompts.token_strings(prompts.anatomy_ids) else diffs
    if diffs:
        said = {"vocab_size": "vocabulary size", "ids": "token ids", "shared_tokens": "shared_tokens mode",
                "text_encoder_sha256": "text encoder (input embedding table)"}
        raise ValueError(f"{path} was learned with another " + ", another ".join(said[k] for k in diffs) + ": "
                         + "; ".join(f"{k} {_short(meta[k])} in the file vs {_short(mine[k])} here" for k in diffs)
                         + ". Load it with the model, tokenizer and shared_tokens it was trained with.")
    tokens, mine = json.loads(meta["tokens"]), prompts.token_strings(prompts.anatomy_ids)
    if tokens != mine:
        diff = sorted(set(tokens) ^ set(mine))
        raise ValueError(f"{path}: its {len(tokens)} learned rows are for tokens that differ from this "
                         f"codebook's {len(mine)} (e.g. {diff[:6]}); same tokenizer and shared_tokens="
                         f"{meta.get('shared_tokens')!r}?")
    if int(meta.get("n_ctx", 0)) != prompts.n_ctx:
        raise ValueError(f"{path}: saved with n_ctx={meta.get('n_ctx')}, this model has n_ctx={prompts.n_ctx}")
    tensors = load_file(path)
    for key in ("anatomy", "ctx") if prompts.n_ctx else ("anatomy",):
        if key not in tensors:
            raise ValueError(f"{path}: no {key!r} tensor; not a file written by save_rows")
        if not torch.isfinite(tensors[key]).all():
            raise ValueError(f"{path}: tensor {key!r} holds NaN or inf values (a diverged run?); use an earlier "
                             "checkpoint's rows")
    if tuple(tensors["anatomy"].shape) != tuple(prompts.anatomy.shape):
        raise ValueError(f"{path}: anatomy shape {tuple(tensors['anatomy'].shape)} != {tuple(prompts.anatomy.shape)}")
    with torch.no_grad():
        prompts.anatomy.copy_(tensors["anatomy"])
        if prompts.n_ctx:
            prompts.ctx.copy_(tensors["ctx"])
    prompts.heatmap_settings = rows_settings(path)   # None: an older file (extract_heatmaps' defaults apply)
    return prompts


def _short(value, n=60):
    value = str(value)
    return value if len(value) <= n else value[:n] + "..."
