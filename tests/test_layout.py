"""The package layering (ARCHITECTURE.md "Layout"): every import runs downward, and the core never imports plumbing.

Ranks (an import may only name a module of the same or a LOWER rank):
  0 model         ldm/*.py               tokenizer, text encoder, attention, UNet, VAE, schedulers, sampling, Pipeline
  1 weights       ldm/weights/           safe file reading, renaming rules, foreign configs, the converted folder
  2 method        grounding/*.py         anatomy LUT, geometry, prompts, attention store, losses, training step,
                                         heatmaps, metrics
  3 data          grounding/data/        image reading, dataset readers, reports, weak supervision
  4 phantom       grounding/phantom/     the synthetic world and the pretraining of its tiny LDM
  5 experiment    grounding/experiment/  settings and config files, data sources, evaluation runs, provenance
  6 entry points  train.py, evaluate.py, convert_weights.py, sample.py, classify.py, ground.py, tour.py, scripts/,
                  benchmarks/
The core (ranks 0 and 2) imports no plumbing (1, 3, 4, 5). The one exception: ldm/__init__.py re-exports
`load_pipeline` / `save_pipeline` from ldm.weights.folder LAZILY (on first use), because `from ldm import
load_pipeline` is the documented public interface.
"""
import ast
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ("train", "evaluate", "convert_weights", "sample", "classify", "ground", "tour", "benchmarks",
                "scripts")
ALLOWED = {("ldm/__init__.py", "ldm.weights.folder"), ("ldm/__init__.py", "ldm.weights")}


def rank_of_module(m):
    parts = m.split(".")
    if parts[0] == "ldm":
        return 1 if len(parts) > 1 and parts[1] == "weights" else 0
    if parts[0] == "grounding":
        sub = parts[1] if len(parts) > 1 else ""
        return {"data": 3, "phantom": 4, "experiment": 5}.get(sub, 2)
    if parts[0] in ENTRY_POINTS:
        return 6
    return None  # stdlib, third party, tests


def upward_imports():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    bad = []
    for f in files:
        if f.startswith("tests/") or not os.path.exists(os.path.join(REPO, f)):
            continue
        m = f[:-3].replace("/", ".")
        r = rank_of_module(m[:-len(".__init__")] if m.endswith(".__init__") else m)
        if r is None:
            continue
        with open(os.path.join(REPO, f)) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):   # lazy imports inside functions count too
            mods = []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            for name in mods:
                t = rank_of_module(name)
                if t is None or (f, name) in ALLOWED:
                    continue
                if t > r or (r in (0, 2) and t in (1, 3, 4, 5)):
                    bad.append(f"{f}:{node.lineno}: rank {r} imports {name} (rank {t})")
    return sorted(set(bad))


def import_graph():
    """{module: {repo modules it imports}} over the repo's own files (lazy imports inside functions included; tests
    left out). `from pkg import name` counts as importing pkg.name when that is a module file, else pkg."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    files = [f for f in files if not f.startswith("tests/") and os.path.exists(os.path.join(REPO, f))]
    mod = lambda f: f[:-3].replace("/", ".").removesuffix(".__init__")
    modules = {mod(f): f for f in files}
    graph = {}
    for m, f in modules.items():
        with open(os.path.join(REPO, f)) as fh:
            tree = ast.parse(fh.read())
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                        for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
        graph[m] = {t for t in out if t in modules and t != m}
    return graph


def import_cycles(graph):
    """Every cycle of the graph, each as a list of modules (depth-first search, one report per cycle)."""
    cycles, state = [], {}
    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycles():
    """Files can be read (and loaded) in one order: no file imports, even lazily, a file that imports it back.
    The one exception: ldm/__init__.py's lazy re-export of load_pipeline (see the module docstring)."""
    graph = import_graph()
    graph["ldm"] -= {"ldm.weights.folder", "ldm.weights"}
    assert not import_cycles(graph), import_cycles(graph)
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_every_import_runs_downward():
    bad = upward_imports()
    assert not bad, "imports that run upward:\n" + "\n".join(bad)


def test_the_rank_rules_themselves():
    assert rank_of_module("ldm.unet") == 0 and rank_of_module("ldm.weights.folder") == 1
    assert rank_of_module("grounding.heatmap") == 2 and rank_of_module("grounding.data.readers") == 3
    assert rank_of_module("grounding.phantom.world") == 4 and rank_of_module("grounding.experiment.sources") == 5
    assert rank_of_module("train") == 6 and rank_of_module("torch") is None


def part_lines(path):
    """{name: lines} of a file's parts a reading guide can name: "docstring", every top-level function, class and
    assigned name, and Class.method; each from its first decorator to its last line."""
    tree = ast.parse(open(os.path.join(REPO, path), encoding="utf-8").read())
    parts = {}
    for node in tree.body:
        span = node.end_lineno - min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno]) + 1
        if node is tree.body[0] and isinstance(node, ast.Expr):
            parts["docstring"] = span
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            parts[node.name] = span
        if isinstance(node, ast.Assign):
            parts.update({t.id: span for t in node.targets if isinstance(t, ast.Name)})
        for m in node.body if isinstance(node, ast.ClassDef) else []:
            if isinstance(m, ast.FunctionDef):
                parts[f"{node.name}.{m.name}"] = m.end_lineno - min([d.lineno for d in m.decorator_list] + [m.lineno]) + 1
    return parts


def file_lines(path):
    return len(open(os.path.join(REPO, path), encoding="utf-8").read().splitlines())


def test_reading_guide_lists_the_whole_core_with_its_line_counts():
    """README "Reading guide": the method chapter (the parts of each file to read first, in the tour's order) and the
    LDM reference chapters cover every model and method file; every count is within a few lines of the code (so the
    guide cannot go stale unnoticed), every name it gives exists, and the method chapter stays about 900 lines."""
    import re
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    guide = readme[readme.index("## Reading guide"):readme.index("## Where the paper is silent")]
    method_part, ldm_part = guide.split("**3. The LDM")
    row = re.compile(r"^\| \d+ \| `([^`]+)` \((\d+)\) \|([^|]*)\|([^|]*)\|$", re.M)
    method, ldm = row.findall(method_part), row.findall(ldm_part)
    assert len(method) >= 8 and len(ldm) >= 6, (method, ldm)
    stale = {p: (int(n), file_lines(p)) for p, n, _, _ in method + ldm if abs(int(n) - file_lines(p)) > 5}
    assert not stale, f"README reading guide: (listed, actual) file line counts differ: {stale}"
    total = 0
    method = [(p, n, read.strip(), skip.strip()) for p, n, read, skip in method]
    for path, _, read, skip in method:
        parts = part_lines(path)
        listed = int(re.search(r"\((\d+)\)", read).group(1))
        names = [n for n in re.findall(r"`([\w.]+)`", read.split(f"({listed})")[0])]
        if "whole file" in read:
            counted = file_lines(path)
        else:
            unknown = [n for n in names if n not in parts]
            assert not unknown, f"{path}: the guide names {unknown}, which the file does not define"
            counted = sum(parts[n] for n in names) + (parts["docstring"] if read.startswith("docstring") else 0)
        assert abs(listed - counted) <= 5, f"{path}: the guide says {listed} lines to read, the parts have {counted}"
        total += counted
    for path, _, read, skip in method + ldm:         # what a row tells you to read or skip exists
        short = {n.split(".")[-1] for n in part_lines(path)} | set(part_lines(path))
        unknown = [n for n in re.findall(r"`([\w.]+)`", read + skip) if n not in short and not n.endswith(".py")]
        assert not unknown, f"{path}: the guide names {unknown}, which the file does not define"
    m = re.search(r"([\d,]+) lines to read first", method_part)
    assert m and abs(int(m.group(1).replace(",", "")) - total) <= 20, (m and m.group(0), total)
    assert total <= 950, f"the method chapter grew to {total} lines (about 900 at most)"
    m = re.search(r"reference chapters\*\* \(([\d,]+) lines\)", ldm_part)
    assert m and abs(int(m.group(1).replace(",", "")) - sum(file_lines(p) for p, *_ in ldm)) <= 20, m
    core = {f"{d}/{n}" for d in ("ldm", "grounding") for n in os.listdir(os.path.join(REPO, d))
            if n.endswith(".py") and n != "__init__.py"}
    beside = {"ldm/sampling.py", "grounding/precision.py", "grounding/auroc.py"}   # named in the text after it
    listed = {p for p, *_ in method + ldm}
    assert core - beside == listed, f"in a chapter but not core, or core but in no chapter: {core - beside ^ listed}"
