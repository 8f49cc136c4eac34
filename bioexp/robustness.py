"""FGSM (Goodfellow, Shlens & Szegedy 2015, "Explaining and harnessing adversarial examples"):
x' = clip(x + eps * sign(grad_x L(f(x), y))), with L the model's own loss, eps a fraction of the
pixel range. Feedback-alignment layers are switched to exact backprop for the attack, so the
attacker sees the true gradient of the forward function, not the training signal. Used by
`bioexp eval` and by `bioexp train fgsm=[...]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bioexp.data import Split
from bioexp.layers.feedback import exact_backprop, exact_gradient_note
from bioexp.records import write_json

PIXEL_RANGE = {"unit": (0.0, 1.0), "symmetric": (-1.0, 1.0)}  # model.input_scale -> bounds
EVAL_DIR = "eval"  # a run's folder of evaluation results


def input_gradient_sign(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sign(d loss / d x) of the model's own loss, with exact backprop in feedback layers."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), exact_backprop(model):
        loss = model.loss(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad.sign()


def fgsm_inputs(x: torch.Tensor, sign: torch.Tensor, eps: float,
                bounds: tuple[float, float]) -> torch.Tensor:
    """x + eps * sign, clamped to the pixel range; `eps` is in units of the [0, 1] scale."""
    low, high = bounds
    return (x + eps * (high - low) * sign).clamp(low, high)


@torch.no_grad()
def fgsm_accuracy(model: nn.Module, split: Split, eps_list: list[float],
                  bounds: tuple[float, float], batch_size: int = 1000) -> list[float]:
    """Test accuracy under an FGSM attack of each strength, one gradient per batch."""
    correct = torch.zeros(len(eps_list), dtype=torch.long, device=split.x.device)
    for x, y in split.batches(batch_size):
        sign = input_gradient_sign(model, x, y)
        for i, eps in enumerate(eps_list):
            adv = x if eps == 0 else fgsm_inputs(x, sign, eps, bounds)
            correct[i] += (model.predict(model(adv)) == y).sum()
    return [c / len(split) for c in correct.tolist()]


def write_fgsm(model: nn.Module, test: Split, eps_list: list[float], input_scale: str,
               folder: Path, batch_size: int = 1000) -> dict[str, Any]:
    """Attack `model` on the test split at each strength and write `<folder>/eval/fgsm.json`
    (what `bioexp eval` writes, and `bioexp train fgsm=[...]` after training); returns it."""
    accuracy = fgsm_accuracy(model, test, eps_list, PIXEL_RANGE[input_scale], batch_size)
    fgsm = {"eps": eps_list, "accuracy": accuracy, "n_test": len(test),
            "gradient": exact_gradient_note(model, "the attack"),
            "eps_units": "fraction of the pixel range (the [0, 1] scale)"}
    write_json(folder / EVAL_DIR / "fgsm.json", fgsm)
    return fgsm
