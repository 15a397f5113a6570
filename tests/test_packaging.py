"""A fresh Python (setuptools 65.5, no ``wheel``) must be able to install the project as CI and
the README do: the build backend is declared, and pip is left to build in isolation."""
import ast
import re
import tomllib
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parent.parent


def test_build_backend_is_declared_with_wheel():
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    requires = {re.split(r"[<>=!~ ]", r, maxsplit=1)[0] for r in build["requires"]}
    assert {"setuptools", "wheel"} <= requires
    assert build["build-backend"] == "setuptools.build_meta"


def test_ci_installs_with_build_isolation():
    # --no-build-isolation builds with whatever setuptools/wheel the machine has: none on a new one
    for script in (".ci/run", ".ci/install-browser"):
        assert "--no-build-isolation" not in (REPO / script).read_text(), script


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    command = re.search(r'pip install -e "\.\[test\]" && (python -m pytest[^\n]*)', readme).group(1)
    assert command in (REPO / ".ci" / "run").read_text()


def test_every_top_level_package_is_installed():
    """``cldm`` (ControlNet's import path, which its configs name) ships beside ``ldm``."""
    calls = [node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "find_packages"]
    include = ast.literal_eval(next(kw.value for kw in calls[0].keywords if kw.arg == "include"))
    installed = set(find_packages(where=str(REPO), include=include))
    top_level = {path.parent.name for path in REPO.glob("*/__init__.py")}
    assert {"ldm", "cldm"} <= top_level <= installed
    assert "cldm" in installed and "ldm.models.diffusion" in installed
