"""Adapter trainings through main.py on the tiny model, as the personalisation tests run them: the config of a
run on ShapesConcept images, and a 3-step run resumed up to step 5 that keeps what the tests inspect."""
import pytest
import torch

import main as train_main


def adapter_config(tiny_files, target, learning_rate, data_params, **model_params):
    """A main.py config training ``target`` on the tiny base (``tiny_files``) with ShapesConcept(``data_params``)."""
    params = {"base_config": str(tiny_files.config), "base_ckpt": str(tiny_files.safetensors), **model_params}
    return {
        "model": {"base_learning_rate": learning_rate, "target": target, "params": params},
        "data": {"target": "main.DataModuleFromConfig", "params": {
            "batch_size": 2, "num_workers": 0,
            "train": {"target": "ldm.data.shapes_concepts.ShapesConcept",
                      "params": {**data_params, "length": 4, "size": 16, "image_key": "jpg", "caption_key": "txt"}}}},
        "lightning": {"trainer": {"log_every_n_steps": 1, "enable_progress_bar": False,
                                  "enable_model_summary": False},
                      "callbacks": {"image_logger": {"params": {"disabled": True}}}},
    }


def train(args):
    return train_main.main([*args, "-t", "--accelerator", "cpu"])


def train_and_resume(module_class, config, logdir, name, on_start=None, after_first=None):
    """Train 3 steps, then resume the run up to step 5. Returns ``{"run", "first", "resumed", "module"}``: the
    run folder, both ``last.ckpt`` contents and the module main.py built last; ``on_start(module)`` runs at the
    start of the first training and its result is ``"initial"``, ``after_first(run)`` after it (``"first_file"``)."""
    built, initial = [], []
    original_start, original_end = module_class.on_train_start, module_class.on_train_end

    def start(module):
        if on_start is not None and not initial:
            initial.append(on_start(module))
        original_start(module)

    def keep(module):
        built.append(module)
        original_end(module)
    result = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module_class, "on_train_start", start)
        patch.setattr(module_class, "on_train_end", keep)
        assert train(["--base", str(config), "--max_steps", "3", "--logdir", str(logdir), "-n", name]) == 0
        run = next(logdir.iterdir())
        result["first"] = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        if after_first is not None:
            result["first_file"] = after_first(run)
        assert train(["--resume", str(run), "--max_steps", "5"]) == 0
    result.update(run=run, module=built[-1], resumed=torch.load(run / "checkpoints" / "last.ckpt", weights_only=True))
    if initial:
        result["initial"] = initial[0]
    return result
