"""Our config dataclasses <-> plain dicts (the configs in a converted folder's model.yaml), one rule for all.

Every module config (TextEncoderConfig, VAEConfig, UNetConfig, SchedulerConfig) inherits `to_dict` / `from_dict`
from `ConfigDict`: our own dict in, our own dict out, and a key the dataclass does not have is an error (a typo in
model.yaml must not silently fall back to a default). Keys that folders converted by an earlier version wrote are
dropped before this (ldm/weights/folder.py `RETIRED_KEYS`). Foreign config files (diffusers, transformers, MONAI)
are translated into these dataclasses by the conversion code: ldm/weights/configs.py.
"""
from dataclasses import asdict, fields


class ConfigDict:
    def to_dict(self):
        """Plain dict (lists, not tuples) for model.yaml."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        """From our own plain dict (model.yaml); unknown keys are an error, missing keys take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)
