"""ldm.export and scripts/export_weights.py on the tiny checkpoint: an existing target is never
replaced unless asked, and the written file has the permissions of any new file.
(EMA copying on a trained checkpoint is tested in test_main.py.)"""
import hashlib
import os
import stat
from contextlib import contextmanager

import pytest
from safetensors import safe_open

from ldm.errors import UserError
from ldm.export import export_weights


@contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def target(tmp_path):
    """An existing file where the export would go."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"earlier export")
    return path


def test_existing_target_is_refused_and_kept(tiny_files, target):
    with pytest.raises(UserError, match="already exists; pass overwrite=True") as refused:
        export_weights(tiny_files.ckpt, target)
    assert "--force" not in str(refused.value)            # the library speaks of its own arguments
    assert target.read_bytes() == b"earlier export"
    export_weights(tiny_files.ckpt, target, overwrite=True)
    with safe_open(str(target), "pt") as f:
        assert len(list(f.keys())) == len(tiny_files.state_dict)


def test_metadata_names_the_source_and_its_sha256(tiny_files, tmp_path):
    export_weights(tiny_files.ckpt, tmp_path / "model.safetensors")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["source"] == tiny_files.ckpt.name
    assert metadata["source_sha256"] == hashlib.sha256(tiny_files.ckpt.read_bytes()).hexdigest()


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)],
                         ids=["umask022", "umask027", "umask002"])
def test_written_file_follows_the_umask(tiny_files, tmp_path, mask, expected):
    with umask(mask):
        export_weights(tiny_files.ckpt, tmp_path / "model.safetensors")
    assert mode(tmp_path / "model.safetensors") == expected


def test_script_refuses_an_existing_target_unless_forced(scripts, tiny_files, target, capsys):
    export = scripts.load("export_weights")
    assert export.main([str(tiny_files.ckpt), str(target)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: '{target}' already exists; pass --force to replace it"]
    assert target.read_bytes() == b"earlier export"
    with umask(0o022):
        assert export.main([str(tiny_files.ckpt), str(target), "--force", "--half"]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    assert mode(target) == 0o644
    with safe_open(str(target), "pt") as f:
        assert f.metadata()["dtype"] == "float16"
