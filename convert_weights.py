"""Convert a real checkpoint into our converted-folder format (model.yaml + one safetensors file per component
+ tokenizer files), detecting its family:

  python convert_weights.py weights/roentgen-diffusers weights/roentgen             # diffusers folder (RoentGen, SD)
  python convert_weights.py v1-5-pruned-emaonly.ckpt weights/sd15 --tokenizer TOK    # CompVis single file
  python convert_weights.py cxr_bundle/ weights/monai_cxr --text-encoder sd21-base   # MONAI CXR LDM bundle folder

A MONAI bundle folder holds models/autoencoder.pth, models/diffusion_model.pth and configs/inference.json; the json
gives what the weights cannot show (heads, group counts, eps, the noise schedule: ldm/weights/monai_bundle.py). A bare
folder with the two .pth files is accepted too, with the CXR bundle's values for those (said in one line).

Nothing pickled is ever executed (ldm/weights/checkpoint.py); DST is written atomically and re-running is safe.
Load the result with `ldm.load_pipeline(DST)`. How to obtain each checkpoint: docs/weights.md.
"""
import argparse
import sys
import time

import torch

from ldm.weights.folder import convert_checkpoint, load_pipeline, save_pipeline

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("src", help="a diffusers folder, a CompVis .ckpt/.safetensors file, a MONAI bundle folder "
                                "(models/*.pth + configs/inference.json) or a folder holding MONAI "
                                "autoencoder.pth + diffusion_model.pth")
parser.add_argument("dst", help="output folder (replaced atomically if it is an earlier conversion)")
parser.add_argument("--text-encoder", metavar="DIR", help="MONAI only: a stable-diffusion-2-1-base diffusers folder "
                                                          "whose text_encoder/ and tokenizer/ the CXR LDM uses")
parser.add_argument("--tokenizer", metavar="DIR", help="CompVis only: vocab.json + merges.txt (or a diffusers folder "
                                                       "with tokenizer/, or OpenAI's bpe_simple_vocab_16e6.txt.gz)")
parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="storage dtype of the weights (fp32)")
parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                    help="CompVis SD 2.x only (not recorded in the file): v_prediction for 768-v, epsilon for 512-base")
parser.add_argument("--ema", action="store_true", help="CompVis only: take the UNet from the EMA copy if present")
args = parser.parse_args()

t0 = time.time()
try:
    pipe = convert_checkpoint(args.src, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                              prediction_type=args.prediction_type, use_ema=args.ema)
    dst = save_pipeline(pipe, args.dst, dtype=DTYPES[args.dtype])
    load_pipeline(dst)  # prove the folder loads strictly (every key, every shape)
except (ValueError, FileNotFoundError) as e:  # PipelineError, CheckpointError, SafetensorsError, bad configs
    sys.exit(f"convert_weights.py: error: {e}")
params = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("text_encoder", "vae", "unet")}
print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()))
print(f"wrote {dst} ({args.dtype}) in {time.time() - t0:.1f}s; load it with ldm.load_pipeline({str(dst)!r})")
