"""Cost of one training step of each learning rule against a plain backprop step of the same shape.

    python scripts/bench_steps.py [--device cpu|cuda] [--repeats 7] [--models ff_mlp,softhebb_cnn]

- Local-rule models (SoftHebb, Krotov, semiHebb): one phase-1 batch, the body's forward pass
  with every local layer applying its rule, against backprop through the same body (its local
  weights made trainable) with an SGD step: what learning the same layers by gradient would cost.
- Models with their own training step (Forward-Forward, predictive coding, equilibrium
  propagation): `model.train_step` against `bp_mlp`'s with the same hidden sizes, at the same
  batch size. For the energy-based families the title gives T, the settling steps a batch pays
  (PC: inference_steps; EP: free_steps + 2 nudged_steps), and the target: at most T + 2 times
  the backprop step.

Prints the median time per step and the ratio to the backprop step, on random inputs of the
Fashion-MNIST shape.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from timing import device_label, interleaved_medians
from torch import nn

import bioexp.models  # noqa: F401  (registers the built-in models)
from bioexp.engine import local_layers, local_learning
from bioexp.registry import build_model

SHAPE, CLASSES = (1, 28, 28), 10
LOCAL = {"softhebb_cnn": {}, "softhebb_mlp": {}, "krotov_fc": {}, "semihebb": {}}
OWN_STEP = {"ff_mlp": 64, "pc_mlp": 64, "eqprop_mlp": 64}  # model -> batch size of its config


def hidden_widths(model: nn.Module) -> list[int]:
    """Forward-Forward's layer widths, or the hidden widths of an energy-based family's net."""
    layers = getattr(model.body, "layers", None)
    if layers is not None:
        return [layer.weight.shape[0] for layer in layers]
    return [layer.out_features for layer in model.head.layers[:-1]]


def settling_steps(model: nn.Module) -> int | None:
    """T: the settling steps of a batch (PC's inference steps, EP's T1 + 2 T2), else None."""
    if hasattr(model, "inference_steps"):
        return model.inference_steps
    if hasattr(model, "nudged_steps"):
        return model.head.free_steps + (2 if model.symmetric else 1) * model.nudged_steps
    return None


def as_backprop(body: nn.Module) -> nn.Module:
    """A copy of `body` whose local-rule weights are trainable parameters."""
    body = copy.deepcopy(body)
    for layer in local_layers(body):
        weight = layer.weight
        del layer._buffers["weight"]
        layer.weight = nn.Parameter(weight.clone())
    return body


def local_step(body: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad(), local_learning(body, lambda: 0.01):
            body(x)

    return step


def backprop_step(body: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(body.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        body(x).float().square().mean().backward()
        optimizer.step()

    return step


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return lambda: model.train_step(x, y, optimizer)


def report(title: str, medians: dict[str, float]) -> None:
    base = medians["backprop"]
    print(title)
    for name, t in medians.items():
        print(f"  {name:<10} {t * 1e3:9.2f} ms/step  {t / base:6.2f}x backprop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=100, help="phase-1 batch size")
    parser.add_argument("--models", default=",".join([*LOCAL, *OWN_STEP]))
    opts = parser.parse_args()
    device = torch.device(opts.device)
    print(f"median of {opts.repeats} repeats, {device_label(device)}, torch {torch.__version__}")
    for name in opts.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, SHAPE, CLASSES).to(device)
        if name in OWN_STEP:
            batch = OWN_STEP[name]
            x, y = torch.rand(batch, *SHAPE, device=device), torch.randint(0, CLASSES, (batch,),
                                                                            device=device)
            widths = hidden_widths(model)
            reference = build_model("bp_mlp", SHAPE, CLASSES, hidden=widths).to(device)
            fns = {"backprop": train_step(reference, x, y), name: train_step(model, x, y)}
            title = f"{name}: train_step, batch {batch}, bp_mlp hidden={widths} as backprop"
            steps = settling_steps(model)
            if steps is not None:
                title += f"; T = {steps} settling steps, target at most {steps + 2}x"
        else:
            x = torch.rand(opts.batch, *SHAPE, device=device)
            fns = {"backprop": backprop_step(as_backprop(model.body), x),
                   "local rule": local_step(model.body, x)}
            title = f"{name}: one phase-1 batch of {opts.batch}, body only"
        report(title, interleaved_medians(fns, device, opts.repeats, warmup=2))


if __name__ == "__main__":
    main()
