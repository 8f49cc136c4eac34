"""The data layer: a dataset resolved from its config and held on the device as tensors.

MNIST-sized sets fit in device memory many times over, so the whole split is moved there once and
training batches are taken by index (`x[idx]`): no DataLoader, no PIL, no per-batch copies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from bioexp.data.sources import SOURCES, find_or_download, read_arrays
from bioexp.data.synthetic import make_synthetic
from bioexp.errors import DataError

log = logging.getLogger(__name__)

DATASETS = (*SOURCES, "synthetic")


@dataclass
class Split:
    """Images (N, C, H, W) as floats and labels (N,) as int64, both on one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) batches; shuffled by `generator` when given, in order otherwise. `skip` leaves
        out the first batches of the same order (a resumed epoch); the generator advances the
        same either way."""
        n = len(self)
        first = skip * batch_size
        if generator is None:
            for start in range(first, n, batch_size):
                yield self.x[start:start + batch_size], self.y[start:start + batch_size]
            return
        order = torch.randperm(n, generator=generator).to(self.x.device)
        for start in range(first, n, batch_size):
            idx = order[start:start + batch_size]
            yield self.x[idx], self.y[idx]


@dataclass
class Dataset:
    """A dataset ready for training: splits on the device and what the model needs to know."""

    name: str
    train: Split
    test: Split
    val: Split | None
    num_classes: int
    class_names: tuple[str, ...] = ()
    origin: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])


def scale_pixels(images: np.ndarray, scale: str) -> torch.Tensor:
    """uint8 images to float32: `unit` maps to [0, 1], `symmetric` to [-1, 1]."""
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).float()
    if scale == "unit":
        return x.div_(255.0)
    if scale == "symmetric":
        return x.div_(127.5).sub_(1.0)
    raise ValueError(f"unknown pixel scale {scale!r}")


def _subset(n: int, limit: int | None, generator: torch.Generator) -> torch.Tensor | None:
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=generator)[:limit]


def load_arrays(cfg: DictConfig) -> tuple[tuple[np.ndarray, ...], str]:
    """The four raw arrays of the dataset named by cfg.name, and where they came from."""
    if cfg.name == "synthetic":
        arrays = make_synthetic(cfg.n_train, cfg.n_test, cfg.num_classes, cfg.channels,
                                cfg.image_size, cfg.noise, cfg.seed)
        return arrays, f"generated (seed {cfg.seed})"
    if cfg.name not in SOURCES:
        raise DataError(f"unknown dataset {cfg.name!r}; available: {', '.join(DATASETS)}")
    files = find_or_download(cfg.name, cfg.root, cfg.download)
    folder = next(iter(files.values())).parent
    return read_arrays(cfg.name, files), str(folder)


def load_dataset(cfg: DictConfig, scale: str, device: torch.device | str = "cpu") -> Dataset:
    """Resolve, read, subset, split and scale a dataset, and move it to `device`.

    `train_limit` and `test_limit` take seeded random subsets; `val_size` then holds out that
    many training images as a validation split. All three use `cfg.seed`, not the run's seed,
    so runs that differ only in their seed see the same images.
    """
    (train_x, train_y, test_x, test_y), origin = load_arrays(cfg)

    def generator(purpose: int) -> torch.Generator:
        # One stream per draw, so that e.g. train_limit never changes which test images are used.
        return torch.Generator().manual_seed(cfg.seed * 1000 + purpose)

    idx = _subset(len(train_y), cfg.train_limit, generator(1))
    if idx is not None:
        train_x, train_y = train_x[idx.numpy()], train_y[idx.numpy()]
    idx = _subset(len(test_y), cfg.test_limit, generator(2))
    if idx is not None:
        test_x, test_y = test_x[idx.numpy()], test_y[idx.numpy()]
    val = None
    if cfg.val_size:
        if cfg.val_size >= len(train_y):
            raise DataError(f"data.val_size={cfg.val_size} leaves no training images "
                            f"(the training split has {len(train_y)})")
        order = torch.randperm(len(train_y), generator=generator(3)).numpy()
        held, kept = order[:cfg.val_size], order[cfg.val_size:]
        val = Split(scale_pixels(train_x[held], scale).to(device),
                    torch.from_numpy(train_y[held]).to(device))
        train_x, train_y = train_x[kept], train_y[kept]
    source = SOURCES.get(cfg.name)
    num_classes = len(source.class_names) if source else cfg.num_classes
    dataset = Dataset(
        name=cfg.name,
        train=Split(scale_pixels(train_x, scale).to(device), torch.from_numpy(train_y).to(device)),
        test=Split(scale_pixels(test_x, scale).to(device), torch.from_numpy(test_y).to(device)),
        val=val,
        num_classes=num_classes,
        class_names=source.class_names if source else (),
        origin=origin,
    )
    log.info("data: %s from %s: %d train, %d test%s, shape %s", cfg.name, origin,
             len(dataset.train), len(dataset.test),
             f", {len(val)} validation" if val else "", "x".join(map(str, dataset.input_shape)))
    return dataset
