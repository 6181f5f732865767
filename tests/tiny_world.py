"""A tiny phantom world + a tiny random phantom-family LDM on disk, for the end-to-end and multi-process tests.

The same formats and code paths as the quickstart (`python train.py --config tune.yaml`), at sizes that run in
seconds: a 16-study world, 32-pixel model inputs, a UNet with the phantom layout (attention at the 2nd level only,
6 cross-attention layers, presets 2,3,4,5 / 1,2,4,5), 10 DDIM steps for the tuning window.
"""
import dataclasses
import os
import subprocess

import torch
import yaml

from ldm.pipeline import Pipeline
from ldm.weights.folder import save_pipeline
from ldm.schedulers import DDIMScheduler, SchedulerConfig
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.tokenizer import train_bpe
from ldm.unet import UNet2DConditionModel, UNetConfig
from ldm.vae import AutoencoderKL, VAEConfig
from grounding.anatomy import LOCATIONS, PATHOLOGIES
from grounding.phantom.world import PhantomConfig, build_world
from grounding.phantom.pretrain import training_captions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def run(cmd, cwd):
    """Run a command as a user would (a subprocess in `cwd`); fail the test with its output if it fails."""
    out = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def make_tiny_setup(root, seed=0):
    """Write root/world (phantom world), root/model (converted-format pipeline) and root/tune.yaml; return paths."""
    world = os.path.join(root, "world")
    build_world(world, PhantomConfig.tiny(seed=seed))
    torch.manual_seed(seed)
    captions = [it["caption"] for it in training_captions(world)]
    tokenizer = train_bpe(captions + list(LOCATIONS) + [p.lower() for p in PATHOLOGIES], vocab_size=700, pad_id=0)
    unet = UNet2DConditionModel(dataclasses.replace(UNetConfig.phantom(), block_out_channels=(16, 32),
                                                    norm_num_groups=8, sample_size=16))
    with torch.no_grad():  # a random UNet attends almost uniformly; sharpen q/k so maps carry some structure
        for layer in unet.cross_attention_layers():
            layer.to_q.weight.mul_(3.0)
            layer.to_k.weight.mul_(3.0)
    pipe = Pipeline(tokenizer=tokenizer,
                    text_encoder=TextEncoder(dataclasses.replace(TextEncoderConfig.tiny(), vocab_size=tokenizer.vocab_size)),
                    vae=AutoencoderKL(dataclasses.replace(VAEConfig.tiny(), block_out_channels=[8, 16], norm_num_groups=4)),
                    unet=unet, scheduler=DDIMScheduler(SchedulerConfig.monai_cxr()), scale_factor=1.0,
                    prediction_type="v_prediction", family="phantom", image={"channels": 1, "size": 32, "range": [0.0, 1.0]})
    model = os.path.join(root, "model")
    save_pipeline(pipe, model)
    config = dict(data="phantom", phantom_root=world, weights=model, out_dir=os.path.join(root, "run"),
                  max_steps=4, batch_size=1, num_inference_steps=10, train_window=[400, 700], timesteps_per_step=2,
                  shared_tokens="positional", lr=0.05, val_every=0, ckpt_every=1, eval_pairs=4, eval_batch=4,
                  threads=1)
    cfg_path = os.path.join(root, "tune.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(config, f)
    return dict(world=world, model=model, config=cfg_path, root=root)
