"""Before a sweep goes to SLURM (`hydra/launcher=slurm`): what the jobs ask for, against what the
cluster has.

SLURM accepts a job that no node can ever run (more cores per task than any node of its
partition has) and keeps it pending for ever (reason `PartitionConfig`), while `bioexp train -m`
waits without a word; a partition that does not exist ends in submitit's traceback. The Hydra
callback `SlurmCheck` asks `sinfo` first, where it exists, and refuses such a sweep in one line
before anything is submitted or written: the partition (or the default one) exists, and some
node of it has the cores (`cpus_per_task` x `tasks_per_node`), the memory (`mem_gb`) and the
GPUs (`gpus_per_node`, from gres) that each job asks for.

It also asks `sacct` once. A cluster without job accounting fails every `sacct` call that
submitit makes to follow its jobs (and sacct prints its complaint at each poll); bioexp then says
so once and stops submitit asking, which then follows the jobs by their result files, as it does
when sacct fails.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bioexp.errors import refuse

log = logging.getLogger(__name__)

SLURM_LAUNCHER = "SlurmLauncher"  # hydra-submitit-launcher's class for SLURM
SINFO_FORMAT = "%P|%c|%m|%G|%a"  # partition (* = default), CPUs and MB per node, gres, state
WAIT_S = 15  # seconds sinfo or sacct may take


@dataclass(frozen=True)
class Nodes:
    """One line of `sinfo`: nodes of a partition that share a configuration."""

    partition: str
    default: bool
    cpus: int
    memory_mb: int
    gpus: int
    up: bool


def read_sinfo(text: str) -> list[Nodes]:
    """`sinfo -h -a -o SINFO_FORMAT`'s lines as Nodes."""
    rows = []
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        name, cpus, memory, gres, state = fields
        rows.append(Nodes(name.rstrip("*"), name.endswith("*"), _number(cpus), _number(memory),
                          gpu_count(gres), state.strip() == "up"))
    return rows


def _number(field: str) -> int:
    digits = field.strip().rstrip("+")
    return int(digits) if digits.isdigit() else 0


def gpu_count(gres: str) -> int:
    """GPUs per node in a gres field: `gpu:4`, `gpu:a100:2(S:0-1)`, `(null)` (none)."""
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and len(fields) > 1 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def partitions() -> list[Nodes] | str | None:
    """The cluster's nodes by partition, from sinfo; None where there is no sinfo; a sentence
    when sinfo fails (the controller does not answer)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        done = subprocess.run(["sinfo", "-h", "-a", "-o", SINFO_FORMAT], capture_output=True,
                              text=True, timeout=WAIT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo did not answer ({type(exc).__name__})"
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        return f"sinfo failed ({said[0] if said else f'exit code {done.returncode}'})"
    return read_sinfo(done.stdout)


def launcher_problem(launcher: dict[str, Any], nodes: list[Nodes],
                     raw: dict[str, Any] | None = None) -> str | None:
    """Why SLURM would refuse or never start the jobs that `launcher` (hydra.launcher, resolved)
    asks for on a cluster of `nodes`; None when some node of the partition can run one. `raw`,
    the launcher config unresolved, tells which bioexp key a value comes from."""
    raw = raw or {}
    names = sorted({n.partition for n in nodes})
    default = next((n.partition for n in nodes if n.default), None)
    listed = ", ".join(f"{name} (the default)" if name == default else name for name in names)
    wanted = str(launcher.get("partition") or "")
    missing = [p for p in wanted.split(",") if p and p not in names]  # SLURM takes a list
    if missing:
        return (f"hydra.launcher.partition={wanted}: this cluster has no partition "
                f"{missing[0]} (sinfo lists {listed or 'none'})")
    if not wanted and default is None:
        return (f"this cluster has no default partition: name one with "
                f"hydra.launcher.partition=NAME (sinfo lists {listed or 'none'})")
    name = wanted or default
    mine = [n for n in nodes if n.partition in name.split(",")]
    never = "SLURM would keep the jobs pending for ever"
    cpus = (launcher.get("cpus_per_task") or 1) * (launcher.get("tasks_per_node") or 1)
    most = max(n.cpus for n in mine)
    if cpus > most:
        source = " (from threads)" if "threads" in str(raw.get("cpus_per_task", "")) else ""
        fewer = f"threads={most} or fewer" if source else f"hydra.launcher.cpus_per_task={most}"
        return (f"hydra.launcher.cpus_per_task={launcher.get('cpus_per_task')}{source} asks for "
                f"{cpus} cores per node, and the nodes of partition {name} have at most {most}: "
                f"{never}; use {fewer}, or another partition (hydra.launcher.partition=NAME)")
    mem_gb = launcher.get("mem_gb")
    memory = max(n.memory_mb for n in mine)
    if mem_gb and memory and mem_gb * 1024 > memory:
        return (f"hydra.launcher.mem_gb={mem_gb} is more than the nodes of partition {name} "
                f"have ({memory / 1024:.1f} GB at most): {never}; lower hydra.launcher.mem_gb")
    gpus, most_gpus = launcher.get("gpus_per_node") or 0, max(n.gpus for n in mine)
    if gpus > most_gpus:
        has = f"at most {most_gpus}" if most_gpus else "none"
        source = " (from device)" if "device" in str(raw.get("gpus_per_node", "")) else ""
        return (f"hydra.launcher.gpus_per_node={gpus}{source} asks for more GPUs than the nodes "
                f"of partition {name} have ({has}, by sinfo's gres): {never}; choose a GPU "
                f"partition (hydra.launcher.partition=NAME), or device=cpu with "
                f"hydra/launcher=slurm")
    if not any(n.up for n in mine):
        log.warning("SLURM partition %s is not up: the jobs wait until it is", name)
    return None


_sacct_said = False


def without_sacct(reason: str) -> None:
    """Say once that sacct does not work here (`reason`), and stop submitit calling it: it
    follows the jobs by their result files, as it does when sacct fails."""
    global _sacct_said
    if _sacct_said:
        return
    _sacct_said = True
    log.warning("sacct does not work here (%s), so SLURM's job states are unknown (a cluster "
                "without job accounting?); submitit follows the jobs by their result files, "
                "and bioexp stops asking sacct", reason)
    try:
        from submitit.slurm.slurm import SlurmJob

        SlurmJob.watcher._make_command = lambda: None  # no command: the watcher skips the call
    except (ImportError, AttributeError):  # another submitit: it keeps calling, and failing
        pass


def sacct_problem() -> str | None:
    """Why `sacct` fails here (its own first line), or None when it works or is absent."""
    if shutil.which("sacct") is None:
        return None
    try:
        done = subprocess.run(["sacct", "-n", "-X", "-o", "JobID", "-S", "now"],
                              capture_output=True, text=True, timeout=WAIT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sacct did not answer ({type(exc).__name__})"
    if done.returncode == 0:
        return None
    said = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return said[0] if said else f"exit code {done.returncode}"


def check_slurm(config: DictConfig) -> None:
    """For a sweep through `hydra/launcher=slurm` where sinfo exists: refuse, in one line,
    jobs the cluster cannot run; say once if sacct does not work. Other launchers: nothing."""
    node = config.hydra.launcher
    if not str(node.get("_target_", "")).endswith(SLURM_LAUNCHER):
        return
    nodes = partitions()
    if isinstance(nodes, str):
        refuse(f"hydra/launcher=slurm: SLURM does not answer here: {nodes}")
    if nodes:
        launcher = OmegaConf.to_container(node, resolve=True)
        raw = OmegaConf.to_container(node, resolve=False)
        problem = launcher_problem(launcher, nodes, raw)
        if problem:
            refuse(problem)
    reason = sacct_problem()
    if reason:
        without_sacct(reason)


class SlurmCheck(Callback):
    """`check_slurm` before a multirun launches its jobs (conf/train.yaml's hydra.callbacks)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_slurm(config)
