"""The code and the tests run from a plain clone anywhere: no string in them names a folder of the
machine they were written on (data the tests need is in tests/data; the shared reference beside the
repo is found relative to it, and optional)."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE = [REPO / "main.py", *sorted(p for folder in ("ldm", "cldm", "scripts", "bench", "tests")
                                  for p in (REPO / folder).rglob("*.py"))]
# Absolute paths that mean the same on every Linux machine.
SYSTEM_ROOTS = ("usr", "bin", "proc", "dev", "etc", "sys", "tmp")
ABSOLUTE_PATH = re.compile(r"^/([\w.-]+)/[\w.-]")


def is_machine_folder(root):
    """A top-level folder of this machine that is not a system one (e.g. where the repo was written)."""
    return root not in SYSTEM_ROOTS and Path("/", root).is_dir()


def machine_paths(source, is_machine_root=is_machine_folder):
    """(line, text) of the string constants in ``source`` that are absolute paths into a top-level
    folder for which ``is_machine_root`` holds (a zip member name like "/data/0" does not count
    unless /data is a folder here)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = ABSOLUTE_PATH.match(node.value)
            if match and is_machine_root(match.group(1)):
                found.append((node.lineno, node.value))
    return found


def test_the_check_sees_a_machine_path():
    def here(root):
        return root in ("work", "usr")
    found = machine_paths('x = 1\nMANIFESTS = Path("/work/shared/reference/manifests")', here)
    assert len(found) == 1 and found[0][0] == 2 and found[0][1].endswith("shared/reference/manifests")
    assert machine_paths('member = "/data/0"; key = "val/loss"; name = "/loss"', here) == []
    assert not is_machine_folder("usr") and not is_machine_folder("no-such-folder-at-the-root")


def test_no_machine_paths_in_code():
    found = {str(path.relative_to(REPO)): machine_paths(path.read_text()) for path in CODE}
    assert {name: paths for name, paths in found.items() if paths} == {}
