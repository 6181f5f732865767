"""train.py and evaluate.py as a user runs them: subprocesses in a temporary directory, on a tiny phantom world.

Checks what they write (learned rows, checkpoints, per-pair rows, tables, overlays, the data notice), that a killed
training resumes to exactly the uninterrupted result, and that an interrupted evaluation resumes without redoing
finished pairs.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from ldm.weights.safetensors import load_file
from tiny_world import ENV, REPO, make_tiny_setup
from tiny_world import run as run_cmd


def run(args, cwd):
    return run_cmd([sys.executable, *args], cwd)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_tiny_setup(str(tmp_path_factory.mktemp("e2e")))


def learned(path):
    return load_file(path)["anatomy"]


def test_train_then_evaluate(setup):
    root = setup["root"]
    log = run([os.path.join(REPO, "train.py"), "--config", setup["config"], "out_dir=run_a"], cwd=root)
    out = os.path.join(root, "run_a")
    assert "SYNTHETIC" in log                                   # the data is named, never passed off as real
    assert "trainable" in log and "codebook" in log.lower()     # the codebook table is printed
    for name in ("config.yaml", "ckpt.pt", "learned_rows.safetensors", "eval_frozen.jsonl", "eval_tuned.jsonl",
                 "eval_frozen_vs_tuned.md"):
        assert os.path.exists(os.path.join(out, name)), name
    table = open(os.path.join(out, "eval_frozen_vs_tuned.md")).read()
    assert "Average" in table and "cnr tuned" in table
    assert "Location-swap test" in table and "side share true tuned" in table   # eval_swap defaults to on
    rows = [json.loads(l) for l in open(os.path.join(out, "eval_tuned.jsonl"))]
    assert len(rows) == 4 and all(-10 < r["cnr"] < 10 and 0 <= r["miou_percent"] <= 100 for r in rows)
    assert all(r["protocol"] == "reference" and 0 <= r["auc_binned5"] <= 1 for r in rows)  # the default reached it
    # the learned rows moved away from their initial values (lr 0.05 on 4 steps)
    initial = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert initial["step"] == 4
    # the rows record the layers / steps / window of the run's own table (tiny config: preset, 10 steps)
    from grounding.experiment.rows import rows_settings
    assert rows_settings(os.path.join(out, "learned_rows.safetensors")) == {"layers": (2, 3, 4, 5), "num_steps": 10,
                                                                         "window": (400, 600)}
    # what the run prints explains itself: the codebook's roles, the progress bar, 3-decimal cosines
    assert "special (frozen) = BOS, EOS, the pad token" in log and "drift = how far tuning has moved" in log
    assert re.search(r"'left</w>' -> \S+ \d\.\d{3}, \S+ \d\.\d{3}, \S+ \d\.\d{3}\n", log)
    # the final evaluation writes report.html and overlays into the run folder, as evaluate.py does
    page = open(os.path.join(out, "report.html")).read()
    assert "<th>frozen</th>" in page and "<th>tuned</th>" in page and "<th>tuned, swapped prompt</th>" in page
    assert all(len(os.listdir(os.path.join(out, "overlays", m))) == 4 for m in ("frozen", "untuned", "tuned"))
    # ... and the run ends with its Outputs block: every file of the run folder, what it holds, what to do next
    block = log[log.index("Outputs in run_a/:"):].split("\n\n")[0]      # stdout's end (stderr follows in `log`)
    files = block.split("\nNext:")[0]
    assert all(re.search(rf"[ ,]{re.escape(n)}[,/ \n]", files) for n in os.listdir(out) if n != "train.lock"), block
    assert re.search(r"\n  learned_rows.safetensors +the tuned anatomy rows", block) and "overlays/ (12 files)" in block
    steps = [line.strip() for line in block.split("\nNext:")[1].splitlines()[1:]]
    assert steps[0].startswith("open run_a/report.html") and len(steps) == 3
    for step in steps[1:]:                                        # the commands it suggests run as printed
        cmd = shlex.split(step.split("   #")[0])
        assert cmd[1] in ("ground.py", "evaluate.py") and "run_a/learned_rows.safetensors" in cmd
        run([os.path.join(REPO, cmd[1]), *cmd[2:], "--out", f"next_{cmd[1][:-3]}"] +
            (["--limit", "2", "--bootstrap", "50", "--report-pairs", "0"] if cmd[1] == "evaluate.py" else []), cwd=root)
    assert os.path.exists(os.path.join(root, "next_ground", "viewer.html"))

    log = run([os.path.join(REPO, "evaluate.py"), "--split", "mscxr", "--config", setup["config"], "--baseline",
               "--prompts", os.path.join(out, "learned_rows.safetensors"), "--limit", "3", "--out", "ev",
               "--bootstrap", "200", "--overlays", "2"], cwd=root)
    ev = os.path.join(root, "ev")
    assert "SYNTHETIC" in log
    assert "heatmap settings of the learned rows" in log and "layers (2, 3, 4, 5), 10 DDIM steps" in log
    for name in ("rows_frozen.jsonl", "rows_tuned.jsonl", "table_frozen.md", "table_tuned.json", "comparison.md"):
        assert os.path.exists(os.path.join(ev, name)), name
    assert len(os.listdir(os.path.join(ev, "overlays", "tuned"))) == 2
    header = open(os.path.join(ev, "table_tuned.md")).read()
    assert "Weights:" in header and "Prompts:" in header and "Code:" in header
    page = open(os.path.join(ev, "report.html")).read()        # the one-page report, both models as columns
    assert "<th>frozen</th>" in page and "<th>tuned</th>" in page and "Weights:" in page
    assert page.count('src="data:image/png;base64,') >= 3 and "http" not in page.split("<body>")[1]


def test_killed_training_resumes_to_the_same_result(setup):
    root = setup["root"]
    args = [os.path.join(REPO, "train.py"), "--config", setup["config"], "max_steps=6", "eval_at_end=false"]
    run(args + ["out_dir=run_full"], cwd=root)
    # start a second run, kill it hard once a checkpoint exists, then resume it
    proc = subprocess.Popen([sys.executable, *args, "out_dir=run_killed"], cwd=root, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(root, "run_killed", "ckpt.pt")
    deadline = time.time() + 300
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 1 <= step <= 6
    log = run(args + ["out_dir=run_killed", "--resume"], cwd=root)
    assert "resumed from" in log
    a = learned(os.path.join(root, "run_full", "learned_rows.safetensors"))
    b = learned(os.path.join(root, "run_killed", "learned_rows.safetensors"))
    print(f"killed at step {step}; max diff after resume {float((a - b).abs().max()):.3e}")
    assert torch.allclose(a, b, atol=1e-6)


def test_evaluation_resumes_without_recomputing(setup):
    root = setup["root"]
    args = [os.path.join(REPO, "evaluate.py"), "--split", "phantom", "--config", setup["config"], "--baseline",
            "--limit", "4", "--out", "ev_resume", "--bootstrap", "200", "--overlays", "0"]
    run(args, cwd=root)
    path = os.path.join(root, "ev_resume", "rows_frozen.jsonl")
    full = open(path).read().splitlines()
    assert len(full) == 4
    with open(path, "w") as f:                       # an interrupted run: two rows and a torn third line
        f.write("\n".join(full[:2]) + "\n" + full[2][:15])
    # --baseline alone: the header (in the log and in every file) names the frozen model only
    header = open(os.path.join(root, "ev_resume", "table_frozen.md")).read().split("\n\n")[0]
    assert "Heatmaps: frozen: layers" in header and "tuned" not in header, header
    log = run(args, cwd=root)
    assert "resuming: 2 of 4 pairs already scored" in log
    rows = [json.loads(l) for l in open(path).read().splitlines() if l.strip().endswith("}")]
    assert sorted(r["pair_id"] for r in rows) == sorted(json.loads(l)["pair_id"] for l in full)
    # the recomputed pairs ran in a smaller batch: equal up to float summation order
    assert {r["pair_id"]: r["cnr"] for r in rows} == pytest.approx({json.loads(l)["pair_id"]: json.loads(l)["cnr"]
                                                                    for l in full}, rel=1e-5, abs=1e-6)
    # metric_protocol reaches evaluate.py's scoring: rows of another protocol are never mixed into one table
    out = subprocess.run([sys.executable, *args, "metric_protocol=per_box"], cwd=root, env=ENV, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode != 0 and "metric_protocol: 'reference' -> 'per_box'" in out.stderr


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(setup):
    import shutil

    from ldm.weights.safetensors import save_file
    root = setup["root"]
    bad = os.path.join(root, "model_nan")
    shutil.copytree(setup["model"], bad)
    weights = dict(load_file(os.path.join(bad, "unet.safetensors"), copy=True))
    key = next(k for k in weights if k.endswith("attn2.to_q.weight"))
    weights[key] = weights[key].clone()
    weights[key][0, 0] = float("nan")                        # one poisoned weight -> a NaN loss at the first step
    save_file(weights, os.path.join(bad, "unet.safetensors"))
    out = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config", setup["config"],
                          f"weights={bad}", "out_dir=run_nan", "eval_at_end=false"],
                         cwd=root, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    log = out.stdout + out.stderr                            # NaN at step 0: there is no checkpoint to point at
    assert "loss is nan" in log and "No checkpoint was written yet" in log and "last good checkpoint" not in log
    assert not os.path.exists(os.path.join(root, "run_nan", "ckpt.pt"))   # nothing bad was saved


def fails(args, cwd):
    """Run a script that must refuse: non-zero exit; returns its output."""
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0, f"{args} should have failed:\n{out.stdout[-2000:]}"
    return out.stdout + out.stderr


def test_train_run_dir_rules_and_final_evaluation_settings(setup):
    """No silent replacement of a run, no silent resume with other settings, the trained layers reach the table."""
    import yaml
    root = setup["root"]
    train = [os.path.join(REPO, "train.py"), "--config", setup["config"], "out_dir=run_rules", "max_steps=2",
             "layers=[3,4]", "eval_pairs=2", "eval_untuned=false"]
    log = run(train, cwd=root)
    out = os.path.join(root, "run_rules")
    assert "tuning images (headers read): kept" in log                    # the data report is printed
    assert "tuned: layers (3, 4) (tuning layers), no Otsu, 10 DDIM steps" in log
    assert "frozen: layers (1, 2, 4, 5) (baseline preset), Otsu mask, 10 DDIM steps" in log
    assert "tuned: layers (3, 4)" in open(os.path.join(out, "eval_frozen_vs_tuned.md")).read()
    record = json.load(open(os.path.join(out, "eval_tuned.jsonl.provenance.json")))
    assert record["heatmap"]["layers"] == [3, 4] and record["heatmap"]["num_steps"] == 10
    assert "already holds a checkpoint" in fails(train, cwd=root)         # a second run would replace it
    assert "lr: 0.05 -> 0.01" in fails(train + ["--resume", "lr=0.01"], cwd=root)
    log = run(train + ["lr=0.01", "--resume", "--force"], cwd=root)
    assert yaml.safe_load(open(os.path.join(out, "config.yaml")))["lr"] == 0.05   # the run's first config
    assert yaml.safe_load(open(os.path.join(out, "config.resume_step2.yaml")))["lr"] == 0.01
    assert "resuming: 2 of 2 pairs already scored" in log                 # same learned rows: same run's rows
    log = run(train + ["--overwrite", "seed=1", "lr=0.2"], cwd=root)      # a new run: other rows
    assert "eval_tuned.jsonl holds rows made by something else (prompts:" in log and "fresh file" in log
    assert os.path.exists(os.path.join(out, "eval_tuned.stale.jsonl"))
    assert "resuming: 2 of 2" in log.split("eval_tuned")[0]               # the frozen rows are still the same
    msg = fails(train + ["out_dir=run_bad_layers", "layers=[3,99]"], cwd=root)
    assert "config key 'layers'" in msg and "6 cross-attention layers" in msg
    msg = fails(train + ["eval_batch=0"], cwd=root)
    assert "config key 'eval_batch': must be > 0" in msg and "Traceback" not in msg


def test_runs_that_cannot_learn_or_never_start_say_so(setup):
    """A batch larger than the tuning set ran for hours; zero loss weights "learned" the starting rows and exited 0;
    a lowered max_steps under --resume printed "tuning done: -2 steps"; a failed command left an empty
    runs/eval_<split>/ or a run folder holding only config.yaml."""
    root = setup["root"]
    train = [os.path.join(REPO, "train.py"), "--config", setup["config"], "eval_at_end=false"]
    msg = fails(train + ["out_dir=run_big", "batch_size=100000"], cwd=root)
    assert "config key 'batch_size': 100000 is larger than the tuning set (" in msg
    assert not os.path.exists(os.path.join(root, "run_big"))             # the run never started: no folder left
    log = run(train + ["out_dir=run_still", "w_div=0", "w_loc=0"], cwd=root)
    assert "the learned rows are EXACTLY their starting embeddings" in log
    log = run(train + ["out_dir=run_still", "w_div=0", "w_loc=0", "--resume", "max_steps=2"], cwd=root)
    assert "already past max_steps (4 steps done >= max_steps 2)" in log and "tuning done: 0 steps" in log
    assert "EXACTLY" not in run(train + ["out_dir=run_moves"], cwd=root)  # the usual run moves its rows
    msg = fails([os.path.join(REPO, "evaluate.py"), "--split", "mscxr", "--config", setup["config"],
                 "weights=/nonexistent", "--out", "fresh/ev_never"], cwd=root)
    msg += fails(train + ["out_dir=fresh/never", "weights=/nonexistent"], cwd=root)
    assert msg.count("/nonexistent: no model.yaml") == 2 and not os.path.exists(os.path.join(root, "fresh"))


def test_evaluation_refuses_rows_of_other_prompts(setup):
    from grounding.experiment.rows import save_rows
    from grounding.prompts import LearnablePrompts
    from ldm.weights.folder import load_pipeline
    root = setup["root"]
    pipe = load_pipeline(setup["model"])
    prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens="positional")
    save_rows(prompts, os.path.join(root, "rows_a.safetensors"))
    with torch.no_grad():
        prompts.anatomy.add_(0.1)
    save_rows(prompts, os.path.join(root, "rows_b.safetensors"))
    # key=value overrides between the flags (parse_intermixed_args)
    args = [os.path.join(REPO, "evaluate.py"), "--split", "phantom", "threads=1", "--config", setup["config"],
            "eval_batch=4", "--limit", "2", "--out", "ev_prov", "--bootstrap", "50", "--overlays", "0"]
    log = run(args + ["--prompts", "rows_a.safetensors"], cwd=root)
    heatmaps = next(line for line in log.splitlines() if line.startswith("Heatmaps: "))   # --prompts only: tuned only
    assert heatmaps.startswith("Heatmaps: tuned: layers (2, 3, 4, 5), no Otsu, 10 DDIM steps") and "frozen" not in heatmaps
    msg = fails(args + ["--prompts", "rows_b.safetensors"], cwd=root)
    assert "rows_tuned.jsonl holds rows made by something else (prompts:" in msg and "Refusing to mix" in msg
    log = run(args + ["--prompts", "rows_a.safetensors"], cwd=root)
    assert "resuming: 2 of 2 pairs already scored" in log


def test_evaluate_swap_and_untuned_in_one_pass(setup):
    """evaluate.py --baseline --untuned --prompts --swap: one inversion serves three models and the swapped prompts.

    With learned rows equal to the ORIGINAL embeddings, "tuned" and "untuned" read the same maps (same rows, same
    layers), so their rows must agree exactly; the swap columns exist for exactly the one-sided prompts.
    """
    from grounding.experiment.rows import save_rows
    from grounding.prompts import LearnablePrompts
    from grounding.experiment.swap import prompt_side
    from ldm.weights.folder import load_pipeline
    root = setup["root"]
    pipe = load_pipeline(setup["model"])
    save_rows(LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens="positional"),
              os.path.join(root, "rows_init.safetensors"))
    log = run([os.path.join(REPO, "evaluate.py"), "--split", "phantom", "--config", setup["config"], "--baseline",
               "--untuned", "--prompts", os.path.join(root, "rows_init.safetensors"), "--swap", "--limit", "8",
               "--out", "ev_swap", "--bootstrap", "100", "--overlays", "0"], cwd=root)
    ev = os.path.join(root, "ev_swap")
    rows = {m: [json.loads(l) for l in open(os.path.join(ev, f"rows_{m}.jsonl"))] for m in ("frozen", "untuned", "tuned")}
    assert all(len(r) == 8 for r in rows.values())
    for a, b in zip(rows["untuned"], rows["tuned"]):
        assert a["pair_id"] == b["pair_id"] and a["cnr"] == b["cnr"] and a["miou_percent"] == b["miou_percent"]
    one_sided = [r for r in rows["tuned"] if prompt_side(r["prompt"])[0]]
    assert one_sided, "the tiny world should hold one-sided prompts"
    for r in rows["tuned"]:
        assert ("true_side" in r) == (prompt_side(r["prompt"])[0] is not None)
        if "true_side" in r:
            assert r["true_side"] in (0.0, 0.5, 1.0) and r["swapped_prompt"] != r["prompt"]
            assert abs(r["miou_drop_percent"] - (r["miou_true_percent"] - r["miou_swap_percent"])) < 1e-12
            assert r["miou_true_percent"] == r["miou_percent"]
    swap_md = open(os.path.join(ev, "swap.md")).read()
    assert "side share swapped untuned" in swap_md and "Location-swap test" in log


def test_classify_runs_resumes_and_refuses_rows_retrained_in_place(setup):
    from ldm.weights.safetensors import read_header, save_file
    root = setup["root"]
    run([os.path.join(REPO, "train.py"), "--config", setup["config"], "out_dir=run_cls", "max_steps=1",
         "eval_pairs=0"], cwd=root)
    rows = os.path.join(root, "run_cls", "learned_rows.safetensors")
    args = [os.path.join(REPO, "classify.py"), "--config", setup["config"], "--prompts", rows, "--out", "cls",
            "n_draws=2", "n_boot=50", "n_perm=50"]
    msg = fails(args + ["category=Nodule"], cwd=root)             # data that cannot serve: no --out folder left
    assert "at least 2 Nodule pairs" in msg and not os.path.exists(os.path.join(root, "cls"))
    log = run(args, cwd=root)
    table = open(os.path.join(root, "cls", "table.md")).read()
    assert "tuned LDM heatmap" in table and "AUROC all" in table and "SYNTHETIC" in log
    block = log[log.index("Outputs in cls/:"):]                  # it says where it wrote
    assert "table.md" in block and "rows.jsonl" in block and "settings.json" in block
    assert "images already scored" in run(args, cwd=root)              # the same settings: resumed, not rescored
    tensors = load_file(rows)                                          # retrained into the same path
    save_file({k: v + 0.5 for k, v in tensors.items()}, rows, metadata=read_header(rows)["__metadata__"])
    out = subprocess.run([sys.executable, *args], cwd=root, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode != 0 and "prompts_sha256" in out.stderr, out.stderr[-2000:]


def test_the_readme_figure_never_writes_into_a_training_run_folder(setup):
    """scripts/figure.py reads a finished run (its config, rows and eval_*.jsonl) and the config's data; it saved the
    LUT it built into the config's out_dir, the training run's folder (replacing the LUT the rows were tuned with):
    it saves none."""
    root = setup["root"]
    run([os.path.join(REPO, "train.py"), "--config", setup["config"], "out_dir=run_fig", "max_steps=1"], cwd=root)
    lut = os.path.join(root, "run_fig", "lut.json")
    os.remove(lut)                                                 # a LUT written by figure.py would show up here
    before = sorted(os.listdir(os.path.join(root, "run_fig")))
    run([os.path.join(REPO, "scripts", "figure.py"), "--run", "run_fig", "--out", "fig.png"], cwd=root)
    assert os.path.exists(os.path.join(root, "fig.png"))
    assert sorted(os.listdir(os.path.join(root, "run_fig"))) == before and not os.path.exists(lut)
