"""What produced a file of results, and the rules that keep one run's outputs from passing as another's.

Three things live here, each used by train.py, evaluate.py and grounding/experiment/evaluation.py:
- digests: short sha256 fingerprints of a weights folder, a file, learned prompt rows, the code (git commit);
- rows provenance: a per-pair rows file (rows_*.jsonl, eval_*.jsonl) gets a sidecar `<rows>.provenance.json`
  naming the weights, prompts, split, heatmap settings and code that made its rows. A rerun resumes only rows
  made by the same things; otherwise it refuses (evaluate.py) or moves the old file aside (train.py's own
  out_dir), and says which keys differ;
- a lock file `<rows>.lock` so that two evaluations writing one rows file at once do not both do the work and
  interleave their rows: the second one stops with a message naming the first one's process id.
And the run-directory rules of train.py (--resume, --force, --overwrite, one run per out_dir; `prepare_run_dir`),
and `check_writable`, which every script calls on its output folders before any work.
"""
import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import tempfile
import time

import torch
import yaml

# record keys that say where things were, for the reader, but do not decide whether rows can be reused
INFO_KEYS = ("weights_path", "prompts_path", "written")


# ---------------------------------------------------------------------------------------------------------------
# digests


def file_digest(path, chunk=1 << 20):
    """sha256 (first 16 hex digits) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:16]


_FILE_CACHE = {}  # (path, size, mtime_ns) -> digest: an image shared by several pairs is read once


def file_digest_cached(path):
    """file_digest, computed once per (path, size, mtime) in a process."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_CACHE:
        _FILE_CACHE[key] = file_digest(path)
    return _FILE_CACHE[key]


_FOLDER_CACHE = {}  # (path, [(name, size, mtime_ns)]) -> digest: a folder of weights is hashed once per process


def folder_digest(path):
    """sha256 over the names and bytes of every (non-hidden) file under a weights folder, or of a single file."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        return file_digest(path)
    files = []
    for dirpath, dirnames, names in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [os.path.join(dirpath, n) for n in sorted(names) if not n.startswith(".")]
    stamp = (path, tuple((f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files))
    if stamp not in _FOLDER_CACHE:
        h = hashlib.sha256()
        for f in files:
            h.update(os.path.relpath(f, path).encode() + b"\0" + file_digest(f).encode())
        _FOLDER_CACHE[stamp] = h.hexdigest()[:16]
    return _FOLDER_CACHE[stamp]


def tensor_digest(*tensors):
    """sha256 of tensors' fp32 bytes (CPU), e.g. a text encoder's input embedding table or learned rows."""
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def prompts_digest(prompts):
    """Fingerprint of learned prompt rows (None for the frozen text encoder)."""
    if prompts is None:
        return None
    return f"{prompts.shared_tokens}:{tensor_digest(prompts.anatomy, prompts.ctx)}"


def code_version(repo=None):
    """The git commit of this checkout (short), plus '+dirty.<hash of the diff>' when tracked Python files were edited.

    Code only: editing a config (tune.yaml, as the README invites) does not make earlier rows "made by other code";
    the settings that decide a row are recorded on their own (heatmap settings, data, metric protocol)."""
    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=repo, timeout=30).stdout
        head = run("rev-parse", "--short", "HEAD").strip()
        if not head:
            return "unknown"
        diff = run("diff", "HEAD", "--", ":(top)*.py")                # every .py of the checkout, at any depth
        return head + (f"+dirty.{hashlib.sha256(diff.encode()).hexdigest()[:8]}" if diff else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# heatmap settings, as recorded and as printed


def heatmap_settings(hcfg):
    """The settings that decide a heatmap, with the layers and Otsu choice resolved (a preset written out)."""
    d = dataclasses.asdict(hcfg)
    d["layers"] = list(hcfg.resolved_layers())
    d["otsu"] = hcfg.resolved_otsu()
    d["window"] = list(d["window"])
    return d


def describe_heatmap(name, hcfg, note=""):
    """One header line: which layers, Otsu, steps and window a column of the table used."""
    s = heatmap_settings(hcfg)
    return (f"{name}: layers {tuple(s['layers'])}{note}, {'Otsu mask' if s['otsu'] else 'no Otsu'}, "
            f"{s['num_steps']} DDIM steps ({s['spacing']}), window t in [{s['window'][0]}, {s['window'][1]})"
            + (f", {s['autocast']} autocast" if s["autocast"] != "none" else ""))


def eval_heatmap_config(cfg, family, tuned):
    """The heatmap settings an evaluation of a train.py config uses (train.py's final table and evaluate.py).

    The frozen baseline keeps the paper's protocol (its family's preset layers + Otsu); the tuned prompts (and the
    "untuned" ablation) read the layers the rows were trained on (cfg.layers, or the tuned preset). Both use the
    config's DDIM schedule (num_inference_steps; paper: 100) with the test window.
    """
    from grounding.heatmap import HeatmapConfig
    layers = tuple(cfg.layers) if tuned and cfg.layers else None
    return HeatmapConfig(num_steps=cfg.num_inference_steps, family=family, preset="tuning" if tuned else "baseline",
                         layers=layers, autocast=cfg.autocast)


def rows_record(pipe, weights, hcfg, prompts=None, prompts_path=None, split=None, data=None):
    """What produced a rows file: compared key by key (INFO_KEYS excepted) before rows are reused."""
    return {"weights": folder_digest(weights), "weights_path": os.path.abspath(weights), "family": pipe.family,
            "prompts": prompts_digest(prompts), "prompts_path": os.path.abspath(prompts_path) if prompts_path else None,
            "split": split, "data": data, "heatmap": heatmap_settings(hcfg), "code": code_version()}


# ---------------------------------------------------------------------------------------------------------------
# rows files: provenance sidecar and lock


def read_record(path):
    """A rows file's sidecar record; one written before HeatmapConfig.tuned became `preset` reads as the same
    settings (tuned true -> preset "tuning", false -> "baseline"), so its rows still resume."""
    with open(path) as f:
        record = json.load(f)
    heatmap = record.get("heatmap") if isinstance(record, dict) else None
    if isinstance(heatmap, dict) and "tuned" in heatmap and "preset" not in heatmap:
        heatmap = {("preset" if k == "tuned" else k): ("tuning" if v else "baseline") if k == "tuned" else v
                   for k, v in heatmap.items()}
        record = {**record, "heatmap": heatmap}
    return record


def differences(old, new, ignore=()):
    """[(key, old value, new value)] for keys whose values differ (missing = None)."""
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in ignore]
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def _format(diffs):
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)


def check_rows(rows_path, record, on_mismatch="error"):
    """Before rows_path is resumed: its rows must have been made by `record`'s weights/prompts/settings/code.

    on_mismatch "error": raise, naming the keys that differ; "fresh": move the old rows (and sidecar) aside to
    `<rows>.stale.jsonl` and start a new file. Rows without a sidecar (older runs) count as a mismatch.
    Writes the sidecar for a new or matching file.
    """
    meta_path = rows_path + ".provenance.json"
    if os.path.exists(rows_path) and os.path.getsize(rows_path) > 0:
        old = None
        if os.path.exists(meta_path):
            old = read_record(meta_path)
        diffs = differences(old, record, ignore=INFO_KEYS) if old is not None else [("provenance", "(no record)", "...")]
        if diffs:
            what = (f"{rows_path} holds rows made by something else ({_format(diffs)})" if old is not None else
                    f"{rows_path} holds rows with no record of what made them ({meta_path} is missing)")
            if on_mismatch == "error":
                raise SystemExit(f"{what}. Refusing to mix them into this table: use another --out, or delete "
                                 f"{rows_path} to recompute.")
            stale = _free_stale_name(rows_path)
            os.replace(rows_path, stale + ".jsonl")
            if os.path.exists(meta_path):
                os.replace(meta_path, stale + ".provenance.json")
            print(f"{what}: moved to {stale}.jsonl; starting a fresh file")
    with open(meta_path, "w") as f:
        json.dump({**record, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=1)


def _free_stale_name(rows_path):
    """`<rows>.stale`, or `<rows>.stale.2`, `.stale.3`, ... : the first name whose .jsonl and .provenance.json are both
    free, so that rows set aside are never overwritten by rows set aside later."""
    stem = rows_path[:-len(".jsonl")] if rows_path.endswith(".jsonl") else rows_path
    n = 1
    while True:
        name = f"{stem}.stale" + (f".{n}" if n > 1 else "")
        if not os.path.exists(name + ".jsonl") and not os.path.exists(name + ".provenance.json"):
            return name
        n += 1


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(path, holder="another evaluation", doing="is writing these rows",
                 remedy="Wait for it to finish, or use another --out"):
    """Create the lock file `path` (pid, host), or stop when a live process on this host holds it.

    A lock left by a process that died (killed, crashed) is taken over with a note.
    """
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                with open(path) as f:
                    other = json.load(f)
            except (OSError, ValueError):
                other = {}
            same_host = other.get("host") == me["host"]
            if not same_host or _alive(int(other.get("pid", -1))) and other.get("pid") != me["pid"]:
                raise SystemExit(f"{path}: {holder} (pid {other.get('pid')} on {other.get('host')}, "
                                 f"since {other.get('since')}) {doing}. {remedy}; delete {path} if that process no "
                                 "longer runs.") from None
            print(f"{path}: taking over a lock left by pid {other.get('pid')}, which no longer runs")
            os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise SystemExit(f"{path}: could not take the lock; delete it if no {holder.split()[-1]} is running")


def release_lock(path):
    if path and os.path.exists(path):
        os.remove(path)


# ---------------------------------------------------------------------------------------------------------------
# train.py's run directory: one config per run, resume only what was started, never replace a checkpoint silently

# settings that may change on --resume without changing what the run learns
# settings that change what the checkpoint holds (the learned tensors' shapes, the optimiser's state, the model the
# rows belong to): even --force cannot resume across them
STRUCTURAL_KEYS = ("weights", "shared_tokens", "n_ctx", "optimizer")
RESUME_FREE_KEYS = ("out_dir", "device", "threads", "max_steps", "ckpt_every", "val_every", "val_pairs",
                    "eval_at_end", "eval_pairs", "eval_batch", "eval_untuned", "eval_swap", "latent_cache_mb")


def read_checkpoint(path, map_location="cpu"):
    """train.py's ckpt.pt (tensors and plain values only, never pickled code); a clear stop when it is unreadable."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or holding objects weights_only refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SystemExit(f"{path} cannot be read as a train.py checkpoint ({type(e).__name__}: {first[:200]}); "
                         "restore it from a backup, or start over with --overwrite") from None
    missing = [k for k in ("prompts", "opt", "step") if not isinstance(state, dict) or k not in state]
    if missing:
        raise SystemExit(f"{path} lacks {missing}: not a train.py checkpoint; restore it, or start over with "
                         "--overwrite")
    return state


def check_writable(folder, what):
    """Stop before any work when `folder` cannot be written: the folder itself, or, when it does not exist yet, the
    nearest existing folder above it (where it would be made). Tried by creating a temporary file, which is what
    counts (a read-only mount, permissions, another user's folder)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise SystemExit(f"{what} {folder}: {path} is a file, not a folder; choose another folder")
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        where = "" if path == os.path.abspath(folder) else f" (it would be made in {path})"
        raise SystemExit(f"{what} {folder}: cannot write there{where}: {e.strerror}. Choose a writable folder, or "
                         f"make it writable (chmod u+w {path})") from None


@dataclasses.dataclass
class Run:
    """train.py's run folder between the checks and the end of the run (prepare_run_dir).

    The folder holds a lock (`train.lock`: pid, host) from the checks on, so a second train.py on the same out_dir
    stops; nothing else is written until `start()` (the model and the data have loaded): a command that fails
    before that leaves no config.yaml, and a folder made only for the lock is removed again by `close()`.
    """
    saved: dict = None                                   # the checkpoint's config when resuming, else None
    lock: str = None
    pending: list = dataclasses.field(default_factory=list)   # [(config dict, path)] written by start()
    made: list = dataclasses.field(default_factory=list)      # folders made for the lock, deepest first
    started: bool = False

    def start(self):
        for d, path in self.pending:
            save_yaml(d, path)
        self.started = True

    def close(self):
        release_lock(self.lock)
        self.lock = None
        if not self.started:  # the run never began: leave no empty folder behind
            for folder in self.made:
                try:
                    os.rmdir(folder)
                except OSError:
                    break


def _make_dirs(folder):
    """os.makedirs, returning the folders it made (deepest first)."""
    made, path = [], os.path.abspath(folder)
    while not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    return made


def prepare_run_dir(cfg, resume=False, force=False, overwrite=False, write=True):
    """Check out_dir against this invocation before anything runs; returns a Run (lock held on rank 0).

    - out_dir must be writable (check_writable), and no other train.py may be running in it (the lock);
    - a checkpoint exists, no --resume and no --overwrite: stop (a run is never replaced silently);
    - --resume: the checkpoint's config must match this one except RESUME_FREE_KEYS (stop, naming the keys,
      unless --force); config.yaml, the run's first config, is kept and a changed config goes to
      config.resume_step<N>.yaml.
    The config files are written by Run.start(), once the model and data have loaded; call Run.close() at the end.
    """
    ckpt = os.path.join(cfg.out_dir, "ckpt.pt")
    first = os.path.join(cfg.out_dir, "config.yaml")
    new = dataclasses.asdict(cfg)
    if force and not resume or resume and overwrite:
        raise SystemExit("--force goes with --resume (continue with changed settings); --overwrite starts a new run "
                         "instead: pass one of them")
    check_writable(cfg.out_dir, "config key out_dir")
    run = Run()
    if write:  # rank 0: the lock first, so that the checks below see what no other run is changing
        run.made = _make_dirs(cfg.out_dir)
        run.lock = acquire_lock(os.path.join(cfg.out_dir, "train.lock"), holder="another train.py run",
                                doing="is using this out_dir", remedy="Wait for it to finish, or choose another out_dir")
    try:
        _check_run_dir(cfg, run, ckpt, first, new, resume, force, overwrite, write)
    except BaseException:
        run.close()
        raise
    return run


def _check_run_dir(cfg, run, ckpt, first, new, resume, force, overwrite, write):
    if os.path.exists(ckpt) and not resume and not overwrite:
        raise SystemExit(f"{cfg.out_dir} already holds a checkpoint ({ckpt}). Pass --resume to continue that run, "
                         f"--overwrite to start a new one in its place, or choose another out_dir=...")
    if resume and not os.path.exists(ckpt):  # e.g. a preemptible job that always passes --resume
        print(f"--resume: no checkpoint {ckpt} yet; starting a new run")
        resume = False
    if resume:
        state = read_checkpoint(ckpt)
        saved = state.get("config")
        if saved is None and os.path.exists(first):  # a checkpoint from before configs were stored in it
            with open(first) as f:
                saved = yaml.safe_load(f)
        run.saved = saved
        retired = tuple(getattr(type(cfg), "RETIRED_KEYS", {}))   # keys older runs recorded that no longer exist
        diffs = differences(saved or {}, new, ignore=RESUME_FREE_KEYS + retired) if saved is not None else []
        if saved is None:
            print(f"note: {ckpt} records no config and {first} is missing; the resume cannot be checked")
        structural = [d for d in diffs if d[0] in STRUCTURAL_KEYS]
        if structural:
            raise SystemExit(f"--resume: {_format(structural)} changes what the checkpoint in {cfg.out_dir} holds; "
                             "even --force cannot continue across it: use the run's value, or start a new run "
                             "(another out_dir, or --overwrite)")
        if diffs and not force:
            raise SystemExit(f"--resume: settings differ from the run in {cfg.out_dir} ({_format(diffs)}). "
                             f"Resume with the run's settings, or pass --force to continue with the new ones "
                             f"(they are written to config.resume_step{state['step']}.yaml; config.yaml keeps the first).")
        if diffs and write:
            print(f"--force: resuming with changed settings: {_format(diffs)}")
            base, n = os.path.join(cfg.out_dir, f"config.resume_step{state['step']}"), 2
            path = base + ".yaml"
            while os.path.exists(path):  # a second --force at the same step: keep the first one's record too
                path, n = f"{base}.{n}.yaml", n + 1
            run.pending.append((new, path))
    if write and (not resume or not os.path.exists(first)):
        run.pending.append((new, first))


def save_yaml(d, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)
