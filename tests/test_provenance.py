"""Trustworthy outputs, in-process: rows provenance and locks, the run-directory rules of --resume, learned-rows
identity, config validation, data checks before a run (sizes, numbers, unreadable images, float TIFF), file modes.

The same rules seen through train.py / evaluate.py subprocesses are in tests/test_end_to_end.py.
"""
import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_heatmap import tiny_pipe

from grounding.data import readers as ds

from grounding.data.vindr import read_vindr
from grounding.experiment import provenance
from grounding.experiment.rows import load_rows, save_rows
from grounding.experiment.config import load_config, TrainConfig
from grounding.experiment.evaluation import evaluate_pairs
from grounding.heatmap import LAYER_PRESETS
from grounding.data.images import load_image
from grounding.prompts import LearnablePrompts
from train import parse_args

# ---------------------------------------------------------------------------------------------------------------
# rows files: provenance and lock


def _rows(path, ids):
    with open(path, "w") as f:
        f.writelines(json.dumps({"pair_id": i, "cnr": 1.0}) + "\n" for i in ids)


RECORD = {"weights": "aaaa", "weights_path": "/w", "prompts": "frozen:bbbb", "split": "phantom",
          "heatmap": {"layers": [2, 3, 4, 5], "num_steps": 100}, "code": "abc123"}


def test_rows_from_other_settings_are_refused_or_moved_aside(tmp_path, capsys):
    path = str(tmp_path / "rows_tuned.jsonl")
    _rows(path, ["p0", "p1"])
    with pytest.raises(SystemExit, match="no record of what made them"):      # rows of unknown origin
        provenance.check_rows(path, RECORD)
    os.remove(path)
    provenance.check_rows(path, RECORD)                                     # a new file: record written
    _rows(path, ["p0", "p1"])
    provenance.check_rows(path, {**RECORD, "weights_path": "/elsewhere"})   # same weights, another place: resumes
    other = {**RECORD, "prompts": "frozen:cccc", "heatmap": {"layers": [3, 4], "num_steps": 100}}
    with pytest.raises(SystemExit) as err:
        provenance.check_rows(path, other)
    msg = str(err.value)
    assert "prompts: 'frozen:bbbb' -> 'frozen:cccc'" in msg and "heatmap" in msg and "weights" not in msg.split("(")[1]
    assert open(path).read().count("pair_id") == 2                          # nothing was touched
    provenance.check_rows(path, other, on_mismatch="fresh")                 # train.py: old rows moved aside
    assert not os.path.exists(path) and "fresh file" in capsys.readouterr().out
    assert open(str(tmp_path / "rows_tuned.stale.jsonl")).read().count("pair_id") == 2
    assert json.load(open(path + ".provenance.json"))["prompts"] == "frozen:cccc"
    # a second change of settings sets its rows aside under a new name: the first set is never overwritten
    _rows(path, ["p0", "p1", "p2"])
    provenance.check_rows(path, RECORD, on_mismatch="fresh")
    assert open(str(tmp_path / "rows_tuned.stale.jsonl")).read().count("pair_id") == 2
    assert open(str(tmp_path / "rows_tuned.stale.2.jsonl")).read().count("pair_id") == 3
    assert json.load(open(tmp_path / "rows_tuned.stale.2.provenance.json"))["prompts"] == "frozen:cccc"


def test_the_code_version_covers_code_not_settings(tmp_path):
    """Editing tune.yaml made the version dirty, so --resume set every evaluation row aside and recomputed it."""
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "tune.yaml").write_text("lr: 0.1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    clean = provenance.code_version(str(tmp_path))
    assert clean and "dirty" not in clean and clean != "unknown"
    (tmp_path / "tune.yaml").write_text("lr: 0.2  # edited\n")
    assert provenance.code_version(str(tmp_path)) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance.code_version(str(tmp_path)).startswith(clean + "+dirty.")


def test_records_written_before_the_preset_rename_still_resume(tmp_path):
    """HeatmapConfig.tuned (true also for the untuned rows' reading) became `preset`; a sidecar that says
    "tuned" reads as the same settings, so its rows resume instead of being refused or moved aside."""
    from grounding.heatmap import HeatmapConfig
    for preset, tuned in (("tuning", True), ("baseline", False)):
        path = str(tmp_path / f"rows_{preset}.jsonl")
        record = {**RECORD, "heatmap": provenance.heatmap_settings(HeatmapConfig(family="phantom", preset=preset))}
        old = {**record, "heatmap": {("tuned" if k == "preset" else k): (tuned if k == "preset" else v)
                                     for k, v in record["heatmap"].items()}}
        assert "preset" not in old["heatmap"] and old["heatmap"]["tuned"] is tuned
        _rows(path, ["p0", "p1"])
        json.dump(old, open(path + ".provenance.json", "w"))
        provenance.check_rows(path, record)                                  # no SystemExit: the same settings
        assert open(path).read().count("pair_id") == 2
        json.dump({**old, "heatmap": {**old["heatmap"], "tuned": not tuned}}, open(path + ".provenance.json", "w"))
        with pytest.raises(SystemExit, match="heatmap"):                     # the other reading is still refused
            provenance.check_rows(path, record)


def test_a_live_lock_stops_a_second_writer_and_a_dead_one_is_taken_over(tmp_path):
    lock = str(tmp_path / "rows.jsonl.lock")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(lock, "w") as f:
            json.dump({"pid": sleeper.pid, "host": os.uname().nodename, "since": "now"}, f)
        with pytest.raises(SystemExit, match=f"pid {sleeper.pid}"):
            provenance.acquire_lock(lock)
        # evaluate_pairs takes the same lock: it stops before writing a single row
        pairs = [{"pair_id": "p0", "image_path": "/nonexistent.png", "prompt": "x", "boxes": [], "category": "Edema"}]
        with pytest.raises(SystemExit, match="another evaluation"):
            evaluate_pairs(None, pairs, None, rows_path=str(tmp_path / "rows.jsonl"))
        assert not os.path.exists(tmp_path / "rows.jsonl")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert provenance.acquire_lock(lock) == lock                             # its owner is gone: taken over
    assert json.load(open(lock))["pid"] == os.getpid()
    provenance.release_lock(lock)
    assert not os.path.exists(lock)


# ---------------------------------------------------------------------------------------------------------------
# train.py's run directory


def _cfg(tmp_path, **kw):
    return TrainConfig(out_dir=str(tmp_path / "run"), **kw)


def _prepare(cfg, **kw):
    """prepare_run_dir, then the run starts (config files written) and ends; returns the checkpoint's config."""
    run = provenance.prepare_run_dir(cfg, **kw)
    run.start()
    run.close()
    return run.saved


def test_resume_and_overwrite_rules(tmp_path):
    cfg = _cfg(tmp_path, lr=0.05)
    _prepare(cfg)                                                             # a new run: config.yaml written
    first = tmp_path / "run" / "config.yaml"
    assert yaml.safe_load(first.read_text())["lr"] == 0.05
    torch.save({"step": 3, "prompts": {}, "opt": {}, "config": dataclasses.asdict(cfg)}, str(tmp_path / "run" / "ckpt.pt"))
    with pytest.raises(SystemExit, match="already holds a checkpoint"):      # no silent replacement
        _prepare(cfg)
    # a longer run and another device are a resume; another lr or seed is not
    assert _prepare(_cfg(tmp_path, lr=0.05, max_steps=900, device="cuda"), resume=True)["lr"] == 0.05
    with pytest.raises(SystemExit) as err:
        _prepare(_cfg(tmp_path, lr=0.01, seed=4), resume=True)
    assert "lr: 0.05 -> 0.01" in str(err.value) and "seed: 0 -> 4" in str(err.value)
    _prepare(_cfg(tmp_path, lr=0.01), resume=True, force=True)
    assert yaml.safe_load(first.read_text())["lr"] == 0.05                   # the run's first config is kept
    assert yaml.safe_load((tmp_path / "run" / "config.resume_step3.yaml").read_text())["lr"] == 0.01
    with pytest.raises(SystemExit, match="--force goes with --resume"):
        _prepare(_cfg(tmp_path, lr=0.2), force=True)
    _prepare(_cfg(tmp_path, lr=0.2), overwrite=True)      # explicit: a new run in its place
    assert yaml.safe_load(first.read_text())["lr"] == 0.2
    # settings that change the checkpoint's tensors or optimiser state: not even --force, and nothing written
    for key, value in (("n_ctx", 2), ("shared_tokens", "frozen"), ("optimizer", "sgd")):
        with pytest.raises(SystemExit, match=f"{key}: .* even --force cannot"):
            _prepare(_cfg(tmp_path, lr=0.2, **{key: value}), resume=True, force=True)
    assert sorted(os.listdir(tmp_path / "run")) == ["ckpt.pt", "config.resume_step3.yaml", "config.yaml"]
    _prepare(_cfg(tmp_path, lr=0.3), resume=True, force=True)               # another change at the same step
    assert yaml.safe_load((tmp_path / "run" / "config.resume_step3.yaml").read_text())["lr"] == 0.01   # kept
    assert yaml.safe_load((tmp_path / "run" / "config.resume_step3.2.yaml").read_text())["lr"] == 0.3


def test_a_run_that_never_starts_leaves_nothing_and_a_second_run_is_refused(tmp_path):
    """A failed command left an empty folder or a config.yaml; two train.py runs in one out_dir both finished and
    mixed their files."""
    cfg = TrainConfig(out_dir=str(tmp_path / "runs" / "new"))
    run = provenance.prepare_run_dir(cfg)                                     # checks passed; the model fails to load
    assert os.listdir(tmp_path / "runs" / "new") == ["train.lock"]
    run.close()
    assert not os.path.exists(tmp_path / "runs")                              # every folder made for the lock is gone
    _prepare(TrainConfig(out_dir=str(tmp_path / "run"), lr=0.5))             # a finished run
    run = provenance.prepare_run_dir(TrainConfig(out_dir=str(tmp_path / "run"), lr=0.7), overwrite=True)
    run.close()                                                               # --overwrite, but the run never started
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == 0.5     # its config is kept
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from grounding.experiment import provenance
from grounding.experiment.config import TrainConfig
provenance.prepare_run_dir(TrainConfig(out_dir={str(tmp_path / "busy")!r}))
print("locked", flush=True)
time.sleep(60)"""], stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=f"another train.py run \\(pid {holder.pid} on {os.uname().nodename}"):
            provenance.prepare_run_dir(TrainConfig(out_dir=str(tmp_path / "busy")))
    finally:
        holder.kill()
        holder.wait()
    provenance.prepare_run_dir(TrainConfig(out_dir=str(tmp_path / "busy"))).close()   # its owner is gone: taken over


def test_an_output_folder_that_cannot_be_written_is_named_before_any_work(tmp_path):
    """Was: a PermissionError traceback once the run got to its first write. As root, permissions do not stop a
    write, so the check runs as the user nobody there."""
    import pathlib, shutil, tempfile
    shared = pathlib.Path(tempfile.mkdtemp(prefix="ro-check-"))              # /tmp: the user nobody can reach it
    request_cleanup = lambda: shutil.rmtree(shared, ignore_errors=True)
    (shared / "ro").mkdir()
    os.chmod(shared, 0o777)
    os.chmod(shared / "ro", 0o555)
    code = ("import sys\nfrom grounding.experiment import provenance\n"
            f"for folder, what in (({str(shared / 'ro' / 'run')!r}, 'config key out_dir'), "
            f"({str(shared / 'ro')!r}, 'evaluate.py --out'), ({str(shared)!r}, 'writable')):\n"
            "    try:\n        provenance.check_writable(folder, what)\n"
            "    except SystemExit as e:\n        print(e, file=sys.stderr)\nsys.exit(1)\n")
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if subprocess.run(["setpriv", "--help"], capture_output=True).returncode != 0:
            pytest.skip("running as root without setpriv: no user to whom the folder is read-only")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
        if subprocess.run(cmd[:-1] + ["import grounding"], capture_output=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).returncode != 0:
            pytest.skip("the user nobody cannot run this Python or read the checkout")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                             env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    finally:
        request_cleanup()
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"config key out_dir {shared / 'ro' / 'run'}: cannot write there (it would be made in {shared / 'ro'})" \
        in out.stderr and "chmod u+w" in out.stderr
    assert f"evaluate.py --out {shared / 'ro'}: cannot write there: Permission denied" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 2                          # the open folder passes


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04truncated", None])
def test_an_unreadable_checkpoint_is_named_with_the_remedy(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content is None:
        torch.save({"step": 3}, str(path))                                    # readable, but not train.py's
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit, match="ckpt.pt .*(cannot be read|lacks).*--overwrite") as err:
        provenance.read_checkpoint(str(path))
    assert "weights_only set to False" not in str(err.value)              # never torch's advice to run pickles


def test_overrides_anywhere_on_the_command_line(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    cfg, args = parse_args(["max_steps=7", "--config", str(empty), "lr=0.5", "--resume", "seed=3"])
    assert (cfg.max_steps, cfg.lr, cfg.seed, args.resume) == (7, 0.5, 3, True)
    assert "is empty: running on the built-in defaults" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# config validation


@pytest.mark.parametrize("item", ["batch_size=0", "ckpt_every=0", "eval_batch=0", "max_steps=-1", "lr=0",
                                  "lr=-1e-4", "num_inference_steps=0", "val_pairs=0", "eval_pairs=-2",
                                  "layers=[2,-1]", "layers=[2,2]", "on_missing=ignore", "optimizer=lion",
                                  "train_window=[700,400]", "layers=foo", "layers=5", "views=PA",
                                  "train_window=[400,x]", "device=foo", "out_dir=", "alpha=1e30", "eps=1",
                                  "lr=1e3", "w_loc=1e30", "seed=99999999999999999999", "seed=-1"])
def test_bad_values_are_named_when_the_config_is_loaded(item):
    key = item.split("=")[0]
    with pytest.raises(ValueError, match=f"config key '{key}(\\[\\d\\])?'"):     # a list item: 'train_window[1]'
        load_config(TrainConfig, None, [item])


def test_config_files_that_are_not_yaml_and_where_an_unknown_key_came_from(tmp_path):
    (tmp_path / "bad.yaml").write_text("lr: [1\n")
    for path in (tmp_path / "bad.yaml", tmp_path):                      # broken YAML; a folder
        with pytest.raises(ValueError, match=f"config file {path} cannot be read as YAML"):
            load_config(TrainConfig, str(path))
    (tmp_path / "ok.yaml").write_text("lr: 0.1\n")
    with pytest.raises(ValueError, match=r"\['max_step'\] \(from the command line\)"):
        load_config(TrainConfig, str(tmp_path / "ok.yaml"), ["max_step=2"])


def test_a_key_given_twice_a_binary_file_and_an_empty_path(tmp_path):
    (tmp_path / "twice.yaml").write_text("max_steps: 6\nseed: 0\nmax_steps: 7\n")
    with pytest.raises(ValueError, match=r"twice.yaml: key 'max_steps' is given twice \(lines 1 and 3\)"):
        load_config(TrainConfig, str(tmp_path / "twice.yaml"))
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(ValueError, match=f"config file {tmp_path / 'binary.yaml'} cannot be read as YAML"):
        load_config(TrainConfig, str(tmp_path / "binary.yaml"))
    (tmp_path / "empty_path.yaml").write_text("vindr_csv:\nlut_path: x.json\n")
    cfg = load_config(TrainConfig, str(tmp_path / "empty_path.yaml"), ["lut_path="])   # empty = not configured
    assert (cfg.vindr_csv, cfg.lut_path) == ("", "")
    with pytest.raises(ValueError, match="config key 'out_dir'"):       # a key with a real default stays required
        load_config(TrainConfig, None, ["out_dir="])


def test_scripts_answer_bad_values_with_the_message_not_a_traceback(capsys):
    import evaluate
    with pytest.raises(SystemExit):
        evaluate.main(["--split", "phantom", "--batch", "0"])               # was: "range() arg 3 must not be zero"
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["ckpt_every=0"])                                         # was: ZeroDivisionError at step 1
    assert "config key 'ckpt_every': must be > 0, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--split", "phantom", "--report-pairs", "-2"])       # was: accepted
    assert "--report-pairs must be >= 0, got -2" in capsys.readouterr().err
    import classify                                                          # overrides on both sides of a flag
    with pytest.raises(SystemExit):
        classify.main(["--config", "/nonexistent.yaml", "threads=1", "--out", "/tmp/x", "seed=1"])
    assert "config file /nonexistent.yaml does not exist" in capsys.readouterr().err   # was: unrecognized arguments


def test_every_config_key_has_a_meaning_and_help_lists_it(capsys):
    """TrainConfig's field comments are the keys' one documentation: each field has one, `train.py --help` prints
    every key with its default and that comment, grouped by the dataclass's `# --- title ---` lines."""
    from grounding.experiment.config import key_docs
    docs = key_docs(TrainConfig)
    assert [key for _, key, _, _ in docs] == [f.name for f in dataclasses.fields(TrainConfig)]
    assert not [key for _, key, _, meaning in docs if len(meaning) < 10], "a config key without a meaning"
    assert {key: group for group, key, _, _ in docs}["lr"].startswith("prompt tuning")
    meaning = {key: m for _, key, _, m in docs}    # a continuation line is part of the meaning, RETIRED_KEYS' is not
    assert meaning["train_window"].endswith("in reverse-process order (grounding/heatmap.py)")
    assert "mode" not in meaning["eval_swap"]
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())            # argparse's wrapping aside
    for group, key, default, m in docs:
        shown = str(default).lower() if isinstance(default, bool) else default if default != "" else '""'
        assert f"{key}: {shown if not isinstance(default, list) else ''}" in text, key
        assert " ".join(m.split()) in text, key
    assert "max_steps: 600 optimiser steps" in text and "views: [PA]" in text and "train_window: [400, 700]" in text


def test_layer_indices_are_checked_against_the_model():
    from grounding.experiment.config import check_layers
    n = len(tiny_pipe().unet.cross_attention_layers())
    check_layers("layers", list(range(n)), n)
    with pytest.raises(ValueError, match=rf"config key 'layers'.*\[{n}\].*has {n} cross-attention layers"):
        check_layers("layers", [0, n], n)


def test_final_evaluation_uses_the_trained_layers_and_steps():
    cfg = TrainConfig(layers=[3, 4], num_inference_steps=50)
    tuned = provenance.eval_heatmap_config(cfg, "phantom", tuned=True)
    frozen = provenance.eval_heatmap_config(cfg, "phantom", tuned=False)
    assert tuned.resolved_layers() == (3, 4) and tuned.num_steps == 50 and not tuned.resolved_otsu()
    assert frozen.resolved_layers() == LAYER_PRESETS[("phantom", "baseline")] and frozen.resolved_otsu()  # paper protocol
    assert frozen.num_steps == 50
    line = provenance.describe_heatmap("tuned", tuned)
    assert "layers (3, 4)" in line and "50 DDIM steps" in line and "no Otsu" in line


# ---------------------------------------------------------------------------------------------------------------
# learned rows carry what they were learned with


def test_learned_rows_refuse_another_encoder_vocabulary_or_mode(tmp_path):
    pipe = tiny_pipe()
    path = str(tmp_path / "rows.safetensors")
    save_rows(LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens="positional"), path)
    load_rows(LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens="positional"), path)   # same: loads
    with pytest.raises(ValueError, match="shared_tokens mode"):
        load_rows(LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens="trainable"), path)
    other = tiny_pipe().text_encoder
    with torch.no_grad():
        other.token_embedding.weight[5] += 0.01                              # one row of the table differs
    with pytest.raises(ValueError, match=r"text encoder \(input embedding table\)"):
        load_rows(LearnablePrompts(pipe.tokenizer, other, shared_tokens="positional"), path)
    from ldm.weights.safetensors import load_file, read_header, save_file
    meta = read_header(path)["__metadata__"]
    save_file(load_file(path), path, metadata={**meta, "vocab_size": "49408"})
    with pytest.raises(ValueError, match="vocabulary size.*49408"):
        load_rows(LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens="positional"), path)


def test_broken_rows_files_are_named(tmp_path):
    from ldm.weights.safetensors import load_file, read_header, save_file
    pipe = tiny_pipe()
    fresh = lambda: LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens="positional")
    path = str(tmp_path / "rows.safetensors")
    save_rows(fresh(), path)
    meta, tensors = read_header(path)["__metadata__"], load_file(path)
    with pytest.raises(FileNotFoundError, match="learned rows .*nothere.safetensors not found"):
        load_rows(fresh(), str(tmp_path / "nothere.safetensors"))
    cases = [({**meta, "tokens": "not json"}, tensors, "'tokens' is not JSON"),
             ({**meta, "n_ctx": "two"}, tensors, "'n_ctx' must be a whole number"),
             (meta, {"other": tensors["anatomy"]}, "no 'anatomy' tensor"),
             (meta, {"anatomy": tensors["anatomy"] * float("nan")}, "NaN or inf")]
    for i, (m, t, message) in enumerate(cases):
        bad = str(tmp_path / f"bad{i}.safetensors")
        save_file(t, bad, metadata=m)
        with pytest.raises(ValueError, match=message):
            load_rows(fresh(), bad)
    torch.save({"anatomy": tensors["anatomy"]}, str(tmp_path / "ckpt.pt"))          # a torch file, not safetensors
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_rows(fresh(), str(tmp_path / "ckpt.pt"))


# ---------------------------------------------------------------------------------------------------------------
# data checked before the run


COLS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height"]


def _mscxr(tmp_path, rows, images):
    for name, (w, h) in images.items():
        Image.new("L", (w, h), 100).save(tmp_path / name)
    path = tmp_path / "ms.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([COLS] + rows)
    return str(path)


def test_swapped_image_size_is_caught_and_names_pair_and_row(tmp_path):
    rows = [["a", "Edema", "edema", "a.png", 1, 1, 5, 5, 40, 30],
            ["b", "Edema", "edema", "b.png", 1, 1, 5, 5, 30, 40]]             # b.png is 40 x 30: swapped
    csv_path = _mscxr(tmp_path, rows, {"a.png": (40, 30), "b.png": (40, 30)})
    with pytest.raises(ValueError, match=r"pair b_00 \(CSV row 3\).*image_width=30, image_height=40.*40 x 30.*swapped"):
        ds.read_mscxr(csv_path, str(tmp_path))
    pairs, rep = ds.read_mscxr(csv_path, str(tmp_path), on_missing="skip")
    assert [p["dicom_id"] for p in pairs] == ["a"] and rep["image size differs from the CSV (skipped)"] == 1


def test_non_numeric_box_names_file_and_row(tmp_path):
    csv_path = _mscxr(tmp_path, [["a", "Edema", "edema", "a.png", 1, 1, 5, 5, 40, 30],
                                 ["a", "Edema", "edema", "a.png", 1, "n/a", 5, 5, 40, 30]], {"a.png": (40, 30)})
    with pytest.raises(ValueError, match=r"ms.csv row 3: column 'y' = 'n/a' is not a number"):
        ds.read_mscxr(csv_path, str(tmp_path))
    vindr = tmp_path / "annotations_test.csv"
    vindr.write_text("image_id,class_name,x_min,y_min,x_max,y_max\nv1,Cardiomegaly,1,2,three,9\n")
    with pytest.raises(ValueError, match=r"annotations_test.csv row 2: column 'x_max' = 'three'"):
        read_vindr(str(vindr), str(tmp_path))


def test_corrupt_or_missing_image_is_found_at_load_time(tmp_path):
    rows = [["a", "Edema", "edema", "a.png", 1, 1, 5, 5, 40, 30],
            ["c", "Edema", "edema", "c.png", 1, 1, 5, 5, 40, 30],
            ["m", "Edema", "edema", "m.png", 1, 1, 5, 5, 40, 30]]
    csv_path = _mscxr(tmp_path, rows, {"a.png": (40, 30)})
    (tmp_path / "c.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"pair c_00 \(CSV row 3\): cannot read image"):
        ds.read_mscxr(csv_path, str(tmp_path), on_missing="error")
    os.remove(tmp_path / "c.png")
    with pytest.raises(FileNotFoundError, match=r"pair c_00 \(CSV row 3\)"):
        ds.read_mscxr(csv_path, str(tmp_path))
    (tmp_path / "c.png").write_bytes(b"not an image at all")
    pairs, rep = ds.read_mscxr(csv_path, str(tmp_path), on_missing="skip")
    assert [p["dicom_id"] for p in pairs] == ["a"]
    assert rep["unreadable image file (skipped)"] == 1 and rep["missing image file"] == 1


def test_on_missing_is_reachable_from_the_config(tmp_path):
    """sources.load passes the config key through: a world with a deleted and a corrupted image."""
    from grounding.experiment import sources
    from grounding.phantom.world import PhantomConfig, build_world
    world = str(tmp_path / "world")
    build_world(world, PhantomConfig.tiny())
    cfg = TrainConfig(phantom_root=world, out_dir=str(tmp_path / "run"))
    ms_csv = os.path.join(world, "ms-cxr", "MS_CXR_Local_Alignment_v1.1.0.csv")
    first = next(csv.DictReader(open(ms_csv)))
    image = os.path.join(world, "mimic-cxr-jpg", first["path"])
    sample = sources.load(cfg).samples[0]["image_path"]
    with open(sample, "wb") as f:                   # a tuning image that is no image: found before the run
        f.write(b"garbage")
    with pytest.raises(ValueError, match=f"cannot read image {sample}.*on_missing: skip"):
        sources.load(cfg)
    os.remove(image)                                # a test pair's image is gone
    with pytest.raises(FileNotFoundError, match="on_missing: skip"):
        sources.load(cfg)
    data = sources.load(dataclasses.replace(cfg, on_missing="skip"))
    print(data.report)
    assert "tuning images (headers read): kept" in data.report and "unreadable image file (skipped): 1" in data.report
    assert f"MS-CXR {ms_csv}: kept" in data.report and "missing image file: 1" in data.report
    assert all(p["image_path"] != image for p in data.mscxr) and all(s["image_path"] != sample for s in data.samples)


def test_float_tiff_is_read_with_its_values(tmp_path):
    arr = np.linspace(0.0, 1.0, 12 * 10, dtype=np.float32).reshape(12, 10)
    Image.fromarray(arr, mode="F").save(tmp_path / "x.tif")
    assert np.allclose(load_image(str(tmp_path / "x.tif")), arr)
    Image.fromarray(arr * 4000 - 1000, mode="F").save(tmp_path / "hu.tif")    # outside [0, 1]: min-max scaled
    assert np.allclose(load_image(str(tmp_path / "hu.tif")), arr, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# file modes


def test_saved_weights_and_rows_get_the_usual_permissions(tmp_path):
    from ldm.pipeline import Pipeline
    from ldm.weights.folder import save_pipeline
    from ldm.weights.safetensors import save_file
    t = tiny_pipe()
    pipe = Pipeline(tokenizer=t.tokenizer, text_encoder=t.text_encoder, vae=t.vae, unet=t.unet, scheduler=t.scheduler,
                    scale_factor=1.0, prediction_type="v_prediction", family="phantom",
                    image={"channels": 1, "size": 32, "range": [0.0, 1.0]})
    old = os.umask(0o022)
    try:
        save_file({"a": torch.zeros(2)}, str(tmp_path / "rows.safetensors"))
        save_pipeline(pipe, str(tmp_path / "model"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "rows.safetensors").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "model").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "model" / "unet.safetensors").st_mode & 0o777 == 0o644


def test_retired_pretraining_keys_of_old_configs():
    """An old run's config.yaml (mode: tune, pretraining keys) still loads; mode pretrain names its own script."""
    cfg = load_config(TrainConfig, None, ["mode=tune", "vae_steps=400", "log_every=50", "max_steps=3"])
    assert cfg.max_steps == 3 and not hasattr(cfg, "mode")
    with pytest.raises(ValueError, match="config key 'mode'.*scripts/pretrain_phantom.py"):
        load_config(TrainConfig, None, ["mode=pretrain"])
