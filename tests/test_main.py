"""main.py end to end on a tiny text-to-image model and the shapes dataset (16x16 images)."""
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

import main as train_main
from ldm.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_LR = 1e-4
BATCH_SIZE = 2
SCHEDULER = {"target": "ldm.lr_scheduler.LambdaLinearScheduler",
             "params": {"warm_up_steps": [2], "cycle_lengths": [10000000000000], "f_start": [1e-6],
                        "f_max": [1.], "f_min": [1.]}}


def run_config(tiny, image_logger=False, **lightning):
    config = tiny.config(cond_stage_trainable=True, use_ema=True, first_stage_key="image", cond_stage_key="caption",
                         ucg_training={"caption": {"p": 0.1, "val": ""}}, scheduler_config=SCHEDULER)
    config["model"]["base_learning_rate"] = BASE_LR
    config["data"] = {"target": "main.DataModuleFromConfig", "params": {
        "batch_size": BATCH_SIZE, "num_workers": 0,
        "train": {"target": "ldm.data.shapes.ShapesTrain", "params": {"size": 16, "length": 8}},
        "validation": {"target": "ldm.data.shapes.ShapesValidation", "params": {"size": 16, "length": 2}}}}
    logger_params = {"batch_frequency": 2, "max_images": 2, "disabled": not image_logger,
                     "log_images_kwargs": {"N": 2, "ddim_steps": 2, "inpaint": False, "plot_diffusion_rows": False,
                                           "unconditional_guidance_scale": 2.0}}
    config["lightning"] = {"trainer": {"log_every_n_steps": 1, "enable_progress_bar": False,
                                       "enable_model_summary": False, "num_sanity_val_steps": 0, **lightning},
                           "callbacks": {"image_logger": {"params": logger_params}}}
    return config


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def adam_step(ckpt):
    return int(next(iter(ckpt["optimizer_states"][0]["state"].values()))["step"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """Train 3 steps (image logger on), then resume the run up to step 5."""
    folder = tmp_path_factory.mktemp("main")
    config = tiny.write_config(run_config(tiny, image_logger=True), folder / "tiny-shapes.yaml")
    logdir = folder / "logs"
    assert train_main.main(["--base", str(config), "-t", "--accelerator", "cpu", "--max_steps", "3",
                            "--logdir", str(logdir), "-n", "first"]) == 0
    runs = list(logdir.iterdir())
    assert len(runs) == 1
    first = load_ckpt(runs[0] / "checkpoints" / "last.ckpt")
    assert train_main.main(["--resume", str(runs[0]), "-t", "--accelerator", "cpu", "--max_steps", "5",
                            "lightning.callbacks.image_logger.params.disabled=true"]) == 0
    return SimpleNamespace(folder=folder, config=config, run=runs[0], first=first,
                           resumed=load_ckpt(runs[0] / "checkpoints" / "last.ckpt"))


def test_run_folder_layout(trained):
    assert trained.run.name.endswith("_first")
    configs = sorted(p.name for p in (trained.run / "configs").iterdir())
    assert sum(name.endswith("-project.yaml") for name in configs) == 2  # the first run and the resume
    assert sum(name.endswith("-lightning.yaml") for name in configs) == 2
    project = OmegaConf.load(trained.run / "configs" / configs[-1])
    assert "lightning" not in project and project.model.base_learning_rate == BASE_LR
    lightning = OmegaConf.load(trained.run / "configs" / [c for c in configs if "lightning" in c][-1])
    assert lightning.lightning.trainer.max_steps == 5  # the CLI flag was merged into the saved config
    images = {p.name.split("_gs-")[0] for p in (trained.run / "images" / "train").iterdir()}
    assert {"inputs", "reconstruction", "conditioning", "samples", "samples_cfg_scale_2.00"} <= images
    assert list((trained.run / "csv").glob("version_*/metrics.csv"))


def test_checkpoint_is_weights_only_loadable_and_holds_training_state(trained):
    ckpt = trained.first
    assert ckpt["global_step"] == 3
    assert any(k.startswith("model_ema.") for k in ckpt["state_dict"])
    assert any(k.startswith("cond_stage_model.") for k in ckpt["state_dict"])
    assert "hyper_parameters" not in ckpt
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 3
    assert adam_step(ckpt) == 3


def test_last_checkpoint_holds_the_final_step_between_validations(tiny, tmp_path):
    config = run_config(tiny, val_check_interval=2, limit_val_batches=1)
    config["data"]["params"]["train"]["params"]["length"] = 16 * BATCH_SIZE  # max_steps ends inside the epoch
    path = tiny.write_config(config, tmp_path / "tiny.yaml")
    assert train_main.main(["--base", str(path), "-t", "--accelerator", "cpu", "--max_steps", "3",
                            "--logdir", str(tmp_path / "logs")]) == 0
    run, = (tmp_path / "logs").iterdir()
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))


def test_scale_lr_is_the_default(trained):
    # accumulate_grad_batches 1 * 1 device * batch size * base_learning_rate
    assert trained.first["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(BATCH_SIZE * BASE_LR)


def test_resume_continues_step_optimizer_schedule_and_ema(trained):
    ckpt = trained.resumed
    assert ckpt["global_step"] == 5
    assert adam_step(ckpt) == 5  # the optimizer state was restored, not rebuilt
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 5
    assert int(ckpt["state_dict"]["model_ema.num_updates"]) == 5
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(ckpt["state_dict"][key], trained.first["state_dict"][key])


def test_export_weights_copies_ema_into_the_model(trained, tiny, tmp_path):
    from safetensors.torch import load_file
    from ldm.checkpoint import load_model
    from ldm.export import export_weights
    out = tmp_path / "model.safetensors"
    summary = export_weights(trained.run / "checkpoints" / "last.ckpt", out)
    sd = load_file(str(out))
    source = trained.resumed["state_dict"]
    assert summary["ema_copied"] > 0 and not any(k.startswith("model_ema.") for k in sd)
    ema = source["model_ema.diffusion_modelout2weight"]
    assert torch.equal(sd["model.diffusion_model.out.2.weight"], ema)
    assert not torch.equal(ema, source["model.diffusion_model.out.2.weight"])
    assert torch.equal(sd["cond_stage_model.ln_final.weight"], source["cond_stage_model.ln_final.weight"])
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    inference = run_config(tiny)
    inference["model"]["params"]["use_ema"] = False
    load_model(tiny.write_config(inference, tmp_path / "inference.yaml"), out, device="cpu")  # strict
    half = export_weights(trained.run / "checkpoints" / "last.ckpt", tmp_path / "half.safetensors", half=True)
    assert half["dtype"] == "float16"


def test_export_script(trained, tmp_path, scripts):
    module = scripts.load("export_weights")
    assert module.main([str(trained.run / "checkpoints" / "last.ckpt"), str(tmp_path / "a.safetensors"),
                        "--no-ema"]) == 0
    assert module.main([str(tmp_path / "missing.ckpt"), str(tmp_path / "b.safetensors")]) == 2


def test_autoencoder_trains_and_resumes_both_optimizers(tiny, tmp_path):
    config = run_config(tiny)
    vae = tiny.config()["model"]["params"]["first_stage_config"]
    vae["params"]["lossconfig"] = {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                                   "params": {"disc_start": 1, "perceptual_weight": 0.0, "disc_num_layers": 2}}
    vae["params"]["monitor"] = "val/rec_loss"
    config["model"] = dict(vae, base_learning_rate=1e-5)
    path = tiny.write_config(config, tmp_path / "vae.yaml")
    logs = tmp_path / "logs"
    assert train_main.main(["--base", str(path), "-t", "--accelerator", "cpu", "--max_steps", "2",
                            "--logdir", str(logs)]) == 0
    (run,) = logs.iterdir()
    assert train_main.main(["--resume", str(run), "-t", "--accelerator", "cpu", "--max_steps", "3"]) == 0
    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3  # batches
    steps = [int(next(iter(state["state"].values()))["step"]) for state in ckpt["optimizer_states"]]
    # the discriminator waits for disc_start=1, so it skipped batch 0; a discriminator
    # that resumed from scratch would report 1
    assert steps == [3, 2]
    assert any(k.startswith("loss.discriminator.") for k in ckpt["state_dict"])


def test_set_learning_rate_formula(caplog):
    config = OmegaConf.create({"model": {"base_learning_rate": 2e-6}, "data": {"params": {"batch_size": 3}}})
    model = SimpleNamespace()
    trainer = SimpleNamespace(num_devices=2, num_nodes=1)
    with caplog.at_level("INFO", logger="main"):
        train_main.set_learning_rate(model, config, trainer, {"accumulate_grad_batches": 4}, scale_lr=True)
    assert model.learning_rate == pytest.approx(4 * 2 * 3 * 2e-6)
    assert "4 (accumulate_grad_batches) * 2 (num_devices) * 3 (batchsize)" in caplog.text
    train_main.set_learning_rate(model, config, trainer, {}, scale_lr=False)
    assert model.learning_rate == 2e-6


class InterruptAt(pl.Callback):
    """Interrupts training after ``step`` optimizer steps, the way a user or a cluster would."""

    def __init__(self, step, how):
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.how in ("sigterm", "sigusr1"):
                os.kill(os.getpid(), getattr(signal, self.how.upper()))
            else:
                raise KeyboardInterrupt


@pytest.mark.parametrize("how,code", [("sigterm", 143), ("keyboard", 130)])
def test_interruption_saves_last_checkpoint(tiny, tmp_path, how, code):
    config = run_config(tiny)
    config["lightning"]["callbacks"]["interrupt"] = {"target": "test_main.InterruptAt",
                                                     "params": {"step": 2, "how": how}}
    path = tiny.write_config(config, tmp_path / "interrupted.yaml")
    handler = signal.getsignal(signal.SIGINT)
    assert train_main.main(["--base", str(path), "-t", "--accelerator", "cpu", "--max_steps", "50",
                            "--logdir", str(tmp_path / "logs"), "--trust-config"]) == code
    assert signal.getsignal(signal.SIGINT) is handler
    (run,) = (tmp_path / "logs").iterdir()
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_sigusr1_saves_a_checkpoint_and_training_goes_on(tiny, tmp_path, caplog):
    config = run_config(tiny)
    config["lightning"]["callbacks"]["interrupt"] = {"target": "test_main.InterruptAt",
                                                     "params": {"step": 1, "how": "sigusr1"}}
    path = tiny.write_config(config, tmp_path / "usr1.yaml")
    with caplog.at_level("INFO", logger="ldm.callbacks"):
        assert train_main.main(["--base", str(path), "-t", "--accelerator", "cpu", "--max_steps", "3",
                                "--logdir", str(tmp_path / "logs"), "--trust-config"]) == 0  # test_main.*
    assert "last.ckpt at global step 2" in caplog.text  # written after the batch that followed the signal
    (run,) = (tmp_path / "logs").iterdir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # overwritten, not versioned
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 3


@pytest.mark.parametrize("args,message", [
    (["--base", "missing.yaml", "-t"], "does not exist"),
    (["-t"], "no config"),
    (["--base", "{config}", "-t", "--bogus"], "unrecognized argument '--bogus'"),
    (["--base", "{config}", "-t", "model.params=[1"], "bad config override"),
    (["--base", "{config}", "-t", "model.target=ldm.nowhere.Model"], "cannot import module 'ldm.nowhere'"),
    (["--base", "{config}", "-t", "lightning.trainer.gpuz=1"], "gpuz"),
    (["--resume", "{folder}", "-n", "x"], "cannot be used together"),
])
def test_user_errors_are_one_line_and_exit_2(tiny, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    config = tiny.write_config(run_config(tiny), tmp_path / "c.yaml")
    args = [a.format(config=config, folder=tmp_path) for a in args]
    assert train_main.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.ckpt"))


def test_resume_from_a_missing_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train_main.resolve_run(SimpleNamespace(resume=str(tmp_path / "nope"), base=[]), "now")


def test_resume_from_a_checkpoint_file_reuses_its_run(tmp_path):
    run = tmp_path / "logs" / "2026-01-01T00-00-00_x"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    (run / "configs" / "2026-01-01T00-00-00-project.yaml").write_text("model: {}\n")
    (run / "checkpoints" / "epoch=000001.ckpt").write_bytes(b"")
    opt = SimpleNamespace(resume=str(run / "checkpoints" / "epoch=000001.ckpt"), base=["extra.yaml"])
    logdir, ckpt, name = train_main.resolve_run(opt, "now")
    assert logdir == run and ckpt == run / "checkpoints" / "epoch=000001.ckpt" and name == run.name
    assert opt.base == [str(run / "configs" / "2026-01-01T00-00-00-project.yaml"), "extra.yaml"]
    with pytest.raises(UserError, match="last.ckpt"):
        train_main.resolve_run(SimpleNamespace(resume=str(run), base=[]), "now")


def test_trainer_flags_override_the_config():
    lightning = OmegaConf.create({"trainer": {"max_steps": 10, "gpus": "0,", "benchmark": True}})
    opt, _ = train_main.parse_args(["--base", "x.yaml", "-t", "--max_steps", "20", "--limit_val_batches", "4",
                                    "--val_check_interval", "0.5"])
    kwargs = train_main.trainer_config_from(opt, lightning)
    assert kwargs == {"max_steps": 20, "limit_val_batches": 4, "val_check_interval": 0.5, "benchmark": True,
                      "accelerator": "gpu", "devices": [0]}  # legacy gpus: "0," -> accelerator + devices
    assert lightning.trainer.max_steps == 20  # saved with the run's lightning config
    opt, _ = train_main.parse_args(["--base", "x.yaml", "-t", "--devices", "2", "--accelerator", "cpu"])
    assert train_main.trainer_config_from(opt, OmegaConf.create()) == {"devices": 2, "accelerator": "cpu"}
    opt, unknown = train_main.parse_args(["--base", "x.yaml", "-t", "model.params.x=1", "--scale_lr", "false"])
    assert opt.train is True and opt.scale_lr is False and unknown == ["model.params.x=1"]


def test_monitor_without_ema_drops_the_suffix():
    assert train_main.checkpoint_monitor(SimpleNamespace(monitor="val/loss_simple_ema", use_ema=False)) == \
        "val/loss_simple"
    assert train_main.checkpoint_monitor(SimpleNamespace(monitor="val/loss_simple_ema", use_ema=True)) == \
        "val/loss_simple_ema"
    assert train_main.checkpoint_monitor(SimpleNamespace()) is None


def test_datamodule_builds_only_the_configured_splits():
    from pytorch_lightning.utilities.model_helpers import is_overridden
    train = {"target": "ldm.data.shapes.ShapesTrain", "params": {"size": 16, "length": 4}}
    data = train_main.DataModuleFromConfig(batch_size=2, train=train, wrap=True, num_workers=0)
    assert data.num_workers == 0 and not is_overridden("val_dataloader", data)
    data.setup()
    assert isinstance(data.datasets["train"], train_main.WrappedDataset)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 16, 16, 3) and len(batch["caption"]) == 2
    with_val = train_main.DataModuleFromConfig(batch_size=2, train=train, validation=train)
    assert with_val.num_workers == 4 and is_overridden("val_dataloader", with_val)
    with pytest.raises(UserError, match="batch_size"):
        train_main.DataModuleFromConfig(batch_size=0, train=train)


def test_ddp_on_two_cpu_processes(tiny, tmp_path):
    config = tiny.write_config(run_config(tiny), tmp_path / "ddp.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), "--base", str(config), "-t",
                             "--accelerator", "cpu", "--strategy", "ddp", "--devices", "2", "--max_steps", "2",
                             "--logdir", str(tmp_path / "logs")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "logs").iterdir()  # both ranks used one run folder
    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    # the learning rate scales with the number of processes
    assert ckpt["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(2 * BATCH_SIZE * BASE_LR)


def test_resume_without_train_warns_that_nothing_is_trained(caplog):
    with caplog.at_level(logging.WARNING, logger="main"):
        train_main.parse_args(["--resume", "logs/some-run"])
    assert "--resume without -t trains nothing" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="main"):
        train_main.parse_args(["--resume", "logs/some-run", "-t"])
    assert "trains nothing" not in caplog.text
