"""Configs are code: only trusted modules' targets are built unless the config is trusted.

Every refusal is checked with a target that would create a folder if it ran.
"""
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import main as train_main
from ldm import util
from ldm.checkpoint import load_config, load_model
from ldm.config_safety import (UntrustedConfigError, check_config_targets, check_target,
                               trusting_configs)
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import get_obj_from_str, instantiate_from_config

REPO_ROOT = Path(__file__).resolve().parent.parent


class UnlistedLatentDiffusion(LatentDiffusion):
    """A legitimate model class outside the trusted modules (this test module)."""


def mkdir_target(marker):
    """A config node that would create the folder ``marker`` if built."""
    return {"target": "os.mkdir", "params": {"path": str(marker)}}


def touch_target(marker, name="subprocess.run"):
    return {"target": name, "params": {"args": ["touch", str(marker)]}}


def one_line(err):
    assert "\n" not in str(err)
    return str(err)


# ------------------------------------------------------------------------------ the library

def test_instantiate_refuses_a_foreign_target(tmp_path):
    marker = tmp_path / "ran"
    for node in (touch_target(marker), mkdir_target(marker)):
        with pytest.raises(UntrustedConfigError) as err:
            instantiate_from_config(OmegaConf.create(node))
        message = one_line(err.value)
        assert f"config target '{node['target']}'" in message and "trust_config=True" in message
    assert not marker.exists()


def test_a_foreign_module_is_not_even_imported(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "module_with_side_effects.py").write_text(
        f"import os\nos.mkdir({str(marker)!r})\nclass Model:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UntrustedConfigError, match="'module_with_side_effects.Model'"):
        instantiate_from_config({"target": "module_with_side_effects.Model"})
    assert not marker.exists()


def test_instantiate_refuses_foreign_objects_behind_a_trusted_path(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    # a trusted module that imported subprocess.run under another name
    monkeypatch.setattr(util, "run_command", subprocess.run, raising=False)
    with pytest.raises(UntrustedConfigError, match="'ldm.util.run_command' is defined in "
                                                   "'subprocess', outside the trusted"):
        instantiate_from_config(touch_target(marker, "ldm.util.run_command"))
    assert not marker.exists()
    with pytest.raises(UntrustedConfigError, match="'ldm.checkpoint.Path' is defined in 'pathlib"):
        instantiate_from_config({"target": "ldm.checkpoint.Path"})
    with pytest.raises(UntrustedConfigError, match="'ldm.util.importlib' is a module, not a class"):
        instantiate_from_config({"target": "ldm.util.importlib"})
    # main.* paths are allowed only for the ldm classes main.py re-exports
    check_target("main.ImageLogger", get_obj_from_str("main.ImageLogger"))
    with pytest.raises(UntrustedConfigError, match="'main.main' is defined in 'main'"):
        instantiate_from_config({"target": "main.main", "params": {"argv": ["--help"]}})


def test_nested_configs_are_checked_when_built(tiny, tmp_path):
    """No pre-check here: the model constructor's own instantiate_from_config must refuse."""
    marker = tmp_path / "ran"
    config = tiny.config(cond_stage_config=touch_target(marker))
    with pytest.raises(UntrustedConfigError, match="'subprocess.run'"):
        instantiate_from_config(OmegaConf.create(config).model)
    assert not marker.exists()


def test_a_config_cannot_trust_itself(tiny_files, tmp_path):
    marker = tmp_path / "ran"
    inner = tmp_path / "inner-evil.yaml"
    OmegaConf.save(OmegaConf.create({"model": touch_target(marker)}), inner)
    outer = {"target": "ldm.checkpoint.load_model",
             "params": {"config_path": str(inner), "ckpt_path": str(tiny_files.ckpt),
                        "trust_config": True}}
    with pytest.raises(UntrustedConfigError, match="asked to trust another config"):
        instantiate_from_config(outer)
    assert not marker.exists()


def test_trusting_configs_builds_any_target(tiny):
    config = OmegaConf.create(tiny.config())
    config.model.target = f"{__name__}.UnlistedLatentDiffusion"
    with pytest.raises(UntrustedConfigError):
        instantiate_from_config(config.model)
    with trusting_configs():
        assert isinstance(instantiate_from_config(config.model), UnlistedLatentDiffusion)
    with trusting_configs(False), pytest.raises(UntrustedConfigError):
        instantiate_from_config(config.model)


def test_whole_tree_is_checked_before_anything_is_built(tiny, tiny_files, tmp_path):
    marker = tmp_path / "ran"
    config = tiny.config(first_stage_config=touch_target(marker))
    path = tiny.write_config(config, tmp_path / "nested.yaml")
    with pytest.raises(UntrustedConfigError, match=r"'subprocess.run' at "
                                                   r"model.params.first_stage_config.target of "):
        load_config(path)
    with pytest.raises(UntrustedConfigError, match="at data.params.train.target"):
        check_config_targets({"data": {"params": {"train": mkdir_target(marker)}}})
    with pytest.raises(UntrustedConfigError, match=r"at lightning.callbacks\[0\].target"):
        check_config_targets({"lightning": {"callbacks": [mkdir_target(marker)]}})
    assert not marker.exists()
    assert load_config(path, trust_config=True).model.params.first_stage_config.target == \
        "subprocess.run"


def test_load_model_refuses_before_reading_the_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    OmegaConf.save(OmegaConf.create({"model": touch_target(marker)}), path)
    # the checkpoint is never opened: a missing one would be the first error otherwise
    with pytest.raises(UntrustedConfigError, match="trust_config=True"):
        load_model(path, tmp_path / "absent.ckpt", device="cpu")
    assert not marker.exists()


def shipped_targets():
    """(file, target) for every target of the configs this repo ships."""
    pairs = []
    for folder in ("configs", "models"):
        for path in sorted((REPO_ROOT / folder).rglob("*.yaml")):
            pairs += [(path.relative_to(REPO_ROOT), line.split("target:", 1)[1].strip())
                      for line in path.read_text().splitlines()
                      if line.strip().startswith("target:")]
    return pairs


def test_every_shipped_config_is_trusted():
    pairs = shipped_targets()
    assert len(pairs) > 50
    for path in {p for p, _ in pairs}:
        check_config_targets(OmegaConf.load(REPO_ROOT / path), source=path)
    for target in sorted({t for _, t in pairs}):
        try:
            obj = get_obj_from_str(target)
        except ImportError:  # an optional dependency missing here: the name check above holds
            continue
        check_target(target, obj)


# ------------------------------------------------------------------------------ the command lines

def evil_config(folder, marker, **sections):
    path = folder / "evil.yaml"
    OmegaConf.save(OmegaConf.create({"model": touch_target(marker), **sections}), path)
    return path


def test_txt2img_refuses_an_untrusted_config(scripts, tmp_path, capsys):
    marker = tmp_path / "ran"
    save_file({"w": torch.ones(1)}, tmp_path / "one.safetensors")
    txt2img = scripts.load("txt2img")
    assert txt2img.main(["--config", str(evil_config(tmp_path, marker)),
                         "--ckpt", str(tmp_path / "one.safetensors"), "--device", "cpu",
                         "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: config target 'subprocess.run'"), err
    assert err[0].endswith("; pass --trust-config if you trust this config")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_txt2img_trust_config_lets_a_legitimate_target_through(scripts, tiny, tiny_files, tmp_path,
                                                               capsys):
    config = tiny.config()
    config["model"]["target"] = f"{__name__}.UnlistedLatentDiffusion"
    path = tiny.write_config(config, tmp_path / "own-class.yaml")
    txt2img = scripts.load("txt2img")
    common = ["--config", str(path), "--ckpt", str(tiny_files.ckpt), "--device", "cpu", "--steps",
              "2", "--n_samples", "1", "--outdir", str(tmp_path / "out")]
    assert txt2img.main(common) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"'{__name__}.UnlistedLatentDiffusion'" in err[0], err
    assert txt2img.main([*common, "--trust-config"]) == 0
    assert len(list((tmp_path / "out" / "samples").iterdir())) == 1


def test_main_refuses_an_untrusted_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    data = {"target": "main.DataModuleFromConfig",
            "params": {"batch_size": 1, "train": mkdir_target(marker)}}
    path = evil_config(tmp_path, marker, data=data)
    assert train_main.main(["--base", str(path), "-t", "--accelerator", "cpu"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: config target 'subprocess.run' at model.target")
    assert err[0].endswith("; pass --trust-config if you trust this config")
    # overrides are part of the config too
    trusted_model = "model.target=ldm.models.diffusion.ddpm.LatentDiffusion"
    assert train_main.main(["--base", str(path), "-t", trusted_model]) == 2
    assert "'os.mkdir' at data.params.train.target" in capsys.readouterr().err
    assert train_main.main(["--base", str(path), "-t", trusted_model, "data.params.train=null",
                            "lightning.callbacks.x.target=os.mkdir"]) == 2
    assert "'os.mkdir' at lightning.callbacks.x.target" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "logs").exists()


def test_web_demos_take_the_flag_their_error_names():
    import importlib.util
    spec = importlib.util.spec_from_file_location("webui_for_trust_test",
                                                  REPO_ROOT / "scripts" / "gradio" / "webui.py")
    webui = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(webui)
    assert webui.parse_args("demo", ["--trust-config"]).trust_config is True
    assert webui.parse_args("demo", []).trust_config is False
