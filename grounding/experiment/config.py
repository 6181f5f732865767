"""Flat YAML experiment configs with command-line overrides (`key=value`), checked against a dataclass.

nanoGPT's configurator, made strict: a YAML file and `key=value` overrides fill the fields of a dataclass whose
defaults are the documented settings. Unknown keys and values of the wrong type are errors that name the key, so a
typo never silently falls back to a default. No exec, no registries.

`TrainConfig` (end of the file) is the one documented list of an experiment's settings: train.py reads it,
evaluate.py, classify.py and scripts/ read the same keys from a tuning run's config.yaml. Its field comments are the
keys' only documentation: `key_docs` reads them from this file's source, and `train.py --help` prints them.
"""
import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field

import yaml

from grounding.heatmap import TRAIN_WINDOW


def _check_type(name, value, annotation):
    """Return `value` converted to the field's type, or raise a ValueError naming the key."""
    origin = list if annotation in (list, tuple) else typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # YAML reads `1` as int; a float field accepts it
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # PyYAML (YAML 1.1) reads `1e-4` as a string: accept it for a float field
        except ValueError:
            pass
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ValueError(f"config key {name!r}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {name!r}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(annotation) or (object,)
        return [_check_type(f"{name}[{i}]", v, inner) if inner is not object else v for i, v in enumerate(value)]
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _check_type(name, value, args[0])
    return value


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ValueError(f"config file {key_node.start_mark.name}: key {key!r} is given twice (lines "
                                 f"{seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(cls, path=None, overrides=()):
    """Build `cls` (a dataclass) from a YAML file and `key=value` strings; later sources win."""
    values, source = {}, {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.load(f, Loader=_StrictLoader) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:  # a folder, unreadable, binary, or not YAML
            raise ValueError(f"config file {path} cannot be read as YAML ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not loaded:
            print(f"config file {path} is empty: running on the built-in defaults (plus any key=value overrides)")
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path}: expected a mapping of key: value, got {type(loaded).__name__}")
        values.update(loaded)
        source.update({k: path for k in loaded})
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        values[key.strip()] = yaml.safe_load(raw)  # YAML typing: 1e-4 -> float, [4,5] -> list, true -> bool
        source[key.strip()] = "the command line"
    values = _drop_retired(cls, values, path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # an empty value (`vindr_csv=` or `vindr_csv:`) of a key whose default is "" means "not configured"
    values = {k: "" if v is None and k in fields and fields[k].default == "" else v for k, v in values.items()}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = sorted({source.get(k, "the command line") for k in unknown})
        raise ValueError(f"unknown config key(s) {unknown} (from {' and '.join(map(str, where))}); "
                         f"known keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    checked = {k: _check_type(k, v, hints[k]) for k, v in values.items()}
    return cls(**checked)


def _drop_retired(cls, values, path):
    """Keys a class no longer has but older config files still carry (a run's config.yaml, tune.yaml's `mode`):
    dropped when they hold the value that meant "what this class does", an error naming the new home otherwise."""
    retired = getattr(cls, "RETIRED_KEYS", {})
    for key in sorted(set(values) & set(retired)):
        keep_value, message = retired[key]
        if keep_value is not None and values[key] != keep_value:
            raise ValueError(f"config key {key!r}: {values[key]!r}: {message}")
        del values[key]
    return values


def check_values(cfg, positive=(), non_negative=(), choices=None):
    """Range and choice checks of a loaded config; a ValueError names the key, its value and what it must be."""
    for key in positive:
        if not getattr(cfg, key) > 0:
            raise ValueError(f"config key {key!r}: must be > 0, got {getattr(cfg, key)!r}")
    for key in non_negative:
        if not getattr(cfg, key) >= 0:
            raise ValueError(f"config key {key!r}: must be >= 0, got {getattr(cfg, key)!r}")
    for key, allowed in (choices or {}).items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"config key {key!r}: expected one of {' | '.join(map(str, allowed))}, "
                             f"got {getattr(cfg, key)!r}")


def check_layers(key, layers, n_layers=None, what="this model"):
    """Cross-attention layer indices: ints >= 0, no repeats, and < n_layers once the model is known."""
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or i < 0]
    if bad:
        raise ValueError(f"config key {key!r}: layer indices are cross-attention layer numbers >= 0, got {bad}")
    bad = [i for i in layers if n_layers is not None and i >= n_layers]
    if bad:
        raise ValueError(f"config key {key!r}: layer index(es) {bad} out of range; {what} has {n_layers} "
                         f"cross-attention layers (0-{n_layers - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"config key {key!r}: repeated layer index in {list(layers)}")


def check_train_config(cfg):
    """Ranges and choices of train.py's TrainConfig (the layer range waits for the model: `check_layers`)."""
    from grounding.prompts import SHARED_MODES
    from grounding.metrics import PROTOCOLS
    check_values(cfg, positive=("max_steps", "batch_size", "lr", "num_inference_steps", "ckpt_every", "eval_batch",
                                "val_pairs"),
                 non_negative=("threads", "val_every", "eval_pairs", "timesteps_per_step", "n_ctx", "weight_decay",
                               "max_train_samples", "latent_cache_mb", "alpha", "eps", "jitter", "w_div", "w_loc"),
                 choices={"data": ("phantom", "mimic"), "on_missing": ("error", "skip"),
                          "autocast": ("none", "bf16", "fp16"), "optimizer": ("adamw", "adam", "sgd"),
                          "noisy_latents": ("inversion", "noise"), "merge": ("max", "sum"),
                          "shared_tokens": SHARED_MODES, "mscxr_split": ("all", "train", "val", "test"),
                          "metric_protocol": PROTOCOLS})
    from grounding.data.curation import check_views
    check_views(cfg.views)
    check_layers("layers", cfg.layers)
    if not 0 <= cfg.seed < 2 ** 32:  # torch's generators take 64-bit seeds, and each draw's seed is derived from it
        raise ValueError(f"config key 'seed': must be in [0, 2**32), got {cfg.seed}")
    # settings beyond which tuning cannot learn: the rows would stay at their start and the run would "succeed"
    for key, hi, why in (("alpha", 100.0, "the Gaussian's weight in the target (Eq. 3; paper 0.1): past ~1e19 the "
                                          "target's norm overflows float32, the loss sits at 1 and no gradient flows"),
                         ("eps", 1.0, "the Gaussian's support threshold (Eq. 3; paper 1e-5): a Gaussian peaks at 1, "
                                      "so eps >= 1 leaves no support"),
                         ("lr", 10.0, "the learning rate (paper 1e-4)"),
                         ("w_div", 1000.0, "the weight of L_div (paper 1)"), ("w_loc", 1000.0, "the weight of L_loc (paper 1)")):
        value = getattr(cfg, key)
        if not value < hi:
            raise ValueError(f"config key {key!r}: {value!r} is outside the range where tuning learns (it must be "
                             f"below {hi:g}): "
                             f"it is {why}")
    if not cfg.out_dir:
        raise ValueError("config key 'out_dir': must name a folder (runs/NAME)")
    import torch
    try:
        torch.device(cfg.device)
    except RuntimeError:
        raise ValueError(f"config key 'device': {cfg.device!r} is not a torch device (cpu, cuda, cuda:1, "
                         "mps)") from None
    window = list(cfg.train_window)
    if len(window) != 2 or not 0 <= window[0] < window[1]:
        raise ValueError(f"config key 'train_window': expected [lo, hi] timesteps with 0 <= lo < hi, got {window!r}")


# ---------------------------------------------------------------------------------------------------------------
# the keys' documentation: the field comments of the dataclass, read from its source


def key_docs(cls):
    """[(group, key, default, meaning)] for every field of a config dataclass, in the class's order.

    The meaning is the comment on the field's line plus the comment-only lines under it that are indented past the
    field (the continuation lines); the group is the last `# --- title ---` line above the field. So the comments
    a reader sees in this file are the ones `--help` prints, and no second copy can drift from them.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {tok.start[0]: (tok.start[1], tok.string.lstrip("#").strip())      # line -> (column, text)
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    only = lambda n: lines[n - 1].lstrip().startswith("#")                      # a comment-only line
    groups = {n: re.match(r"-+\s*(.*?)\s*-+$", text) for n, (_, text) in comments.items() if only(n)}
    groups = {n: m.group(1) for n, m in groups.items() if m}
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    out = []
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) in defaults):
            continue
        meaning = [comments[n][1] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        n = node.end_lineno + 1
        while n in comments and only(n) and n not in groups and comments[n][0] > node.col_offset:
            meaning.append(comments[n][1])                                      # a continuation line
            n += 1
        group = next((groups[k] for k in sorted(groups, reverse=True) if k < node.lineno), "")
        out.append((group, node.target.id, defaults[node.target.id], " ".join(meaning)))
    return out


def _yaml_value(value):
    """A default as it is written in a YAML file or a key=value override."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, list):
        return "[" + ", ".join(map(_yaml_value, value)) + "]"
    return repr(value)


def keys_help(cls, width=118):
    """The --help listing of a config dataclass's keys: per group, `key: default` and its meaning (key_docs)."""
    lines, group = [], None
    for g, key, default, meaning in key_docs(cls):
        if g != group:
            lines.append(f"{g}:")
            group = g
        head = f"  {key}: {_yaml_value(default)}"
        wrapped = textwrap.wrap(meaning, width - 40) or [""]
        if len(head) > 37:                       # a long default: the meaning starts on the next line
            lines.append(head)
            head = ""
        lines.append(f"{head:<40s}{wrapped[0]}")
        lines += [" " * 40 + w for w in wrapped[1:]]
    return "\n".join(lines)


def save_config(cfg, path):
    """Write the resolved config next to a run's outputs."""
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


@dataclass
class TrainConfig:
    # --- the run ---------------------------------------------------------------------------------------------------
    out_dir: str = "runs/tune"               # the run folder: config, checkpoint, learned rows, tables, report.html
    seed: int = 0                            # random seed in [0, 2**32); the paper does not report one (single run)
    device: str = "cpu"                      # torch device: "cpu" | "cuda" (| "cuda:1", "mps")
    autocast: str = "none"                   # "none" | "bf16" | "fp16": text encoder + UNet forwards of the tuning step,
                                             # inversions and heatmaps under torch.autocast; maps and losses stay fp32
    threads: int = 0                         # torch CPU threads (0 = torch's default)
    # --- data --------------------------------------------------------------------------------------------------
    data: str = "phantom"                    # "phantom" (embedded synthetic world, built if missing) | "mimic"
    phantom_root: str = "data/phantom"       # where the phantom world is written
    phantom_seed: int = 0                    # the world's seed
    mimic_root: str = ""                     # MIMIC-CXR-JPG root (files/, metadata and split CSVs)
    reports_root: str = ""                   # MIMIC-CXR reports root (files/pXX/p<subject>/s<study>.txt)
    mscxr_csv: str = ""                      # MS-CXR CSV (v0.1 or v1.1.0): its patients are excluded from tuning
    mscxr_split: str = "all"                 # MS-CXR pairs scored: "all" (the paper's 1,043 MS-CXR-loc pairs come from
                                             # all of MS-CXR) | "train" | "val" | "test" (v1.1.0's split column)
    views: list[str] = field(default_factory=lambda: ["PA"])  # tuning-set views: PA (the MONAI CXR LDM's training view);
                                             # add "AP" to allow AP images; lateral images never enter
    imagenome_root: str = ""                 # Chest ImaGenome gold boxes for the Gaussian LUT: the gold CSV
                                             # (gold_dataset/gold_bbox_coordinate_annotations_1000images.csv) or a
                                             # folder of <dicom_id>_SceneGraph.json
    imagenome_gold_ids: str = ""             # with a scene-graph folder: file of gold dicom ids (one a line, or a CSV
                                             # with image_id); empty = every graph in the folder
    lut_path: str = ""                       # a saved LUT (JSON); built from imagenome_root when empty
    vindr_csv: str = ""                      # VinDr-CXR annotations_test.csv (evaluate.py --split vindr)
    vindr_images: str = ""                   # folder of VinDr images converted to PNG (<image_id>.png)
    on_missing: str = "error"                # a missing/unreadable image or a wrong recorded size: "error" | "skip" (counted)
    # --- model -------------------------------------------------------------------------------------------------
    weights: str = "assets/phantom_ldm"      # a converted folder (convert_weights.py) or the phantom base model
    # --- prompt tuning (paper defaults, docs/paper.md sections 4-5 and 10) -------------------------------------------
    max_steps: int = 600                     # optimiser steps (paper: epochs not stated; ~3 h on an RTX 3090)
    batch_size: int = 1                      # images per step (paper: 1)
    lr: float = 1e-4                         # learning rate (paper: 1e-4)
    optimizer: str = "adamw"                 # "adamw" | "adam" | "sgd" (paper: not stated)
    weight_decay: float = 0.0                # the optimiser's; 0: the rows should stay near real token embeddings
    layers: list[int] = field(default_factory=list)  # cross-attention layers; [] = the family preset (MONAI: 4,5,6,7 = mid
                                             # + first 3 decoder layers at 16x16; phantom: 2,3,4,5; SD1: 5,7,8,9)
    num_inference_steps: int = 100          # the DDIM schedule the window is taken from
    train_window: list[int] = field(default_factory=lambda: list(TRAIN_WINDOW))  # timesteps [lo, hi) = [400, 700): steps
                                             # [30, 60) of 100 in reverse-process order (grounding/heatmap.py)
    timesteps_per_step: int = 0              # 0 = all T window steps per image (paper); k = a random k of them (cheaper)
    noisy_latents: str = "inversion"         # "inversion" (DDIM inversion, as at test time) | "noise" (forward noising)
    alpha: float = 0.1                       # weight of G in the target (Eq. 3)
    eps: float = 1e-5                        # G > eps marks the Gaussian's support (Eq. 3)
    jitter: float = 0.05                     # +-5% of the image size on every mu and sigma
    merge: str = "max"                       # how several Gaussians merge into one target: "max" | "sum" (not stated)
    w_div: float = 1.0                       # weight of L_div (Eq. 2)
    w_loc: float = 1.0                       # weight of L_loc (Eq. 4)
    shared_tokens: str = "positional"        # sub-tokens shared by location and pathology words ("pleural", "cardiomegaly"):
                                             # "positional" (location occurrences get their own rows) | "frozen" | "trainable"
    n_ctx: int = 0                           # CoOp-style learnable context tokens (0 = off, the paper)
    max_train_samples: int = 0               # tune on the first N curated samples (0 = all of them)
    latent_cache_mb: int = 2048              # cache all inverted training latents up front when they fit
    # --- validation, checkpoints, the final evaluation -----------------------------------------------------------
    val_every: int = 200                     # steps between short validations (CNR, mIoU on a few held-out pairs)
    val_pairs: int = 24                      # held-out pairs used by the short validation
    ckpt_every: int = 100                    # steps between atomic checkpoints
    eval_at_end: bool = True                 # frozen-vs-tuned grounding on the held-out split when done
    eval_pairs: int = 0                      # score the first N held-out pairs at the end (0 = all of them)
    eval_batch: int = 16                     # images inverted together during evaluation
    eval_untuned: bool = True                # also score the tuned layers with the ORIGINAL embeddings (ablation)
    metric_protocol: str = "reference"       # "reference" (predecessor code) | "per_box" | "union": README "Metric conventions"
    eval_swap: bool = True                   # location-swap test: do the words steer the map? (grounding/experiment/swap.py)
    # keys of the time when train.py also pretrained the phantom LDM (mode "pretrain"): old config.yaml files still
    # load; mode "pretrain" names its own script now (key -> (the value that is dropped silently, or None = any))
    RETIRED_KEYS: typing.ClassVar[dict] = {
        "mode": ("tune", "phantom pretraining has its own script: python scripts/pretrain_phantom.py --config "
                         "configs/phantom_pretrain.yaml"),
        **{k: (None, "") for k in ("vae_steps", "vae_lr", "kl_weight", "unet_steps", "unet_lr", "pretrain_batch",
                                   "caption_dropout", "vocab_size", "log_every")}}

    def __post_init__(self):  # checked when loaded, so a bad value is named before anything runs
        check_train_config(self)
