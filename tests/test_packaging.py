"""A non-editable install (a built wheel) carries the config tree and runs without the sources."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(REPO)], check=True, capture_output=True,
                   timeout=300)
    (wheel,) = out.glob("bioexp-*.whl")
    return wheel


def test_wheel_ships_every_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"bioexp/conf/{p.relative_to(REPO / 'conf').as_posix()}"
                for p in (REPO / "conf").rglob("*.yaml")}
    assert "bioexp/conf/train.yaml" in expected
    assert expected <= names, sorted(expected - names)
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "bioexp").rglob("*.py")}
    assert modules <= names, sorted(modules - names)  # every subpackage is listed in pyproject


def test_installed_wheel_finds_its_configs_away_from_the_sources(wheel: Path,
                                                                  tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run(
        [sys.executable, "-c", "import bioexp, bioexp.config as c; "
                               "print(bioexp.__file__); print(c.config_dir())"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    module_file, conf = probe.stdout.split()
    assert Path(module_file).is_relative_to(target) and Path(conf).is_relative_to(target)
    job = subprocess.run([sys.executable, "-m", "bioexp", "train", "--cfg", "job", "model=cnn",
                          "data=synthetic"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    assert "name: cnn" in job.stdout and "name: synthetic" in job.stdout
    listing = subprocess.run([sys.executable, "-m", "bioexp", "list"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr  # imports every registered model's modules
    assert "semihebb" in listing.stdout and "fa_mlp" in listing.stdout
