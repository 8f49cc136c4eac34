"""A small generated image classification set for tests and smoke runs.

Each class has a smooth random prototype (a coarse random grid upsampled to full size); samples are
the prototype shifted by up to two pixels plus Gaussian noise, quantised to bytes like real
images. The set is a function of its arguments and seed only, so two runs see the same data.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def make_synthetic(
    n_train: int, n_test: int, num_classes: int, channels: int, image_size: int, noise: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images (N, C, S, S) uint8, train_labels, test_images, test_labels)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 7, 7, generator=g)
    prototypes = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                               align_corners=False)  # (K, C, S, S) in [0, 1]

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = torch.randint(num_classes, (n,), generator=g)
        images = prototypes[labels]
        shifts = torch.randint(-2, 3, (n, 2), generator=g)
        images = torch.stack([torch.roll(im, tuple(s.tolist()), dims=(1, 2))
                              for im, s in zip(images, shifts, strict=True)])
        images = images + noise * torch.randn(images.shape, generator=g)
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return images.numpy(), labels.numpy()

    train_x, train_y = sample(n_train)
    test_x, test_y = sample(n_test)
    return train_x, train_y, test_x, test_y
