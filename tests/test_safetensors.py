"""Our safetensors reader/writer: agreement with the reference package both ways, strict validation, fuzzing."""
import json
import os
import random
import struct

import pytest
import torch

from conftest import cmp, need
from ldm.weights.safetensors import SafetensorsError, load_file, load_sharded, read_header, save_file


def _sample_tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    return {
        "f32": x, "f64": x.double(), "f16": x.half(), "bf16": x.bfloat16(),
        "i64": torch.arange(7), "i32": torch.arange(-3, 3, dtype=torch.int32),
        "i16": torch.tensor([1, -2], dtype=torch.int16), "i8": torch.tensor([-7, 7, 1], dtype=torch.int8),
        "u8": torch.arange(11, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "f8": x.to(torch.float8_e4m3fn), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
        "nested.name.weight": torch.randn(2, 3, 4, generator=g),
    }


def _same(a, b):
    """Same dtype, shape and bytes (bitwise: also right for float8 and NaN)."""
    bits = lambda t: t.reshape(-1).view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def test_round_trip_all_dtypes_and_metadata(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "a.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "hi"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert _same(back[k], tensors[k]), k
    header = read_header(path)
    assert header["__metadata__"] == {"format": "pt", "note": "hi"}
    assert header["bf16"]["dtype"] == "BF16" and header["bf16"]["shape"] == [3, 5]
    # Header padded with spaces to a multiple of 8, like the reference writer.
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert n % 8 == 0


def test_our_reader_agrees_with_reference_writer(tmp_path):
    st = need("safetensors.torch")
    tensors = {k: v for k, v in _sample_tensors().items()}
    path = tmp_path / "ref.safetensors"
    st.save_file(tensors, str(path), metadata={"format": "pt"})
    ours = load_file(path)
    for k, v in tensors.items():
        assert _same(ours[k], v), k
        if v.dtype.is_floating_point and v.numel():
            cmp(f"reader vs safetensors: {k}", ours[k].float(), v.float())
    assert read_header(path)["__metadata__"] == {"format": "pt"}


def test_reference_reader_loads_our_files(tmp_path):
    st = need("safetensors.torch")
    tensors = _sample_tensors()
    path = tmp_path / "ours.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    ref = st.load_file(str(path))
    for k, v in tensors.items():
        assert _same(ref[k], v), k
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}


def test_tensors_survive_file_deletion_and_writes_do_not_reach_the_file(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32)}, path)
    t = load_file(path)["w"]
    t.mul_(2)                                    # private copy-on-write page, not the file
    assert torch.equal(load_file(path)["w"], torch.arange(64, dtype=torch.float32))
    os.remove(path)
    assert t.sum().item() == 2 * sum(range(64))  # the mapping outlives the file
    copied = torch.arange(3)
    save_file({"c": copied}, path)
    assert torch.equal(load_file(path, copy=True)["c"], copied)


def test_misaligned_tensor_is_copied_correctly(tmp_path):
    # A 3-byte U8 tensor first makes the F32 after it start at an odd offset (hand-built: our writer aligns).
    u8, f32 = torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([1.5, -2.0])
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + u8.numpy().tobytes() + f32.numpy().tobytes())
    back = load_file(path)
    assert torch.equal(back["a"], u8) and torch.equal(back["b"], f32)


def test_sharded_index(tmp_path):
    a, b = torch.randn(2, 2), torch.randn(3)
    save_file({"a": a}, tmp_path / "m-00001-of-00002.safetensors")
    save_file({"b": b}, tmp_path / "m-00002-of-00002.safetensors")
    index = {"metadata": {"total_size": 28}, "weight_map": {"a": "m-00001-of-00002.safetensors",
                                                           "b": "m-00002-of-00002.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    out = load_sharded(tmp_path / "m.safetensors.index.json")
    assert torch.equal(out["a"], a) and torch.equal(out["b"], b)
    index["weight_map"]["c"] = "m-00002-of-00002.safetensors"  # named by the index, absent from the shard
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SafetensorsError, match="missing"):
        load_sharded(tmp_path / "m.safetensors.index.json")
    index["weight_map"] = {"a": "../escape.safetensors"}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SafetensorsError, match="plain file name"):
        load_sharded(tmp_path / "m.safetensors.index.json")


# ---------------------------------------------------------------------------------------------------------------
# Strict validation: one hand-made bad file per rule

def _write(path, header, data=b"", header_bytes=None, length=None):
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("case, match", [
    (dict(header={"a": F32_2}, data=b"\0" * 8, length=10_000), "runs past the end"),
    (dict(header=None, header_bytes=b"\xff\xfe{", data=b""), "header must start"),
    (dict(header=None, header_bytes=b'{"a": \xff}', data=b""), "UTF-8"),
    (dict(header=None, header_bytes=b'{"a": [1,', data=b""), "not valid JSON"),
    (dict(header=None, header_bytes=b'{"a": 1} ', data=b""), "must be a JSON object"),
    (dict(header=None, header_bytes=b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
                                     b' "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
          data=b"\0" * 8), "duplicate name"),
    (dict(header={"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, data=b"\0" * 8), "unknown dtype"),
    (dict(header={"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, data=b"\0" * 8), "non-negative"),
    (dict(header={"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, data=b"\0" * 8), "non-negative"),
    (dict(header={"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, data=b"\0" * 8), "needs 12"),
    (dict(header={"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, data=b"\0" * 8), "begin <= end"),
    (dict(header={"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, data=b"\0" * 4), "run past"),
    (dict(header={"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, data=b"\0" * 12),
     "overlaps"),
    (dict(header={"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, data=b"\0" * 20),
     "hole"),
    (dict(header={"a": F32_2}, data=b"\0" * 9), "trailing bytes"),
    (dict(header={"__metadata__": {"k": 1}, "a": F32_2}, data=b"\0" * 8), "__metadata__"),
    (dict(header={"a": 5}, data=b""), "must be a JSON object"),
    (dict(header={"a": {**F32_2, "extra": 1}}, data=b"\0" * 8), "entry keys"),
])
def test_each_bad_header_is_a_clear_error(tmp_path, case, match):
    path = _write(tmp_path / "bad.safetensors", **case)
    with pytest.raises(SafetensorsError, match=match) as err:
        load_file(path)
    assert str(path) in str(err.value)  # the message names the file


def test_too_short_file(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="too short"):
        load_file(p)


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(SafetensorsError, match="not a torch.Tensor"):
        save_file({"a": [1, 2]}, tmp_path / "x.safetensors")
    with pytest.raises(SafetensorsError, match="cannot store"):
        save_file({"a": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_fuzz_corrupted_and_truncated_files(tmp_path):
    """Seeded random damage to the length field and header bytes, and truncations: never an obscure crash."""
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.int16), "m": torch.ones(2, dtype=torch.bool)},
              good, metadata={"format": "pt"})
    blob = good.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    rng = random.Random(1234)
    bad = tmp_path / "fuzz.safetensors"
    errors = 0
    for trial in range(400):
        data = bytearray(blob)
        kind = trial % 4
        if kind == 0:     # flip 1-4 random bytes inside the length field or header
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(0, 8 + n)] = rng.randrange(256)
        elif kind == 1:   # truncate anywhere
            data = data[:rng.randrange(0, len(data))]
        elif kind == 2:   # swap a structural JSON character for another one
            i = rng.randrange(8, 8 + n)
            data[i] = ord(rng.choice('{}[],:" 0123456789-.eE'))
        else:             # a random header length
            data[:8] = struct.pack("<Q", rng.choice([0, 1, 7, n - 1, n + 1, len(blob), 2**63, 2**64 - 1,
                                                     rng.randrange(2**64)]))
        bad.write_bytes(bytes(data))
        try:
            load_file(bad)
        except SafetensorsError:
            errors += 1
        # any other exception fails the test by propagating
    print(f"fuzz: {errors}/400 corrupted files rejected with SafetensorsError, the rest still valid files")
    assert errors > 300
