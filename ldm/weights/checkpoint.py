"""Reading state dicts from any checkpoint file without ever executing pickled code.

- `.safetensors` and sharded `*.safetensors.index.json`: our own reader (ldm/weights/safetensors.py).
- `.bin` / `.pt` / `.pth` / `.ckpt` and sharded `pytorch_model.bin.index.json`:
  `torch.load(path, map_location="cpu", weights_only=True, mmap=True)` (torch's own allow-list unpickler).
- CompVis `.ckpt` files fail that: besides the state dict they pickle pytorch_lightning objects (a
  `ModelCheckpoint` callback, hyper-parameters). They go through `_RestrictedUnpickler` below, which rebuilds
  tensors only and turns every other harmless global into an inert stub. Globals that could run code (os.system,
  builtins.eval/exec, subprocess, importlib, ...) are refused with a `CheckpointError`. `weights_only=False` is
  never used, and no pickled callable is ever called: the only functions the unpickler can reach are ours.

Mirrors what stable-diffusion-webui (modules/safe.py) and torch.serialization (_weights_only_unpickler.py) do,
written out so the rules can be read in one place.
"""
import _compat_pickle
import collections
import io
import json
import os
import pickle
import zipfile

import torch

from ldm.weights.safetensors import load_file, load_sharded


class CheckpointError(ValueError):
    """A checkpoint file cannot be read safely (hostile, corrupt, or an unsupported layout)."""


# ----------------------------------------------------------------------------------------------------------------
# The restricted unpickler (fallback for CompVis .ckpt files)

# torch.save pickles each storage's type by its legacy class name; we only need its dtype.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}

# Globals that can run code, touch files or the network, or reach arbitrary objects are refused outright (a stub
# would be inert too, but a checkpoint that names them is hostile or broken and the user should know).
# Whole modules by their top-level name ...
_REFUSED_MODULES = {
    "os", "posix", "nt", "sys", "subprocess", "_posixsubprocess", "builtins", "__builtin__", "shutil", "importlib",
    "runpy", "socket", "pickle", "_pickle", "marshal", "types", "code", "codeop", "ctypes", "pty", "webbrowser",
    "multiprocessing", "signal", "asyncio", "io", "_io", "operator", "functools", "inspect", "pdb", "timeit",
    "platform", "tempfile", "urllib", "http", "requests", "pathlib", "glob", "zipimport", "pkgutil", "threading",
}
# ... and loaders / compilers / op dispatch inside otherwise harmless packages. (SD's own .ckpt files name
# numpy.core.multiarray.scalar, numpy.dtype and _codecs.encode: those become stubs, they are not refused.)
_REFUSED_PREFIXES = (
    "torch.load", "torch.hub", "torch.jit", "torch.utils", "torch.serialization", "torch.package", "torch._C",
    "torch.ops", "torch._ops", "torch._dynamo", "torch.compile", "numpy.load", "numpy.lib.npyio", "numpy.testing",
    "numpy.f2py", "numpy.distutils", "numpy.ctypeslib",
)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Our own stand-in for torch._utils._rebuild_tensor_v2: a view of an already-read storage.

    The geometry comes from an untrusted pickle, so it is checked here: `Tensor.set_` would silently GROW a
    too-small storage (uninitialised memory) instead of failing.
    """
    if not (isinstance(storage, tuple) and len(storage) == 2 and isinstance(storage[0], torch.UntypedStorage)):
        raise CheckpointError(f"a tensor is rebuilt from {type(storage).__name__}, not from a storage of the archive")
    untyped, dtype = storage
    geometry = (storage_offset, *size, *stride)
    if not (all(isinstance(v, int) and v >= 0 for v in geometry) and len(size) == len(stride)):
        raise CheckpointError(f"bad tensor geometry: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    # last element reached = offset + sum((size_i - 1) * stride_i); empty tensors reach nothing
    needed = storage_offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1 if all(size) else 0
    available = untyped.nbytes() // torch.empty((), dtype=dtype).element_size()
    if needed > available:
        raise CheckpointError(f"tensor of size {tuple(size)} (stride {tuple(stride)}, offset {storage_offset}) "
                              f"reaches element {needed}, out of bounds for a storage of {available} elements")
    return torch.empty(0, dtype=dtype).set_(untyped, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data  # nn.Parameter in the pickle: keep the plain tensor


def _rebuild_from_type_v2(func, new_type, args, state):
    # tensors with Python attributes; `func` went through find_class, so it is one of ours or an inert stub
    return func(*args)


class _Stub:
    """Inert stand-in for any foreign pickled object (pytorch_lightning callbacks, argparse.Namespace, ...).

    Accepts any constructor arguments and any state, and does nothing with them.
    """

    def __init__(self, *args, **kwargs):
        self._args, self._kwargs = args, kwargs

    def __setstate__(self, state):
        self._state = state


def _make_stub(module, name):
    return type(name, (_Stub,), {"__module__": f"stub.{module}", "__qualname__": name})


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    # pure data containers, harmless to build
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint's data.pkl (or a raw pickle) with tensors as the only real objects."""

    def __init__(self, file, path, read_storage=None):
        super().__init__(file)
        self.path, self.read_storage, self.storages = path, read_storage, {}

    def find_class(self, module, name):
        # Protocol <= 2 pickles carry Python 2 names (subprocess is written as `commands`, builtins as
        # `__builtin__`); map them back exactly as pickle itself would before judging them.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return ("storage-type", _STORAGE_DTYPES[name])
        if module.split(".")[0] in _REFUSED_MODULES or f"{module}.{name}".startswith(_REFUSED_PREFIXES):
            raise CheckpointError(
                f"{self.path}: refusing to load: the pickle references {module}.{name}, which could run code. "
                "Nothing from this file was executed. Use a .safetensors version of the checkpoint instead.")
        return _make_stub(module, name)

    def persistent_load(self, pid):
        # torch zip format: ('storage', storage_type, key, location, numel); the bytes live in archive/data/<key>.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and self.read_storage):
            raise CheckpointError(f"{self.path}: unsupported persistent id {str(pid)[:80]} (legacy torch format?)")
        _, storage_type, key, _location, numel = pid
        if not (isinstance(storage_type, tuple) and storage_type[0] == "storage-type" and isinstance(key, str)
                and isinstance(numel, int)):
            raise CheckpointError(f"{self.path}: malformed storage record {str(pid)[:80]}")
        dtype = storage_type[1]
        if key not in self.storages:
            untyped = self.read_storage(key)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if untyped.nbytes() < numel * itemsize:
                raise CheckpointError(f"{self.path}: storage {key} has {untyped.nbytes()} bytes, needs {numel * itemsize}")
            self.storages[key] = (untyped, dtype)
        return self.storages[key]


def _restricted_load(path):
    """Load a torch zip checkpoint (or a raw pickle) with the restricted unpickler."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: not a torch checkpoint (expected one <name>/data.pkl, found {pkl[:3]})")
        prefix = pkl[0][: -len("data.pkl")]
        if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder") != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

        def read_storage(key):
            try:
                data = zf.read(f"{prefix}data/{key}")
            except KeyError:
                raise CheckpointError(f"{path}: the pickle names storage {key!r}, which is not in the archive") from None
            return torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)

        return _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), path, read_storage).load()


# ----------------------------------------------------------------------------------------------------------------
# Public entry point

def _unwrap(obj, path):
    """CompVis/Lightning files nest the weights: {"state_dict": {...}, "epoch": ..., "callbacks": ...}."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found a pickled {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (keys: {list(obj)[:8]})")
    return tensors


def _load_torch(path):
    is_zip = zipfile.is_zipfile(path)
    try:
        # mmap keeps big .bin/.ckpt files out of RAM until a tensor is touched (only for the zip format).
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError:
        # torch's allow-list refused a global: usually pytorch_lightning objects in a CompVis .ckpt.
        try:
            obj = _restricted_load(path)
        except CheckpointError as e:
            raise CheckpointError(str(e) if path in str(e) else f"{path}: {e}") from None
        except Exception as e:  # a malformed pickle: report it as such, never as an obscure internal error
            raise CheckpointError(f"{path}: cannot be unpickled safely ({type(e).__name__}: {e})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    return _unwrap(obj, path)


def _load_index(path):
    """A sharded checkpoint: *.safetensors.index.json or pytorch_model.bin.index.json."""
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid shard index ({type(e).__name__}: {e})") from None
    shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    if not shards or not all(isinstance(s, str) for s in shards):
        raise CheckpointError(f"{path}: 'weight_map' must map tensor names to shard file names")
    if all(s.endswith(".safetensors") for s in shards):
        return load_sharded(path)
    out, folder = {}, os.path.dirname(path)
    for shard in shards:
        if os.path.basename(shard) != shard:
            raise CheckpointError(f"{path}: shard name {shard!r} must be a plain file name in the same folder")
        out.update(load_state_dict(os.path.join(folder, shard)))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors named by the index are missing, e.g. {missing[:5]}")
    return out


def load_state_dict(path):
    """Read a flat {name: tensor} state dict from any supported file (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".index.json"):
        return _load_index(path)
    if path.endswith(".safetensors"):
        return load_file(path)
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return _load_torch(path)
    raise CheckpointError(f"{path}: unknown checkpoint extension (expected .safetensors, .bin, .pt, .pth, .ckpt "
                          "or *.index.json)")
