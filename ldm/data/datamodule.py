"""``DataModuleFromConfig``: the Lightning data module that official configs name as ``main.DataModuleFromConfig``.

Each split (train / validation / test / predict) is a ``target``/``params`` dataset config; only the splits
given get a data loader, so Lightning skips validation when there is no validation config.
"""
from functools import partial

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.errors import UserError
from ldm.util import instantiate_from_config


class WrappedDataset(Dataset):
    """Turns any object with ``__len__`` and ``__getitem__`` into a torch Dataset."""

    def __init__(self, dataset):
        self.data = dataset

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        return self.data[idx]


def worker_init_fn(worker_id):
    """Distinct numpy seeds per worker (forked workers would otherwise share the parent's numpy state)."""
    base = torch.initial_seed() % 2 ** 32  # already distinct per worker and epoch
    np.random.seed((base + worker_id) % 2 ** 32)


class DataModuleFromConfig(pl.LightningDataModule):
    def __init__(self, batch_size, train=None, validation=None, test=None, predict=None, wrap=False,
                 num_workers=None, shuffle_test_loader=False, use_worker_init_fn=False,
                 shuffle_val_dataloader=False):
        super().__init__()
        if int(batch_size) < 1:
            raise UserError(f"data.params.batch_size must be at least 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.num_workers = num_workers if num_workers is not None else self.batch_size * 2
        self.use_worker_init_fn = use_worker_init_fn
        self.wrap = wrap
        self.dataset_configs = dict()
        self.datasets = dict()
        # Lightning runs a loop only when its dataloader hook exists, so hooks are set per configured split.
        if train is not None:
            self.dataset_configs["train"] = train
            self.train_dataloader = self._train_dataloader
        if validation is not None:
            self.dataset_configs["validation"] = validation
            self.val_dataloader = partial(self._eval_dataloader, "validation", shuffle=shuffle_val_dataloader)
        if test is not None:
            self.dataset_configs["test"] = test
            self.test_dataloader = partial(self._eval_dataloader, "test", shuffle=shuffle_test_loader)
        if predict is not None:
            self.dataset_configs["predict"] = predict
            self.predict_dataloader = partial(self._eval_dataloader, "predict", shuffle=False)

    def prepare_data(self):
        # builds each dataset once so that downloads / caches happen in one process before setup()
        for data_cfg in self.dataset_configs.values():
            instantiate_from_config(data_cfg)

    def setup(self, stage=None):
        self.datasets = {k: instantiate_from_config(cfg) for k, cfg in self.dataset_configs.items()}
        if self.wrap:
            self.datasets = {k: WrappedDataset(d) for k, d in self.datasets.items()}

    def _loader(self, split, shuffle):
        dataset = self.datasets[split]
        iterable = isinstance(dataset, IterableDataset)
        init_fn = worker_init_fn if iterable or self.use_worker_init_fn else None
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          shuffle=shuffle and not iterable, worker_init_fn=init_fn,
                          persistent_workers=self.num_workers > 0)

    def _train_dataloader(self):
        return self._loader("train", shuffle=True)

    def _eval_dataloader(self, split, shuffle=False):
        return self._loader(split, shuffle=shuffle)
