"""Safe checkpoint reading: weights_only torch files, CompVis-style .ckpt with foreign pickled objects through the
restricted unpickler, hostile pickles refused without running, sharded .bin indexes."""
import json
import os
import pickle

import pytest
import torch

from ldm.weights.checkpoint import CheckpointError, load_state_dict
from ldm.weights.safetensors import save_file


class ModelCheckpoint:
    """Stands in for pytorch_lightning.callbacks.ModelCheckpoint: a foreign class pickled into real SD .ckpt files."""

    def __init__(self, monitor):
        self.monitor = monitor
        self.best_model_score = torch.tensor(0.5)


def _weights():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    return {
        "model.diffusion_model.conv_in.weight": torch.randn(8, 4, 3, 3, generator=g),
        "model.diffusion_model.conv_in.bias": torch.randn(8, generator=g).half(),
        "first_stage_model.quant_conv.weight": torch.randn(2, 2, generator=g).bfloat16(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "base": base,
        "view.transposed": base.t(),     # non-contiguous view sharing the storage of `base`
        "view.row": base[2],             # a view at a storage offset
    }


def _check_same(loaded, ref):
    assert loaded.keys() == ref.keys()
    for k, v in ref.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_plain_bin_and_pt_use_weights_only(tmp_path):
    sd = _weights()
    for name in ("w.bin", "w.pt", "w.pth"):
        torch.save(sd, tmp_path / name)
        _check_same(load_state_dict(tmp_path / name), sd)
    torch.save({"state_dict": {"state_dict": sd}, "epoch": 3}, tmp_path / "nested.ckpt")  # unwrapped twice
    _check_same(load_state_dict(tmp_path / "nested.ckpt"), sd)
    save_file(sd | {"view.transposed": sd["view.transposed"].contiguous()}, tmp_path / "w.safetensors")
    assert torch.equal(load_state_dict(tmp_path / "w.safetensors")["view.transposed"], sd["view.transposed"])


def test_compvis_ckpt_with_foreign_objects_loads_through_restricted_unpickler(tmp_path):
    sd = _weights()
    sd["param"] = torch.nn.Parameter(torch.randn(3))
    ckpt = {"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
            "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": torch.tensor(1.0)}},
            "hyper_parameters": ModelCheckpoint("val/loss"),
            "state_dict": sd}
    path = tmp_path / "sd-v1.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):  # the premise: torch's allow-list refuses this file
        torch.load(path, weights_only=True)
    loaded = load_state_dict(path)
    _check_same(loaded, {k: v.detach() for k, v in sd.items()})
    assert type(loaded["param"]) is torch.Tensor
    # views keep sharing one storage, as torch.load would give them
    assert loaded["view.row"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()


class _Hostile:
    """Pickles as a call to `func(*args)`: what a malicious checkpoint does to run code at load time."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_payloads(marker):
    import builtins
    import subprocess
    cmd = f"touch {marker}"
    return {
        "os.system": _Hostile(os.system, cmd),
        "builtins.eval": _Hostile(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": _Hostile(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": _Hostile(subprocess.call, ["touch", str(marker)]),
        "torch.load": _Hostile(torch.load, str(marker)),
    }


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "builtins.exec", "subprocess.call", "torch.load"])
@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path, payload, container):
    marker = tmp_path / "PWNED"
    obj = {"state_dict": {"w": torch.ones(2)}, "evil": _hostile_payloads(marker)[payload]}
    path = tmp_path / "evil.ckpt"
    if container == "torch-zip":
        torch.save(obj, path)
    else:
        obj["state_dict"] = {"w": 1.0}  # a raw pickle cannot hold tensors without torch's own helpers
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load") as err:
        load_state_dict(path)
    assert "could run code" in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


class _LyingTensor:
    """Pickles as a tensor of 400 floats over a storage that holds 4: a crafted out-of-bounds read attempt."""

    def __reduce__(self):
        import collections
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = torch.zeros(4).storage()
        return torch._utils._rebuild_tensor_v2, (storage, 0, (400,), (1,), False, collections.OrderedDict())


def test_storage_lying_about_its_size_is_an_error(tmp_path):
    path = tmp_path / "lie.ckpt"
    # the foreign object comes first so that torch's weights_only loader gives up and ours reads the tensor
    torch.save({"callbacks": ModelCheckpoint("x"), "state_dict": {"w": _LyingTensor()}}, path)
    with pytest.raises(CheckpointError, match="out of bounds") as err:
        load_state_dict(path)
    assert str(path) in str(err.value)


def test_sharded_bin_index(tmp_path):
    a, b = torch.randn(3), torch.randn(2, 2)
    torch.save({"a": a}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": b}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    out = load_state_dict(tmp_path / "pytorch_model.bin.index.json")
    assert torch.equal(out["a"], a) and torch.equal(out["b"], b)
    index["weight_map"]["c"] = "pytorch_model-00002-of-00002.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing"):
        load_state_dict(tmp_path / "pytorch_model.bin.index.json")


def test_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.bin"):
        load_state_dict(tmp_path / "junk.bin")
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "absent.ckpt")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint extension"):
        load_state_dict(tmp_path / "w.npz")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_state_dict(tmp_path / "list.pt")
