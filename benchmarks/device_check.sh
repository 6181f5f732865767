#!/usr/bin/env bash
# One-shot GPU check: the CUDA tests, then the benchmarks at full size, results in one Markdown file.
#
#   bash benchmarks/device_check.sh            # on a CUDA machine (one H100: about 4-5 minutes)
#
# Writes $OUT/device_check.md when $OUT is set, else benchmarks/device_check.md. Contents: the pytest summary of
# tests/test_gpu_path.py (CUDA tests included), then run_all.py's table: UNet forward / forward+backward vs
# diffusers (SD1.5 size) and MONAI (CXR size) in fp32 and bf16, heatmap images per second at 512x512 with the
# MONAI CXR and SD1.5-size models (random weights; fp32 against the straightforward procedure, then the fast
# path alone at batch 1 and $BATCH in bf16), prompt-tuning steps per second, and ground.py's seconds per image at
# MONAI size against its UNet-pass floor (benchmarks/ground.py, fp32, batch 1 and $BATCH).
#
# It installs NOTHING (the GPU machine has no internet): it needs a Python with torch (CUDA build), einops, numpy,
# pillow, tqdm, pyyaml, pytest, and for the reference columns diffusers and monai. It uses ./.venv when present,
# else $PYTHON, else python3. Without torch it stops with a clear message; without diffusers / monai the UNet
# rows fail and the rest still runs. Settings: BATCH (default 8), DTYPES (default fp32,bf16), COMPILE=1 adds
# torch.compile (slow to warm up: may not fit the 5 minutes), STEP_TIMEOUT seconds per benchmark (default 240),
# DEVICE_CHECK_ALLOW_CPU=1 runs the quick CPU plan instead (to try the script without a GPU).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
DEST="${OUT:-benchmarks}/device_check.md"
mkdir -p "$(dirname "$DEST")"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
start=$(date +%s)

if ! "$PY" -c "import torch" 2>/dev/null; then
    msg="device_check: '$PY' cannot import torch. Nothing is installed from the network here: create the venv \
(pip install -r requirements.txt -r requirements-dev.txt) on a machine with internet, or set PYTHON=/path/to/python."
    echo "$msg" >&2
    printf '# Device check\n\nFAILED: %s\n' "$msg" > "$DEST"
    exit 2
fi
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DEVICE=cuda
elif [ "${DEVICE_CHECK_ALLOW_CPU:-0}" = "1" ]; then
    DEVICE=cpu
else
    msg="device_check: torch.cuda.is_available() is False (CPU-only torch build, or no GPU visible). \
Set DEVICE_CHECK_ALLOW_CPU=1 to run the quick CPU plan instead."
    echo "$msg" >&2
    printf '# Device check\n\nFAILED: %s\n' "$msg" > "$DEST"
    exit 3
fi

{
    echo "# Device check"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- $("$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')")"
    "$PY" -c "import diffusers, monai; print('- reference libraries: diffusers', diffusers.__version__, '| monai', monai.__version__)" 2>/dev/null \
        || echo "- reference libraries: diffusers/monai missing (UNet reference rows will fail)"
    echo
    echo "## tests/test_gpu_path.py (CUDA tests included)"
    echo
    echo '```'
} > "$DEST"
timeout 120 "$PY" -m pytest tests/test_gpu_path.py -q -rs -p no:cacheprovider 2>&1 | tail -25 >> "$DEST"
echo '```' >> "$DEST"
echo >> "$DEST"

TABLE=$(mktemp)
if [ "$DEVICE" = cuda ]; then
    timeout 600 "$PY" benchmarks/run_all.py --plan full --device cuda --dtypes "${DTYPES:-fp32,bf16}" \
        --batch "${BATCH:-8}" --timeout "${STEP_TIMEOUT:-240}" ${COMPILE:+--compile} --out "$TABLE"
else
    timeout 600 "$PY" benchmarks/run_all.py --plan quick --device cpu --skip-unet --timeout "${STEP_TIMEOUT:-240}" \
        --out "$TABLE"
fi
rc=$?
tail -n +2 "$TABLE" >> "$DEST" 2>/dev/null    # drop its title line: this file has one
rm -f "$TABLE"
echo >> "$DEST"
echo "Total wall time: $(( $(date +%s) - start )) s (run_all exit code $rc)." >> "$DEST"
echo "wrote $DEST"
exit $rc
