"""The README's own command lines, run as written on shrunk data, in a fresh folder.

Every line of the README's ```bash blocks is either run or skipped for a stated reason (`SKIP`);
a new command must be one or the other. Commands run in order in one folder, so that
`model.conv_from=outputs/cnn_ref` finds the run the line before made, and the README's example
folders (`outputs/multirun/2026-11-28/10-00-00`, `outputs/2026-11-28/10-00-00_krotov_fc_...`,
`outputs/a`) are replaced by folders that earlier commands made. `bioexp train` lines get
`SHRINK` appended (synthetic data, one epoch per phase, CPU), which a command's own values do not
resist: Hydra takes the last value of a key. Each must exit 0, as documented.

The fast test runs `FAST`, one command of each kind (a run, a multirun over heads sharing
phase 1, `--cfg`, `resume=` of a finished run, `compare --by --plot`), in about 20 s; the slow
one runs every command that is not skipped.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import output_of

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHRINK = ("data=synthetic", "data.n_train=256", "data.n_test=128",
          "schedule.unsupervised.epochs=1", "schedule.supervised.epochs=1", "progress=false",
          "device=cpu")
SLURM = "SLURM: tests/test_slurm.py runs these against a local one-node cluster"
SKIP = {  # the start of a command -> why this test does not run it
    "bash scripts/main.sh": "sets up .venv and trains on the full dataset (minutes)",
    "bash scripts/test.sh": "the whole test suite",
    "pip install": "installs packages (network); test_install_lines_install_this_project "
                   "checks them",
    "tensorboard --logdir": "a web server that runs until stopped",
    "mlflow ui": "a web server that runs until stopped (and needs the mlflow-ui extra)",
    "bioexp train -m hydra/launcher=slurm": SLURM,
    "sudo bash scripts/slurm_local.sh": SLURM,
    "export SLURM_CONF": SLURM,
    "sinfo": SLURM,
}
FAST = (
    "bioexp train model=bp_mlp schedule.supervised.epochs=5 data.train_limit=10000 seed=3",
    "bioexp train --cfg job model=cnn",
    "bioexp train -m model=krotov_fc model.head=[],[256]",
    "bioexp train resume=outputs/2026-11-28/10-00-00_krotov_fc_fashion_mnist",
    "bioexp compare outputs/multirun/2026-11-28/10-00-00 --by model --plot models.png",
)


def readme_commands() -> list[str]:
    """Every command of the README's ```bash blocks, in order: continuation lines joined,
    comments dropped, `a && b` split in two."""
    commands = []
    for block in re.findall(r"^ *```bash\n(.*?)^ *```", README.read_text(), re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def skip_reason(command: str) -> str | None:
    return next((why for start, why in SKIP.items() if command.startswith(start)), None)


def newest(paths: list[Path]) -> Path:
    assert paths, "no folder an earlier README command made"
    return max(paths, key=lambda p: p.stat().st_mtime)


def with_real_folders(command: str, here: Path) -> str:
    """The README's example folders replaced by ones that earlier commands made here."""
    outputs = here / "outputs"

    def run_of(match: re.Match) -> str:  # a run folder of that model, from a run or multirun
        model = match.group(1)
        return str(newest([p.parent for p in outputs.rglob("summary.json")
                           if re.search(rf"_{model}_[a-z]+$", p.parent.name)]))

    command = re.sub(r"outputs/multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d",
                     lambda _: str(newest(list(outputs.glob("multirun/*/*")))), command)
    command = re.sub(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d_([a-z_]+?)_(?:fashion_mnist|mnist)",
                     run_of, command)
    days = sorted(p for p in outputs.glob("*") if p.name[:1].isdigit())
    examples = {"outputs/a": outputs / "multirun", "outputs/b": days[-1] if days else outputs}
    return " ".join(str(examples.get(word, word)) for word in command.split())


def run_readme_command(bioexp, command: str, here: Path) -> None:
    args = shlex.split(with_real_folders(command, here))
    assert args[0] == "bioexp", f"not a bioexp command, and not skipped: {command}"
    if args[1] == "train" and not any(a.startswith("resume=") or a == "--help" for a in args):
        args += SHRINK
    result = bioexp(*args[1:], cwd=here, timeout=600)
    assert result.returncode == 0, f"{command}\n{output_of(result)}"


def test_every_readme_command_is_run_or_skipped_for_a_reason() -> None:
    commands = readme_commands()
    assert len(commands) > 30, commands
    unknown = [c for c in commands if not skip_reason(c) and not c.startswith("bioexp ")]
    assert not unknown, f"README commands this test neither runs nor skips: {unknown}"
    assert all(command in commands for command in FAST)


def test_install_lines_install_this_project() -> None:
    """PyPI's `bioexp` is an unrelated project: every install line installs the checkout, with
    an extra that pyproject.toml defines."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = re.findall(r"^([a-z][a-z-]*) = \[", section, re.M)
    assert {"sweep", "slurm", "optuna", "mlflow", "mlflow-ui"} <= set(extras), extras
    text = README.read_text()
    assert "bioexp[" not in text
    lines = re.findall(r"pip install ([^`\n#]+)", text)
    assert len(lines) >= 5, lines
    for line in lines:
        for extra in re.findall(r"'\.\[([a-z-]+)\]'", line):
            assert extra in extras, line
        assert line.startswith(("-e '.[", "mlflow")), line


def test_install_hints_name_the_checkout_or_say_to_run_in_it(monkeypatch, tmp_path) -> None:
    from bioexp import overrides

    assert overrides.install_hint("sweep") == f"pip install -e '{ROOT}[sweep]'"
    monkeypatch.setattr(overrides, "__file__", str(tmp_path / "site" / "bioexp" / "overrides.py"))
    assert overrides.install_hint("sweep") == "pip install -e '.[sweep]' in bioexp's checkout"


def test_the_cheap_readme_commands_work_as_written(bioexp, tmp_path: Path) -> None:
    for command in FAST:
        run_readme_command(bioexp, command, tmp_path)
    assert (tmp_path / "models.png").is_file()


@pytest.mark.readme  # minutes: only with `pytest -m readme` (conftest.ON_REQUEST)
def test_every_readme_command_works_as_written(bioexp, tmp_path: Path) -> None:
    for command in readme_commands():
        if not skip_reason(command):
            run_readme_command(bioexp, command, tmp_path)
