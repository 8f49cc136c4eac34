"""The data layer: a dataset resolved from its config and held on the device as tensors.

MNIST-sized sets fit in device memory many times over, so the whole split is moved there once and
training batches are taken by index (`x[idx]`): no DataLoader, no PIL, no per-batch copies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from bioexp.data.sources import SOURCES, check_available, find_or_download, read_arrays
from bioexp.data.synthetic import make_synthetic
from bioexp.errors import DataError

log = logging.getLogger(__name__)

DATASETS = (*SOURCES, "synthetic")


@dataclass
class Split:
    """Images (N, C, H, W) as floats and labels (N,) as int64, both on one device.

    Attributes:
        x: The images, float32, scaled as the model's `input_scale` says (or, inside the
            engine's phase 2 on a frozen body, that body's features).
        y: The labels, int64 class indices; -1 where a label is withheld
            (`Dataset.label_free`).
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) batches; shuffled by `generator` when given, in order otherwise. `skip` leaves
        out the first batches of the same order (a resumed epoch); the generator advances the
        same either way.

        Args:
            batch_size: Images per batch; the last batch may be smaller.
            generator: Draws the order (one permutation per call). None: in order.
            skip: How many batches of that order to leave out at the start.

        Yields:
            (x, y) pairs of tensors on the split's device.
        """
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
    """A dataset ready for training: splits on the device and what the model needs to know.

    Attributes:
        name: The dataset's name (`fashion_mnist`, `synthetic`, ...).
        train: The training split (with `data.labels_per_class`, the labelled few).
        test: The test split.
        val: The validation split held out of the training images (`data.val_size`), or None.
        num_classes: The number of classes.
        class_names: The classes' names, in label order; empty for synthetic data.
        origin: Where the arrays came from: a folder, or `generated (seed N)`.
        label_free: With `data.labels_per_class`: every training image, its label withheld
            as -1, which phase 1 learns from; None otherwise.
    """

    name: str
    train: Split
    test: Split
    val: Split | None
    num_classes: int
    class_names: tuple[str, ...] = ()
    origin: str = ""
    # With data.labels_per_class: every training image (the labelled ones among them, in the
    # order they had before the draw), its labels withheld as -1; `train` is then the labelled
    # few. None otherwise: phase 1 learns from `train`.
    label_free: Split | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape of one image, (C, H, W): what `build_model` takes as `input_shape`."""
        return tuple(self.train.x.shape[1:])

    @property
    def unsupervised(self) -> Split:
        """The images phase 1 learns from, without reading a label: every training image."""
        return self.label_free if self.label_free is not None else self.train


def scale_pixels(images: np.ndarray, scale: str) -> torch.Tensor:
    """uint8 images to float32: `unit` maps to [0, 1], `symmetric` to [-1, 1]."""
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).float()
    if scale == "unit":
        return x.div_(255.0)
    if scale == "symmetric":
        return x.div_(127.5).sub_(1.0)
    raise ValueError(f"unknown pixel scale {scale!r}")


def _subset(n: int, limit: int | None, generator: torch.Generator,
            key: str) -> torch.Tensor | None:
    if limit is None or limit >= n:
        if limit is not None and limit > n:
            log.warning("%s=%d is more than the %d images there are: all of them are used", key,
                        limit, n)
        return None
    return torch.randperm(n, generator=generator)[:limit]


def check_val_size(val_size: int, n_train: int) -> None:
    """DataError when holding out `val_size` images would leave no training images."""
    if val_size >= n_train:
        raise DataError(f"data.val_size={val_size} leaves no training images (the training "
                        f"split has {n_train}; lower data.val_size or raise data.train_limit)")


def labelled_subset(y: np.ndarray, per_class: int, num_classes: int,
                    generator: torch.Generator) -> np.ndarray:
    """Sorted indices of `per_class` images of every class in labels `y`, drawn by `generator`
    class by class; DataError when a class has fewer."""
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        if len(members) < per_class:
            raise DataError(f"data.labels_per_class={per_class} is more than the "
                            f"{len(members)} training images of class {c} (after the "
                            "validation split); lower it")
        order = torch.randperm(len(members), generator=generator).numpy()
        chosen.append(members[order[:per_class]])
    return np.sort(np.concatenate(chosen))


def dataset_plan(cfg: DictConfig) -> tuple[tuple[int, int, int], int]:
    """(input shape, number of classes) of the configured dataset, known without reading it.

    Checks what can be checked before any data is loaded: the dataset is on disk, or it may be
    downloaded and a download mirror answers; `data.val_size` leaves training images;
    DataError otherwise.
    """
    if cfg.name == "synthetic":
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        classes, n_train = cfg.num_classes, cfg.n_train
    elif cfg.name in SOURCES:
        source = SOURCES[cfg.name]
        shape, classes, n_train = source.image_shape, len(source.class_names), source.n_train
        check_available(cfg.name, cfg.root, cfg.download)
    else:
        raise DataError(f"unknown dataset {cfg.name!r}; available: {', '.join(DATASETS)}")
    if cfg.train_limit is not None:
        n_train = min(n_train, cfg.train_limit)
    check_val_size(cfg.val_size, n_train)
    per_class = cfg.get("labels_per_class")
    if per_class is not None and per_class * classes > n_train - cfg.val_size:
        raise DataError(f"data.labels_per_class={per_class} asks for {per_class * classes} "
                        f"labelled images, more than the {n_train - cfg.val_size} training "
                        "images there are (after the validation split); lower it")
    return shape, classes


def load_arrays(cfg: DictConfig) -> tuple[tuple[np.ndarray, ...], str]:
    """The four raw arrays of the dataset named by cfg.name, and where they came from."""
    if cfg.name == "synthetic":
        arrays = make_synthetic(cfg.n_train, cfg.n_test, cfg.num_classes, cfg.channels,
                                cfg.image_size, cfg.noise, cfg.seed)
        return arrays, f"generated (seed {cfg.seed})"
    if cfg.root and not Path(cfg.root).expanduser().is_dir():
        log.warning("data.root=%s is not a folder; looking for %s in the other places", cfg.root,
                    cfg.name)
    if cfg.name not in SOURCES:
        raise DataError(f"unknown dataset {cfg.name!r}; available: {', '.join(DATASETS)}")
    files = find_or_download(cfg.name, cfg.root, cfg.download)
    folder = next(iter(files.values())).parent
    return read_arrays(cfg.name, files), str(folder)


def load_dataset(cfg: DictConfig, scale: str, device: torch.device | str = "cpu") -> Dataset:
    """Resolve, read, subset, split and scale a dataset, and move it to `device`.

    `train_limit` and `test_limit` take seeded random subsets; `val_size` then holds out that
    many training images as a validation split; `labels_per_class` then keeps the labels of
    that many images per class, drawn from the rest (the label-scarce track): they are the
    training split, and every non-validation training image, its label withheld, is what
    phase 1 learns from (`Dataset.unsupervised`). All four use `cfg.seed`, not the run's seed,
    so runs that differ only in their seed see the same images.

    Args:
        cfg: The `data` node of a run's config (`name`, `root`, `download`, the limits, ...).
        scale: The pixel scale: `unit` ([0, 1]) or `symmetric` ([-1, 1]); a model's
            `input_scale`.
        device: Where the splits go.

    Returns:
        The dataset, its splits on `device`.

    Raises:
        DataError: The dataset is unknown, cannot be found or downloaded, or the limits ask
            for more images than there are.
    """
    (train_x, train_y, test_x, test_y), origin = load_arrays(cfg)

    def generator(purpose: int) -> torch.Generator:
        # One stream per draw, so that e.g. train_limit never changes which test images are used.
        return torch.Generator().manual_seed(cfg.seed * 1000 + purpose)

    idx = _subset(len(train_y), cfg.train_limit, generator(1), "data.train_limit")
    if idx is not None:
        train_x, train_y = train_x[idx.numpy()], train_y[idx.numpy()]
    idx = _subset(len(test_y), cfg.test_limit, generator(2), "data.test_limit")
    if idx is not None:
        test_x, test_y = test_x[idx.numpy()], test_y[idx.numpy()]
    val = None
    if cfg.val_size:
        check_val_size(cfg.val_size, len(train_y))
        order = torch.randperm(len(train_y), generator=generator(3)).numpy()
        held, kept = order[:cfg.val_size], order[cfg.val_size:]
        val = Split(scale_pixels(train_x[held], scale).to(device),
                    torch.from_numpy(train_y[held]).to(device))
        train_x, train_y = train_x[kept], train_y[kept]
    source = SOURCES.get(cfg.name)
    num_classes = len(source.class_names) if source else cfg.num_classes
    train = Split(scale_pixels(train_x, scale).to(device), torch.from_numpy(train_y).to(device))
    label_free = None
    per_class = cfg.get("labels_per_class")
    if per_class is not None:
        idx = torch.from_numpy(labelled_subset(train_y, per_class, num_classes, generator(4)))
        label_free = Split(train.x, torch.full_like(train.y, -1))
        train = Split(train.x[idx.to(device)], train.y[idx.to(device)])
    dataset = Dataset(
        name=cfg.name,
        train=train,
        test=Split(scale_pixels(test_x, scale).to(device), torch.from_numpy(test_y).to(device)),
        val=val,
        num_classes=num_classes,
        class_names=source.class_names if source else (),
        origin=origin,
        label_free=label_free,
    )
    labelled = "" if label_free is None else (f" ({len(train)} labelled, {per_class} per "
                                              f"class; {len(label_free)} for phase 1)")
    log.info("data: %s from %s: %d train%s, %d test%s, shape %s", cfg.name, origin,
             len(dataset.unsupervised), labelled, len(dataset.test),
             f", {len(val)} validation" if val else "", "x".join(map(str, dataset.input_shape)))
    return dataset
