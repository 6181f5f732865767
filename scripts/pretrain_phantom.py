"""Pretrain the tiny phantom base LDM (VAE, then text encoder + UNet) on the phantom world's training split.

    python scripts/pretrain_phantom.py --config configs/phantom_pretrain.yaml --overwrite [key=value ...]

Reproduces the committed assets/phantom_ldm (--overwrite: replacing an existing weights folder is never silent) (docs/phantom.md "The embedded default"); the settings are
grounding/phantom/pretrain.py `PretrainConfig`, whose defaults are that run's values. CPU, fp32.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grounding.experiment.config import check_values, load_config, save_config  # noqa: E402
from grounding.phantom.pretrain import PretrainConfig, pretrain  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="YAML file with PretrainConfig keys (configs/phantom_pretrain.yaml)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the weights folder (config key weights) when it already exists")
    p.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        check_values(cfg, positive=("vae_steps", "vae_lr", "unet_steps", "unet_lr", "pretrain_batch", "vocab_size",
                                    "ckpt_every", "log_every"),
                     non_negative=("threads", "kl_weight", "caption_dropout"))
        if cfg.caption_dropout > 1:
            raise ValueError(f"config key 'caption_dropout': a probability in [0, 1], got {cfg.caption_dropout}")
        if cfg.vocab_size < 514:   # 2 x 256 byte symbols + BOS + EOS before any merge (ldm/tokenizer.py train_bpe)
            raise ValueError(f"config key 'vocab_size': at least 514, got {cfg.vocab_size}")
    except (ValueError, FileNotFoundError) as e:  # a bad key or value: its message, not a traceback
        p.error(str(e))
    if os.path.exists(os.path.join(cfg.weights, "model.yaml")) and not args.overwrite:
        p.error(f"{cfg.weights} already holds a model (for the default, the committed base model): pass --overwrite "
                "to replace it, or set weights=OTHER_FOLDER")
    os.makedirs(cfg.out_dir, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pretrain(cfg)


if __name__ == "__main__":
    main()
