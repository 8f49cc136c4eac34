"""The Hydra application behind `bioexp train`: `main` (the `@hydra.main` entry) and the
`SweepReport` callback that ends a multirun.

`main` finds the run folder, turns user errors into one logged sentence and a non-zero exit, and
returns `objective(summary)` so that sweepers can optimise it. Importing this module imports
neither torch nor the training machinery: `main` imports them when a job runs (`bioexp.train`).

A multirun's jobs that did not complete leave one file each in `<sweep dir>/FAILED_JOBS`: a job
writes it in whatever process runs it (a joblib worker, a submitit job on another node), and the
multirun's own process reads them after the last job (SweepReport).
"""

from __future__ import annotations

import logging
import shutil
import string
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from bioexp.compare import find_runs, run_table, runs_table, text_table
from bioexp.config import config_dir, config_groups, option_names
from bioexp.errors import BioexpError, refuse
from bioexp.records import atomic_write

log = logging.getLogger("bioexp")

FAILED_JOBS = ".failed_jobs"


def help_text() -> str:
    """`bioexp train --help` without overrides: what Hydra's `--help` prints (the template of
    conf/train.yaml's `hydra.help` with the config groups' options and the default config),
    put together in a fifth of the time. Hydra rescans its config repository once per group
    and option to list them (0.7 s); the options are the YAML files of each group's folder."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    template = string.Template(str(cfg.hydra.help.template))
    options = "".join(f"{group}: {', '.join(option_names(group))}\n"
                      for group in config_groups() if option_names(group))
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return template.safe_substitute(APP_CONFIG_GROUPS=options, CONFIG=OmegaConf.to_yaml(job))


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns `objective(summary)` (NaN when the run did not complete)."""
    from bioexp.engine.stop import checkpoint_before_requeue
    from bioexp.runs import resumed_config
    from bioexp.train import run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        if cfg.get("resume"):
            run_dir = Path(cfg.resume)
            cfg = resumed_config(run_dir, cfg, hydra_cfg.overrides.task)
        with checkpoint_before_requeue():
            summary = run(cfg, run_dir)
    except BioexpError as exc:
        log.error("error: %s", exc)
        if not multirun:
            sys.exit(exc.exit_code)
        return record_failed_job(run_dir, "failed")
    except KeyboardInterrupt:
        log.error("interrupted; the run folder %s keeps what was done; continue it with:\n"
                  "  bioexp train resume=%s", run_dir, run_dir)
        sys.exit(130)
    if summary["status"] != "completed":
        if not multirun:
            sys.exit(1)
        return record_failed_job(run_dir, summary["status"])
    log.info("run folder: %s", run_dir)
    return objective(summary)


def objective(summary: dict[str, Any]) -> float:
    """What a sweeper (Optuna) maximises: the final validation accuracy when the run held out a
    validation split (`data.val_size`), else the final test accuracy."""
    return float(summary["val_acc"] if summary.get("val_acc") is not None
                 else summary["test_acc"])


class SweepReport(Callback):
    """After a multirun: a table of its jobs in the log and in `<sweep dir>/runs.md`, then, when
    any job did not complete, `bioexp: error:` naming them and exit code 1, whichever launcher
    ran the jobs (each failed job left a file in `<sweep dir>/FAILED_JOBS`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        shutil.rmtree(Path(config.hydra.sweep.dir) / FAILED_JOBS, ignore_errors=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = find_runs(sweep_dir) if sweep_dir.is_dir() else []
        if runs:
            atomic_write(sweep_dir / "runs.md", lambda f: f.write(runs_table(runs) + "\n"))
            log.info("%d runs in %s:\n%s", len(runs), sweep_dir, text_table(run_table(runs)))
        failed = failed_jobs(sweep_dir)
        if failed:
            refuse(f"{len(failed)} job(s) did not complete: {', '.join(failed)}", code=1)


def record_failed_job(run_dir: Path, why: str) -> float:
    """Leave this multirun job's failure for SweepReport to find; the sweeper's NaN."""
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.sweep.dir) / FAILED_JOBS
    atomic_write(folder / f"{hydra_cfg.job.num}.txt", lambda f: f.write(f"{run_dir} ({why})"))
    return float("nan")


def failed_jobs(sweep_dir: Path) -> list[str]:
    """`<run folder> (<why>)` for each job of the multirun in `sweep_dir` that did not complete,
    in job order."""
    files = (sweep_dir / FAILED_JOBS).glob("*.txt")
    return [f.read_text() for f in sorted(files, key=lambda f: int(f.stem))]
