"""pyproject.toml (`pip install -e .`): every package of the checkout is installed, with requirements.txt's
run-time dependencies (torch pinned the same way)."""
import os

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_package_directory_is_installed():
    """A subpackage left off the list imports from the checkout but not from an install: a script outside the
    checkout would fail on `import grounding.<new>`. Every folder under ldm/ and grounding/ that holds Python files
    must be a package (an __init__.py) and be listed."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found, loose = set(), []
    for top in ("ldm", "grounding"):
        for folder, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if not any(f.endswith(".py") for f in files):
                continue
            name = os.path.relpath(folder, REPO).replace(os.sep, ".")
            if "__init__.py" in files:
                found.add(name)
            else:
                loose.append(name)
    assert not loose, f"folders with Python files but no __init__.py (not packages): {loose}"
    assert found == listed, f"not listed in pyproject.toml: {sorted(found - listed)}; listed, not found: " \
                            f"{sorted(listed - found)}"


def test_dependencies_are_the_quickstarts():
    with open(os.path.join(REPO, "requirements.txt")) as f:
        reqs = {line.split("#")[0].strip() for line in f} - {""}
    assert set(_pyproject()["project"]["dependencies"]) == reqs
    assert any(r.startswith("torch==") for r in reqs)   # pinned: an unpinned torch may pull a multi-GB CUDA build
