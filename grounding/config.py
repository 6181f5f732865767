"""Flat YAML experiment configs with command-line overrides (`key=value`), checked against a dataclass.

nanoGPT's configurator, made strict: a YAML file and `key=value` overrides fill the fields of a dataclass whose
defaults are the documented settings. Unknown keys and values of the wrong type are errors that name the key, so a
typo never silently falls back to a default. No exec, no registries.
"""
import dataclasses
import typing

import yaml


def _check_type(name, value, annotation):
    """Return `value` converted to the field's type, or raise a ValueError naming the key."""
    origin = typing.get_origin(annotation)
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


def load_config(cls, path=None, overrides=()):
    """Build `cls` (a dataclass) from a YAML file and `key=value` strings; later sources win."""
    values = {}
    if path is not None:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        if not loaded:
            print(f"config file {path} is empty: running on the built-in defaults (plus any key=value overrides)")
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path}: expected a mapping of key: value, got {type(loaded).__name__}")
        values.update(loaded)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        values[key.strip()] = yaml.safe_load(raw)  # YAML typing: 1e-4 -> float, [4,5] -> list, true -> bool
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} (from {path or 'the command line'}); "
                         f"known keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    checked = {k: _check_type(k, v, hints[k]) for k, v in values.items()}
    return cls(**checked)


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
                                "val_pairs", "vae_steps", "vae_lr", "unet_steps", "unet_lr", "pretrain_batch",
                                "vocab_size", "log_every"),
                 non_negative=("threads", "val_every", "eval_pairs", "timesteps_per_step", "n_ctx", "weight_decay",
                               "max_train_samples", "latent_cache_mb", "alpha", "eps", "jitter", "w_div", "w_loc",
                               "kl_weight", "caption_dropout"),
                 choices={"mode": ("tune", "pretrain"), "data": ("phantom", "mimic"), "on_missing": ("error", "skip"),
                          "autocast": ("none", "bf16", "fp16"), "optimizer": ("adamw", "adam", "sgd"),
                          "noisy_latents": ("inversion", "noise"), "merge": ("max", "sum"),
                          "shared_tokens": SHARED_MODES, "mscxr_split": ("all", "train", "val", "test"),
                          "metric_protocol": PROTOCOLS})
    from grounding.curation import check_views
    check_views(cfg.views)
    check_layers("layers", cfg.layers)
    window = list(cfg.train_window)
    if len(window) != 2 or not 0 <= window[0] < window[1]:
        raise ValueError(f"config key 'train_window': expected [lo, hi] timesteps with 0 <= lo < hi, got {window!r}")


def save_config(cfg, path):
    """Write the resolved config next to a run's outputs."""
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
