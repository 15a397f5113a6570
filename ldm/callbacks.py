"""Lightning callbacks of ``main.py``: run-folder set-up and emergency checkpoints, image grids, GPU stats.

Official configs name them as ``main.SetupCallback``, ``main.ImageLogger`` and ``main.CUDACallback``;
main.py re-exports them from here.
"""
import logging
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torchvision.utils import make_grid

logger = logging.getLogger(__name__)

LAST_CKPT = "last.ckpt"


def save_last_checkpoint(trainer, ckptdir):
    """Write ``<ckptdir>/last.ckpt`` from rank 0 without the barrier of ``trainer.save_checkpoint``: after an
    interruption the other ranks may never reach it."""
    if trainer.global_rank != 0:
        return None
    path = Path(ckptdir) / LAST_CKPT
    for callback in trainer.checkpoint_callbacks:
        # so that ModelCheckpoint overwrites this file later instead of versioning a last-v1.ckpt next to it
        if callback.save_last and callback.dirpath and Path(callback.dirpath).resolve() == path.parent.resolve():
            callback.last_model_path = str(path)
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
    logger.info("saved %s at global step %d", path, trainer.global_step)
    return path


class SetupCallback(pl.Callback):
    """Creates the run folder and writes the merged configs; saves ``last.ckpt`` when training is interrupted
    (Ctrl-C, SIGTERM, an exception) or when ``request_checkpoint()`` was called (main.py maps SIGUSR1 to it).

    ``interruption`` records what stopped the run ("keyboard", "sigterm", "error") for main.py's exit code.
    """

    def __init__(self, resume, now, logdir, ckptdir, cfgdir, config, lightning_config):
        super().__init__()
        self.resume = resume
        self.now = now
        self.logdir = Path(logdir)
        self.ckptdir = Path(ckptdir)
        self.cfgdir = Path(cfgdir)
        self.config = config
        self.lightning_config = lightning_config
        self.interruption = None
        self.saved_on_interrupt = None
        self._checkpoint_requested = False

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank != 0:
            return
        for folder in (self.logdir, self.ckptdir, self.cfgdir):
            folder.mkdir(parents=True, exist_ok=True)
        callbacks = self.lightning_config.get("callbacks", {}) or {}
        if "metrics_over_trainsteps_checkpoint" in callbacks:
            (self.ckptdir / "trainstep_checkpoints").mkdir(exist_ok=True)
        logger.info("project config\n%s", OmegaConf.to_yaml(self.config))
        OmegaConf.save(self.config, self.cfgdir / f"{self.now}-project.yaml")
        logger.info("lightning config\n%s", OmegaConf.to_yaml(self.lightning_config))
        OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}),
                       self.cfgdir / f"{self.now}-lightning.yaml")

    def request_checkpoint(self, *args):
        """Signal-safe: only sets a flag; the checkpoint is written after the current batch."""
        self._checkpoint_requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._checkpoint_requested:
            self._checkpoint_requested = False
            save_last_checkpoint(trainer, self.ckptdir)

    def on_train_end(self, trainer, pl_module):
        # ModelCheckpoint writes last.ckpt when validation runs; a run whose max_steps falls between
        # validations (and inside an epoch) would otherwise end with last.ckpt behind its final step
        saved = [getattr(c, "_last_global_step_saved", None) for c in trainer.checkpoint_callbacks if c.save_last]
        if trainer.global_step > 0 and saved and trainer.global_step not in saved:
            save_last_checkpoint(trainer, self.ckptdir)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt):
            self.interruption = "keyboard"
        elif isinstance(exception, SIGTERMException):
            self.interruption = "sigterm"
        else:
            self.interruption = "error"
        if trainer.global_step == 0:
            return
        try:
            self.saved_on_interrupt = save_last_checkpoint(trainer, self.ckptdir)
        except (OSError, RuntimeError) as err:
            logger.error("could not save %s after the interruption: %s", self.ckptdir / LAST_CKPT, err)


class ImageLogger(pl.Callback):
    """Every ``batch_frequency`` steps (and at steps 1, 2, 4, ... before, with ``increase_log_steps``) calls
    ``pl_module.log_images(batch, split=..., **log_images_kwargs)`` and writes one grid per returned key to
    ``<logdir>/images/<split>/<key>_gs-<step>_e-<epoch>_b-<batch>.png``. Runs on rank 0 only."""

    def __init__(self, batch_frequency, max_images, clamp=True, increase_log_steps=True, rescale=True,
                 disabled=False, log_on_batch_idx=False, log_first_step=False, log_images_kwargs=None):
        super().__init__()
        self.rescale = rescale
        self.batch_freq = int(batch_frequency)
        self.max_images = int(max_images)
        self.log_steps = [2 ** n for n in range(int(np.log2(self.batch_freq)) + 1)]
        if not increase_log_steps:
            self.log_steps = [self.batch_freq]
        self.clamp = clamp
        self.disabled = disabled
        self.log_on_batch_idx = log_on_batch_idx
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.log_first_step = log_first_step

    @staticmethod
    def save_dir(trainer):
        if trainer.logger is not None and trainer.logger.save_dir is not None:
            return Path(trainer.logger.save_dir)
        return Path(trainer.default_root_dir)

    def log_local(self, save_dir, split, images, global_step, current_epoch, batch_idx):
        root = Path(save_dir) / "images" / split
        root.mkdir(parents=True, exist_ok=True)
        for key, value in images.items():
            grid = make_grid(value, nrow=4)  # [3, H, W]
            if self.rescale:
                grid = (grid + 1.0) / 2.0  # [-1, 1] -> [0, 1]
            array = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
            name = f"{key}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png"
            Image.fromarray(array).save(root / name)

    def check_frequency(self, check_idx):
        if (check_idx % self.batch_freq == 0 or check_idx in self.log_steps) and (check_idx > 0 or self.log_first_step):
            if self.log_steps:
                self.log_steps.pop(0)
            return True
        return False

    def log_img(self, trainer, pl_module, batch, batch_idx, split="train"):
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if not (self.check_frequency(check_idx) and callable(getattr(pl_module, "log_images", None))
                and self.max_images > 0 and trainer.global_rank == 0):
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        finally:
            pl_module.train(was_training)
        for key in list(images):
            if isinstance(images[key], torch.Tensor):
                value = images[key][:self.max_images].detach().float().cpu()
                images[key] = value.clamp(-1., 1.) if self.clamp else value
            else:
                del images[key]
        self.log_local(self.save_dir(trainer), split, images, pl_module.global_step, pl_module.current_epoch,
                       batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.disabled and (pl_module.global_step > 0 or self.log_first_step):
            self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not self.disabled and pl_module.global_step > 0 and not trainer.sanity_checking:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")


class CUDACallback(pl.Callback):
    """Logs epoch time and peak GPU memory (nothing on CPU)."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.start_time = time.time()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_end(self, trainer, pl_module):
        if pl_module.device.type != "cuda":
            return
        torch.cuda.synchronize(pl_module.device)
        max_memory = torch.cuda.max_memory_allocated(pl_module.device) / 2 ** 20
        epoch_time = time.time() - self.start_time
        if trainer.global_rank == 0:
            logger.info("average epoch time: %.2f seconds, average peak memory %.2f MiB", epoch_time, max_memory)
