"""Find the real CLIP BPE file (`bpe_simple_vocab_16e6.txt.gz`) for the tokenizer tests.

The file ships inside the open-clip-torch wheel (open_clip/bpe_simple_vocab_16e6.txt.gz, the same file as
OpenAI's CLIP repo). A normal `pip install open-clip-torch` pulls torchvision and a multi-GB torch, so we
download only the wheel (`--no-deps`) and unzip the one file we need.

Lookup order:
1. the environment variable CLIP_BPE_PATH (a path to the .txt.gz),
2. a cached copy in tests/.cache/ (git-ignored),
3. `pip download` of the pinned wheel into tests/.cache/wheel, then extract.
Returns None when all of that fails (e.g. no network), so tests can skip with a clear reason.
"""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

OPEN_CLIP_VERSION = "2.24.0"  # any 2.x/3.x wheel carries the identical file; pinned for reproducibility
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
CACHED = CACHE_DIR / "bpe_simple_vocab_16e6.txt.gz"


def _extract_from_wheel(wheel_dir):
    """Pull MEMBER out of the first open_clip wheel in wheel_dir into CACHED; True on success."""
    for wheel in sorted(Path(wheel_dir).glob("open_clip_torch-*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            if MEMBER not in zf.namelist():
                continue
            data = zf.read(MEMBER)
        tmp = CACHED.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(CACHED)  # atomic: a half-written cache never looks valid
        return True
    return False


def clip_bpe_path():
    """Return a path (str) to bpe_simple_vocab_16e6.txt.gz, or None if it cannot be found or fetched."""
    env = os.environ.get("CLIP_BPE_PATH")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"CLIP_BPE_PATH={env!r} is not a file; unset it or point it at "
                                    "bpe_simple_vocab_16e6.txt.gz")
        return env
    if CACHED.is_file():
        return str(CACHED)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    wheel_dir = CACHE_DIR / "wheel"
    if _extract_from_wheel(wheel_dir):
        return str(CACHED)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"open-clip-torch=={OPEN_CLIP_VERSION}", "-d", str(wheel_dir)]
    try:
        subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return str(CACHED) if _extract_from_wheel(wheel_dir) else None


if __name__ == "__main__":
    print(clip_bpe_path())
