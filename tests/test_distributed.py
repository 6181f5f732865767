"""Scale-out: `torchrun --nproc_per_node 2` (gloo, CPU) gives the same results as one process.

evaluate.py shards the pairs over the ranks and gathers one table; train.py runs data-parallel (each rank takes a
slice of every global batch, gradients of the learnable rows are all-reduced), so 2 ranks x batch 1 must learn the
same rows as 1 process x batch 2.
"""
import json
import os
import sys

import pytest

from ldm.weights.safetensors import load_file
from tiny_world import REPO, make_tiny_setup, run

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_tiny_setup(str(tmp_path_factory.mktemp("ddp")))


def test_two_process_evaluation_gives_the_single_process_table(setup):
    root = setup["root"]
    args = [os.path.join(REPO, "evaluate.py"), "--split", "phantom", "--config", setup["config"], "--baseline",
            "--limit", "6", "--bootstrap", "500", "--overlays", "0"]
    run([sys.executable, *args, "--out", "single"], cwd=root)
    run([*TORCHRUN, *args, "--out", "ddp"], cwd=root)
    # each rank wrote its own share; together they are all the pairs, once
    shares = [[json.loads(l) for l in open(os.path.join(root, "ddp", f"rows_frozen.rank{r}.jsonl"))] for r in (0, 1)]
    assert len(shares[0]) == 3 and len(shares[1]) == 3
    assert not {r["pair_id"] for r in shares[0]} & {r["pair_id"] for r in shares[1]}
    single = json.load(open(os.path.join(root, "single", "table_frozen.json")))["summary"]
    ddp = json.load(open(os.path.join(root, "ddp", "table_frozen.json")))["summary"]
    assert single.keys() == ddp.keys()
    for cls in single:
        assert single[cls]["n"] == ddp[cls]["n"]
        for metric in ("cnr", "miou_percent", "auc", "pointing"):
            print(cls, metric, single[cls][metric], ddp[cls][metric])
            assert ddp[cls][metric] == pytest.approx(single[cls][metric], rel=1e-4, abs=1e-5)


def test_two_process_training_learns_the_single_process_rows(setup):
    root = setup["root"]
    args = [os.path.join(REPO, "train.py"), "--config", setup["config"], "max_steps=3", "eval_at_end=false"]
    run([sys.executable, *args, "batch_size=2", "out_dir=single"], cwd=root)
    log = run([*TORCHRUN, *args, "batch_size=1", "out_dir=ddp"], cwd=root)
    a = load_file(os.path.join(root, "single", "learned_rows.safetensors"))["anatomy"]
    b = load_file(os.path.join(root, "ddp", "learned_rows.safetensors"))["anatomy"]
    diff = float((a - b).abs().max())
    print(f"2 ranks x batch 1 vs 1 process x batch 2: max diff of the learned rows {diff:.3e}")
    assert diff < 1e-5
    assert log.count("tuning done") == 1  # only rank 0 reports


def test_sample_stream_covers_every_epoch_and_draws_never_repeat():
    import collections
    from train import draw_seed, sample_index
    n, gb = 7, 4                                                  # a batch that crosses epoch boundaries
    seen = [sample_index(step, k, gb, n, seed=0) for step in range(7) for k in range(gb)]   # 28 items = 4 epochs
    for e in range(4):
        assert sorted(seen[e * n:(e + 1) * n]) == list(range(n)), f"epoch {e}: {seen[e * n:(e + 1) * n]}"
    assert collections.Counter(seen) == {i: 4 for i in range(n)}
    for gb in (1, 2, 96, 200):                                    # every (step, k) its own random stream
        seeds = [draw_seed(step, k, gb, seed=0) for step in range(5) for k in range(gb)]
        assert len(set(seeds)) == len(seeds), gb


def test_cuda_under_torchrun_takes_the_local_gpu_and_refuses_a_fixed_one(monkeypatch):
    from grounding.experiment import distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="every rank on one GPU"):
        distributed.setup("cuda:1")
