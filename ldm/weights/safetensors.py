"""Our own safetensors reader and writer (the `safetensors` package is NOT a run-time dependency).

Mirrors the format of huggingface/safetensors (safetensors/src/tensor.rs, bindings/python/.../torch.py):

    [8 bytes: little-endian u64 N] [N bytes: UTF-8 JSON header, space padded] [byte buffer]
    header = {"__metadata__": {str: str}?, name: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...}

Offsets are relative to the byte buffer and end-exclusive; the tensors tile the buffer exactly (no holes, no
overlaps, no trailing bytes); data is little-endian and row-major.

Files are untrusted input: every rule is checked before a byte of tensor data is touched, and every
violation is a `SafetensorsError` (a ValueError) naming the file, the tensor and the offending value.

Memory: the file is mapped with mmap (copy-on-write, ACCESS_COPY) and tensors are `torch.frombuffer` views
into the map, so loading costs no full-file copy; pages are read from disk when first touched.
Lifetime: each tensor holds a reference to the mapping (not to the Python file object), so tensors stay
valid after `load_file` returns and after the file is closed, deleted or atomically replaced (rename).
Writing to a tensor changes only a private copy of the page, never the file. The one unsafe case is
another process TRUNCATING or rewriting the same file in place while the tensors live (the kernel then
raises SIGBUS / shows the new bytes): pass `copy=True` to get ordinary tensors that own their memory.
Tensors whose offset is not a multiple of their element size are always copied (torch kernels assume
aligned data).
"""
import json
import math
import mmap
import os
import struct
import sys
import tempfile

import torch

# safetensors dtype string -> torch dtype. Sizes come from torch (F8 = 1 byte, BOOL = 1 byte).
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_NAME = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the reference refuses headers over 100 MB (a DoS guard)


class SafetensorsError(ValueError):
    """A safetensors file (or a tensor dict to be written) breaks the format."""


def _itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------------------------
# Header parsing and validation

def _no_duplicates(pairs, path):
    """json object_pairs_hook: a name that appears twice would silently shadow the first tensor."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise SafetensorsError(f"{path}: duplicate name {key!r} in the header")
        out[key] = value
    return out


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true/false parse as bool, a subclass of int


def _check_entry(path, name, entry):
    """Validate one tensor entry; returns (torch dtype, shape tuple, begin, end)."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{where}: entry must be a JSON object, got {type(entry).__name__}")
    if set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsError(f"{where}: entry keys must be dtype, shape, data_offsets; got {sorted(entry)}")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise SafetensorsError(f"{where}: unknown dtype {dtype_name!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    dtype = DTYPES[dtype_name]
    nbytes = math.prod(shape) * _itemsize(dtype)
    if offsets[1] - offsets[0] != nbytes:
        raise SafetensorsError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes but "
                               f"{dtype_name} x {shape} needs {nbytes}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _parse(path, f):
    """Read and validate the header of an open file; returns (entries, metadata, data_start).

    entries: {name: (dtype, shape, begin, end)} with offsets relative to the data buffer.
    """
    file_size = os.fstat(f.fileno()).st_size
    if file_size < 8:
        raise SafetensorsError(f"{path}: file is {file_size} bytes, too short for the 8-byte header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit: not a "
                               "safetensors file (a torch .pt/.ckpt zip? convert it first)")
    if 8 + n > file_size:
        raise SafetensorsError(f"{path}: header length {n} runs past the end of the {file_size}-byte file "
                               "(truncated or not a safetensors file)")
    raw = f.read(n)
    if not raw.startswith(b"{"):
        raise SafetensorsError(f"{path}: header must start with '{{', got {raw[:16]!r}")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=lambda p: _no_duplicates(p, path))
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{path}: header is not valid UTF-8 ({e})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must be an object of string -> string, got {metadata!r:.200}")

    entries = {name: _check_entry(path, name, entry) for name, entry in header.items()}

    # The tensors must tile [0, buffer size) exactly. Sorting by (begin, end) puts empty tensors first at their spot.
    buffer_size = file_size - 8 - n
    cursor, prev = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != cursor:
            kind = "overlaps" if begin < cursor else "leaves a hole after"
            raise SafetensorsError(f"{path}: tensor {name!r} at data_offsets [{begin}, {end}] {kind} "
                                   f"{prev!r} (which ends at {cursor})")
        if end > buffer_size:
            raise SafetensorsError(f"{path}: tensor {name!r} data_offsets [{begin}, {end}] run past the "
                                   f"{buffer_size}-byte data buffer (file truncated?)")
        cursor, prev = end, name
    if cursor != buffer_size:
        raise SafetensorsError(f"{path}: {buffer_size - cursor} trailing bytes after the last tensor "
                               f"(data ends at {cursor}, buffer is {buffer_size} bytes)")
    return entries, metadata, 8 + n


def read_header(path):
    """The validated header of `path`: {"__metadata__": {...}, name: {"dtype", "shape", "data_offsets"}}."""
    with open(path, "rb") as f:
        entries, metadata, _ = _parse(path, f)
    header = {"__metadata__": metadata} if metadata else {}
    for name, (dtype, shape, begin, end) in entries.items():
        header[name] = {"dtype": TORCH_TO_NAME[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    return header


# ----------------------------------------------------------------------------------------------------------------
# Reading

def load_file(path, device="cpu", copy=False):
    """Load every tensor of a safetensors file -> {name: tensor} (on `device`).

    copy=False: tensors are zero-copy views into a private mapping of the file (see the module docstring);
    copy=True: each tensor owns its memory (one tensor copied at a time, never the whole file at once).
    """
    if sys.byteorder != "little":
        raise SafetensorsError(f"{path}: this reader supports little-endian hosts only")
    path = os.fspath(path)
    with open(path, "rb") as f:
        entries, _, data_start = _parse(path, f)
        # ACCESS_COPY gives writable (copy-on-write) pages, so torch.frombuffer has a writable buffer and writes
        # to a tensor can never reach the file. The map outlives `f`: it duplicates the file descriptor.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if entries else None
    out = {}
    for name, (dtype, shape, begin, end) in entries.items():
        size = _itemsize(dtype)
        if end == begin:  # frombuffer refuses empty buffers
            tensor = torch.empty(shape, dtype=dtype)
        elif (data_start + begin) % size:  # misaligned: copy the bytes into a fresh, aligned tensor
            tensor = torch.frombuffer(bytearray(buf[data_start + begin:data_start + end]), dtype=dtype).reshape(shape)
        else:
            tensor = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // size,
                                      offset=data_start + begin).reshape(shape)
            if copy:
                tensor = tensor.clone()
        out[name] = tensor.to(device)
    return out


def load_sharded(index_path, device="cpu", copy=False):
    """Load a sharded checkpoint from its `*.safetensors.index.json` -> {name: tensor}.

    The index is {"metadata": {...}, "weight_map": {name: shard file name}}; shards live beside the index.
    Every tensor the index names must be in its shard, and every shard tensor must be named by the index.
    """
    index_path = os.fspath(index_path)
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f, object_pairs_hook=lambda p: _no_duplicates(p, index_path))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{index_path}: not a valid JSON index ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SafetensorsError(f"{index_path}: needs a 'weight_map' object of tensor name -> shard file name")
    folder = os.path.dirname(index_path)
    out = {}
    for shard in sorted(set(weight_map.values())):
        # A shard name is a plain file name: never let an untrusted index point outside its own folder.
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise SafetensorsError(f"{index_path}: shard name {shard!r} must be a plain file name in the same folder")
        tensors = load_file(os.path.join(folder, shard), device=device, copy=copy)
        expected = {k for k, v in weight_map.items() if v == shard}
        missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
        if missing or extra:
            raise SafetensorsError(f"{index_path}: shard {shard} disagrees with the index: "
                                   f"missing {missing[:5]} ({len(missing)}), not in index {extra[:5]} ({len(extra)})")
        out.update(tensors)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Writing

def current_umask():
    """The process umask (read by setting it and putting it back: os has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_file(tensors, path, metadata=None):
    """Write {name: tensor} to `path` (atomically: a temp file in the same folder, then rename).

    Like the reference writer: tensors sorted by decreasing element size then name (keeps every tensor aligned),
    header padded with spaces to a multiple of 8 bytes.
    """
    path = os.fspath(path)
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"{path}: metadata must map strings to strings, got {metadata!r:.200}")
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"{path}: tensor name {name!r} is not allowed")
        if not isinstance(t, torch.Tensor):
            raise SafetensorsError(f"{path}: {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in TORCH_TO_NAME:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")

    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": TORCH_TO_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a saved file gets the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in names:
                t = tensors[name].detach()
                if t.numel():
                    # Raw little-endian bytes of a contiguous CPU copy; view(uint8) handles BF16/F8 without numpy.
                    f.write(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
