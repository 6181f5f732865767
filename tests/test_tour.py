"""tour.py, the runnable front door: it runs (fast mode), every `file:function` it cites exists, and the committed
docs/tour.md is its own output.

What "its own output" means here: docs/tour.md is written by `python tour.py` (full mode); a fresh fast run writes
the same page except inside the output blocks (the printed values: fewer steps in fast mode, and float noise between
machines) and the figures. So the test compares everything else (every prose cell and every code cell, in order)
with the committed page: an edit of tour.py that is not followed by `python tour.py` fails here.
"""
import ast
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITATION = re.compile(r"\b((?:[\w]+/)*\w+\.py):([A-Za-z_][\w.]*[A-Za-z_\d])")


def defined_names(path):
    """Every function and class of a file, methods as Class.method."""
    tree = ast.parse(open(os.path.join(REPO, path), encoding="utf-8").read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{m.name}" for m in node.body if isinstance(m, ast.FunctionDef)}
    return names


def skeleton(page):
    """The page's lines with each output block (a ``` block that is not ```python) cut down to one marker, and
    without figure and blank lines."""
    kept, fence = [], None                             # fence: the opening line of the block we are in
    for line in page.splitlines():
        if fence is None and line.startswith("```"):
            fence = line
            if fence == "```":                         # an output block: where it stands counts, not its text
                kept.append("<output>")
                continue
        elif fence is not None and line == "```":
            closing, fence = fence, None
            if closing == "```":
                continue
        elif fence == "```":
            continue
        if line.strip() and not line.startswith(("![", "*")):
            kept.append(line)
    return kept


def test_every_cited_function_exists():
    text = open(os.path.join(REPO, "tour.py"), encoding="utf-8").read()
    cited = set(CITATION.findall(text))
    assert len(cited) >= 20, cited                     # every cell cites what it calls
    missing = [f"{f}:{name}" for f, name in sorted(cited)
               if not os.path.exists(os.path.join(REPO, f)) or name not in defined_names(f)]
    assert not missing, f"tour.py cites what does not exist: {missing}"
    assert CITATION.findall("see grounding/x.py:Foo.bar and train.py:tune.") == [("grounding/x.py", "Foo.bar"),
                                                                                  ("train.py", "tune")]


def test_tour_runs_and_the_committed_page_is_its_output(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "tour.py", "--fast", "--out", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    fresh = (tmp_path / "tour.md").read_text(encoding="utf-8")
    committed = open(os.path.join(REPO, "docs", "tour.md"), encoding="utf-8").read()
    for page in (fresh, committed):                    # every figure the page shows is there
        for name in re.findall(r"\]\(tour/([\w.]+\.png)\)", page):
            folder = tmp_path if page is fresh else os.path.join(REPO, "docs")
            assert os.path.exists(os.path.join(folder, "tour", name)), name
    assert len(re.findall(r"\]\(tour/", fresh)) == 4 and "maps (7, 2, 1, 256, 3)" in fresh
    assert skeleton(fresh) == skeleton(committed), "docs/tour.md is stale: run `python tour.py`"
    assert skeleton("a\n```python\nx = 1\n```\n```\n0.123\n```\n![f](tour/f.png)\n") == \
        ["a", "```python", "x = 1", "```", "<output>"]
