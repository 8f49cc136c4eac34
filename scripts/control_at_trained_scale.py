"""The random-feature control of a rule that trains every layer with labels (`pc_mlp`,
`eqprop_mlp`), with its frozen hidden rows rescaled to the length the rule gave them.

    python scripts/control_at_trained_scale.py TRAINED_RUN [OVERRIDE ...] [--out FOLDER]

`control=random_features` freezes the hidden layers at their initial weights, whose rows are
shorter than the trained model's (`pc_mlp`'s first layer ends about 4 times longer). This runs
the same control with every frozen row of layer l rescaled, before training, to the median row
length of layer l in TRAINED_RUN's checkpoint, so that scale alone cannot decide the verdict.
The run gets TRAINED_RUN's model and the overrides (e.g. `seed=1`), and prints its test
accuracy beside the trained run's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import bioexp
import bioexp.train
from bioexp.engine.local import control_layers
from bioexp.records import read_json


def trained_row_norms(run: Path) -> list[float]:
    """The median row length of each hidden layer's weight in the run's final checkpoint."""
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
    weights = [v for k, v in state.items() if k.startswith("head.layers.") and k.endswith("weight")]
    return [w.norm(dim=1).median().item() for w in weights[:-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the trained run whose row lengths to match")
    parser.add_argument("overrides", nargs="*", help="config overrides for the control")
    parser.add_argument("--out", type=Path, default=None, help="the control's run folder")
    opts = parser.parse_args()
    norms = trained_row_norms(opts.run)
    model = read_json(opts.run / "summary.json")["model"]
    original = bioexp.train.start_control

    def rescaled_control(net: torch.nn.Module, control: str) -> None:
        with torch.no_grad():
            for layer, norm in zip(control_layers(net), norms, strict=True):
                layer.weight.mul_(norm / layer.weight.norm(dim=1, keepdim=True))
        original(net, control)

    bioexp.train.start_control = rescaled_control
    try:
        result = bioexp.run([f"model={model}", "control=random_features", "fgsm=[]",
                             *opts.overrides], run_dir=opts.out)
    finally:
        bioexp.train.start_control = original
    trained = read_json(opts.run / "summary.json")["test_acc"]
    print(f"{model}: hidden rows rescaled to {', '.join(f'{n:.3f}' for n in norms)}; control "
          f"test accuracy {result.summary['test_acc']:.4f}, trained run {trained:.4f}")


if __name__ == "__main__":
    main()
