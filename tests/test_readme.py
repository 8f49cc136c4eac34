"""The command lines of the README and of the documentation site, run as written on shrunk data,
in a fresh folder; the README's links; the site itself, built with `mkdocs build --strict`.

Every line of the ```bash blocks of README.md and of every page in mkdocs.yml's nav is either
run or skipped for a stated reason (`SKIP`); a new command must be one or the other. (Records of
runs that take hours, such as the benchmark's multiruns and the controls' validation grids, are
indented code blocks, which this test does not read.) Commands
run in order (the README, then the pages in the nav's order) in one folder, so that
`model.conv_from=outputs/cnn_ref` finds the run the line before made, and the example
folders (`outputs/multirun/2026-11-28/10-00-00`, `outputs/2026-11-28/10-00-00_krotov_fc_...`,
`outputs/a`) are replaced by folders that earlier commands made. `bioexp train` lines get
`SHRINK` appended (synthetic data, one epoch per phase, CPU), which a command's own values do not
resist: Hydra takes the last value of a key. Each must exit 0, as documented.

The fast test runs `FAST`, one command of each kind (a run, a multirun over heads sharing
phase 1, `--cfg`, `resume=` of a finished run, `compare --by --plot`), in about 20 s; the slow
one runs every command that is not skipped.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import output_of

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MKDOCS = ROOT / "mkdocs.yml"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # a Markdown link's or image's target
SHRINK = ("data=synthetic", "data.n_train=256", "data.n_test=128",
          "schedule.unsupervised.epochs=1", "schedule.supervised.epochs=1", "progress=false",
          "device=cpu")
SLURM = "SLURM: tests/test_slurm.py runs these against a local one-node cluster"
SKIP = {  # the start of a command -> why this test does not run it
    "bash scripts/main.sh": "sets up .venv and trains on the full dataset (minutes)",
    "bash scripts/test.sh": "the whole test suite",
    "bash scripts/gpu_check.sh": "needs a CUDA GPU",
    ". .venv/bin/activate": "the shell's environment; the test runs the venv's bioexp already",
    "bioexp train model=krotov_fc device=cuda": "needs a CUDA GPU",
    "bioexp train model=cnn device=cuda": "needs a CUDA GPU",
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


def site_pages() -> list[Path]:
    """The documentation site's pages, in the order of mkdocs.yml's nav."""

    def walk(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, dict):
            return [page for value in node.values() for page in walk(value)]
        return [page for item in node for page in walk(item)]

    docs = ROOT / yaml.safe_load(MKDOCS.read_text()).get("docs_dir", "docs")
    return [docs / page for page in walk(yaml.safe_load(MKDOCS.read_text())["nav"])]


def documented_files() -> list[Path]:
    return [README, *site_pages()]


def readme_commands() -> list[str]:
    """Every command of the ```bash blocks of the README and the site's pages, in order:
    continuation lines joined, comments dropped, `a && b` split in two."""
    commands = []
    text = "\n".join(path.read_text() for path in documented_files())
    for block in re.findall(r"^ *```bash\n(.*?)^ *```", text, re.S | re.M):
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
    assert not unknown, f"commands of the README or the site this test neither runs nor skips: " \
                        f"{unknown}"
    assert all(command in commands for command in FAST)
    stale = [start for start in SKIP if not any(c.startswith(start) for c in commands)]
    assert not stale, f"SKIP entries that match no command any more: {stale}"


def test_the_readme_is_short_and_every_link_in_it_resolves() -> None:
    """The front page stays a front page (issue 26: about 200 lines), and its relative links
    (into docs/, examples/) name files or folders of the checkout."""
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    links = LINK.findall(text)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10, local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
    pages = {p.relative_to(ROOT).as_posix() for p in site_pages()}
    docs_links = {link for link in local if link.startswith("docs/") and link.endswith(".md")}
    assert docs_links <= pages, f"README links to pages outside the site's nav: " \
                                f"{docs_links - pages}"


def test_every_image_and_file_a_page_links_to_exists() -> None:
    """`mkdocs build --strict` checks links between pages, not images: a page that shows a
    figure the report wrote under another name builds without a word."""
    missing = []
    for page in site_pages():
        for target in LINK.findall(page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.name}: {target}")
    assert not missing, f"links to files that do not exist: {missing}"


def test_the_documentation_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav, or a
    docstring the API reference cannot render fails the build, and so this test."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                             "--config-file", str(MKDOCS), "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, output_of(result)
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def test_install_lines_install_this_project() -> None:
    """PyPI's `bioexp` is an unrelated project: every install line installs the checkout, with
    an extra that pyproject.toml defines."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = re.findall(r"^([a-z][a-z-]*) = \[", section, re.M)
    assert {"sweep", "slurm", "optuna", "mlflow", "mlflow-ui", "docs"} <= set(extras), extras
    text = "\n".join(path.read_text() for path in documented_files())
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
