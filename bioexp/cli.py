"""The `bioexp` command: a dispatcher over subcommands.

`bioexp train ...` hands the rest of the command line to a real `@hydra.main` application (the
subcommand is removed from sys.argv first), so multirun, `--cfg`, `--help`, `--info` and Hydra's
launcher and sweeper plugins all work as documented by Hydra.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from bioexp import __version__
from bioexp.errors import BioexpError, refuse

COMMANDS = {
    "train": "train a model: bioexp train [hydra overrides], e.g. model=cnn data=mnist seed=1",
    "list": "list the registered models, datasets, schedules and recipes",
    "data": "find (or download) a dataset and say where it is: bioexp data fashion_mnist",
    "compare": "tabulate run folders side by side: bioexp compare outputs/multirun --by model",
    "eval": "FGSM robustness, representations and costs of trained runs: bioexp eval RUN...",
    "explain": "attribution maps and their faithfulness (Captum): bioexp explain RUN...",
}

USAGE = "usage: bioexp [-h] [--version] {" + ",".join(COMMANDS) + "} ..."


def _help() -> str:
    lines = [USAGE, "", "Experiment runner for biologically plausible learning.", "",
             "commands:"]
    lines += [f"  {name:<8}{text}" for name, text in COMMANDS.items()]
    lines += ["", "`bioexp train --help` shows the config groups and Hydra's options;",
              "`bioexp COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def register_resolvers() -> None:
    """The resolvers of conf/hydra/launcher/slurm.yaml: `${bioexp.gpus:${device}}` asks SLURM for
    one GPU when the run's device is CUDA (none for cpu and auto), `${bioexp.cpus:${threads}}` for
    as many cores as the run's torch threads (1 when threads is null)."""
    from omegaconf import OmegaConf

    resolvers = {"bioexp.gpus": lambda device: int(str(device).startswith("cuda")),
                 "bioexp.cpus": lambda threads: 1 if threads is None else int(threads)}
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


class SacctOnce(logging.Filter):
    """submitit asks `sacct` for the states of its SLURM jobs now and then. On a cluster that keeps
    no job accounting every call fails with the same warning; this filter on the `submitit`
    logger drops them, and at the first one `bioexp.slurm.without_sacct` says so once, in words,
    and stops submitit calling sacct (whose own complaint would follow every poll); submitit
    still sees each job end by its result file. (`bioexp.slurm.SlurmCheck` usually finds out
    before the first poll.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" not in str(record.msg):
            return True
        from bioexp.slurm import without_sacct

        detail = record.getMessage().split("Bypassing sacct error", 1)[1].split(", status")[0]
        without_sacct(detail.strip().rstrip(",") or "it failed")
        return False


def train_command(args: Sequence[str]) -> None:
    from bioexp.hydra_errors import run_app, single_run_flags
    from bioexp.overrides import override_problem, resume_arguments

    problem = override_problem(args)
    if problem:
        refuse(problem)
    args = single_run_flags(resume_arguments(args))
    if list(args) in (["--help"], ["-h"]):  # Hydra's own help takes 0.7 s to list the groups
        from bioexp.app import help_text

        print(help_text())
        return
    sys.argv = ["bioexp train", *args]
    register_resolvers()
    logging.getLogger("submitit").addFilter(SacctOnce())
    from bioexp.app import main as hydra_main

    # Hydra's complaints about the overrides: one line (hydra_errors); a multirun with failed
    # jobs exits 1 here, naming them (app.SweepReport)
    run_app(lambda: hydra_main(), args)


def _table(title: str, rows: Sequence[Sequence[str]]) -> list[str]:
    """A titled table; its last column is wrapped to the terminal's width under itself."""
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(len(rows[0]) - 1)] \
        if rows else []
    indent = 2 + sum(w + 2 for w in widths)
    room = max(shutil.get_terminal_size((100, 24)).columns - indent, 30)
    lines = [f"{title}:"]
    for row in rows:
        first = "  " + "".join(f"{cell:<{w}}  " for cell, w in zip(row, widths, strict=False))
        wrapped = textwrap.wrap(row[-1], room) or [""]
        lines += [first + wrapped[0], *(" " * indent + more for more in wrapped[1:])]
    return [line.rstrip() for line in lines] if rows else [*lines, "  (none)"]


def list_model(name: str) -> None:
    """`bioexp list model=NAME`: the model's hyperparameters, defaults, values and meanings."""
    import bioexp.models  # noqa: F401  (registers the built-in models)
    from bioexp.config import model_options
    from bioexp.registry import get_model_entry

    rows, others = model_options(name)
    entry = get_model_entry(name)
    kinds = entry.kinds()
    print(f"model {name}: {entry.description}")
    print(f"set a key with model.KEY=VALUE (conf/model/{name}.yaml holds the defaults)\n")
    header = ("key", "default", "accepts", "meaning")
    table = [(key, default, kinds.get(key, "") if key != "input_scale" else "one of unit, "
              "symmetric", meaning) for key, default, meaning in rows]
    print("\n".join(_table("hyperparameters", [header, *table])))
    if others:
        print("\n".join(["", *_table("other defaults this model's config sets",
                                      [(k, str(v), "") for k, v in others.items()])]))


def list_command(args: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="bioexp list", description=COMMANDS["list"])
    parser.add_argument("model", nargs="?", metavar="model=NAME",
                        help="describe one model's hyperparameters instead")
    opts = parser.parse_args(args)
    if opts.model:
        if not opts.model.startswith("model="):
            refuse(f"bioexp list takes model=NAME (e.g. model=krotov_fc), got {opts.model!r}")
        list_model(opts.model.split("=", 1)[1])
        return
    from bioexp.config import group_options  # the YAML files' comments: no torch to import

    groups = (("model", "models (model=NAME)"),
              ("data", "datasets (data=NAME)"), ("schedule", "schedules (schedule=NAME)"),
              ("optimizer", "optimisers of the supervised phase (optimizer=NAME)"),
              ("lr_schedule", "learning-rate schedules of the supervised phase, stepped per epoch "
                              "(lr_schedule=NAME)"),
              ("experiment", "experiment recipes (experiment=NAME)"),
              ("sweep", "sweep recipes (sweep=NAME, a multirun)"),
              ("hebbian_split", "semihebb layer splits (+hebbian_split=NAME)"),
              ("hybrid", "the seed_hybrid comparison's models (+hybrid=NAME)"),
              ("bench", "rows of experiment=benchmark: a model, its budget, a control "
                        "(+bench=NAME)"),
              ("labels", "label budgets of experiment=benchmark_labels (+labels=NAME)"),
              ("hydra/launcher", "launchers (hydra/launcher=NAME; also Hydra's joblib, "
                                 "submitit_local, submitit_slurm)"))
    lines: list[str] = []
    for group, title in groups:
        lines += ["", *_table(title, [o for o in group_options(group) if not o[0].startswith("_")])]
    print("\n".join(lines[1:]))


def data_command(args: Sequence[str]) -> None:
    from bioexp.data.sources import SOURCES, find_or_download, read_arrays

    parser = argparse.ArgumentParser(prog="bioexp data", description=COMMANDS["data"])
    parser.add_argument("name", choices=sorted(SOURCES), help="dataset")
    parser.add_argument("--root", default=None, help="folder searched first (as data.root)")
    parser.add_argument("--download", action="store_true",
                        help="download with torchvision when it is not found on disk")
    opts = parser.parse_args(args)
    files = find_or_download(opts.name, opts.root, opts.download, download_option="--download")
    train_x, _, test_x, _ = read_arrays(opts.name, files)
    folder = next(iter(files.values())).parent
    print(f"{opts.name}: {len(train_x)} train and {len(test_x)} test images of shape "
          f"{'x'.join(map(str, train_x.shape[1:]))} in {folder}")


def compare_command(args: Sequence[str]) -> None:
    from bioexp import compare

    parser = argparse.ArgumentParser(prog="bioexp compare", description=COMMANDS["compare"])
    parser.add_argument("folders", nargs="+", help="run folders, or folders to search for runs")
    parser.add_argument("--by", default=None,
                        help="comma-separated keys to group by (model, data, schedule, or any "
                             "dotted config key); groups show mean, std and count")
    parser.add_argument("--metric", default="test_acc",
                        help="summary.json field that --by and --plot aggregate (default "
                             "test_acc; val_acc, best_test_acc, wall_time_s, ...; final, best "
                             "and val name the accuracies too)")
    parser.add_argument("--sort", default=None,
                        help="column to sort by (numbers largest first), e.g. test_acc or "
                             "final (the same column)")
    parser.add_argument("--md", default=None, help="also write the table to this Markdown file")
    parser.add_argument("--csv", default=None,
                        help="also write the table to this CSV file (full precision)")
    parser.add_argument("--plot", default=None,
                        help="also draw learning curves per group and a bar chart of the final "
                             "metric into this image file (.png, .pdf, .svg)")
    parser.add_argument("--width", type=int, default=None,
                        help="fit the printed table to this many columns (default: the "
                             "terminal's width, 100 when not printing to a terminal)")
    opts = parser.parse_args(args)
    runs = []
    for folder in opts.folders:
        path = Path(folder)
        if not path.is_dir():
            refuse(f"{folder} is not a folder")
        found = compare.find_runs(path)
        if not found:
            refuse(f"no runs (folders with summary.json or .hydra/config.yaml) under {folder}")
        runs += found
    by = [key.strip() for key in opts.by.split(",") if key.strip()] if opts.by else []
    by = compare.with_control(runs, by)
    metric = compare.metric_field(opts.metric)
    problems = [(f"--by {key}", compare.missing_key(runs, key)) for key in by]
    problems.append((f"--metric {opts.metric}", compare.missing_key(runs, metric, metric=True)))
    for option, problem in problems:
        if problem:
            refuse(f"{option}: {problem}")
    table = compare.group_table(runs, by, metric) if by else compare.run_table(runs)
    if opts.sort:
        try:
            table = compare.sort_table(table, opts.sort)
        except ValueError as exc:
            refuse(f"--sort: {exc}")
    width = opts.width if opts.width is not None else shutil.get_terminal_size((100, 24)).columns
    print(compare.text_table(table, width), flush=True)
    if by:
        for line in compare.mixed_groups(runs, by):  # means over runs that differ in more
            print(f"warning: {line}", file=sys.stderr)
    if opts.md:
        _write(opts.md, lambda path: path.write_text(compare.markdown_table(table) + "\n"))
    if opts.csv:
        _write(opts.csv, lambda path: compare.write_csv(path, table))
    if opts.plot:
        _write(opts.plot, lambda path: _plot_comparison(runs, by, metric, path))


FIGURE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def _check_figure_file(name: str | None) -> None:
    """Before any work: a `--plot FILE` that could not be written is one line now, not an error
    after every run folder has been written."""
    if name is None:
        return
    from bioexp.folders import unwritable

    path = Path(name)
    if path.suffix.lower().lstrip(".") not in FIGURE_FORMATS:
        refuse(f"--plot {name}: the file name must end in one of "
               f"{', '.join('.' + f for f in FIGURE_FORMATS)}")
    why = unwritable(path.parent)
    if why:
        refuse(f"cannot write {name}: {why}")


def _write(name: str, write: Callable[[Path], object]) -> None:
    """Write an output file through `write`, or fail with one line that names it."""
    path = Path(name)
    try:
        write(path)
    except (OSError, ValueError) as exc:
        refuse(f"cannot write {name}: {getattr(exc, 'strerror', None) or exc}")
    print(f"wrote {name}", file=sys.stderr)


def _plot_comparison(runs: list, by: list[str], metric: str, path: Path) -> None:
    from bioexp import compare
    from bioexp.plots import plot_comparison

    groups = compare.plot_groups(runs, by)
    curve_metric = metric if metric in ("test_acc", "val_acc", "train_acc") else "test_acc"
    curves = {label: [compare.learning_curve(r, curve_metric) for r in members if r.completed]
              for label, members in groups.items()}
    finals = {label: [v for v in (r.number(metric) for r in members if r.completed)
                      if v is not None] for label, members in groups.items()}
    plot_comparison(curves, finals, path, metric=metric,
                    title=f"{len(runs)} runs in {len(groups)} groups")


def eval_command(args: Sequence[str]) -> None:
    from bioexp import compare, evaluate
    from bioexp.plots import plot_fgsm
    from bioexp.runs import load_run

    parser = argparse.ArgumentParser(prog="bioexp eval", description=COMMANDS["eval"])
    parser.add_argument("runs", nargs="+", help="run folders (each needs checkpoints/last.pt)")
    parser.add_argument("--eps", default=",".join(map(str, evaluate.DEFAULT_EPS)),
                        help="comma-separated FGSM strengths, as fractions of the pixel range "
                             "(default 0,0.05,...,0.3)")
    parser.add_argument("--test-limit", type=int, default=None,
                        help="attack a seeded subset of this many test images (default: all)")
    parser.add_argument("--embed-samples", type=int, default=2000,
                        help="test images in the PCA picture of the last hidden layer")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--plot", default=None,
                        help="also overlay the FGSM curves of all the runs in this image file")
    opts = parser.parse_args(args)
    try:
        eps = [float(e) for e in opts.eps.split(",") if e.strip()]
    except ValueError:
        refuse(f"--eps must be comma-separated numbers, got {opts.eps!r}")
    if not eps or any(not 0 <= e <= 1 for e in eps):
        refuse(f"--eps values must lie in [0, 1] (fractions of the pixel range), got {opts.eps}")
    if opts.test_limit is not None and opts.test_limit < 1:
        refuse(f"--test-limit must be at least 1, got {opts.test_limit}")
    _check_figure_file(opts.plot)
    from bioexp.checks import resolve_device

    device = resolve_device(opts.device)
    curves, runs = {}, []
    for folder in opts.runs:
        run = load_run(Path(folder), device, opts.test_limit)
        result = evaluate.evaluate_run(run, eps, opts.embed_samples)
        curves[run.name] = (eps, result["fgsm"]["accuracy"])
        runs.append(compare.read_run(run.path))
        print(f"{run.path}: wrote eval/fgsm.json, eval/representation.json, "
              "eval/efficiency.json and plots/{fgsm,embedding,confusion}.png", file=sys.stderr,
              flush=True)
    width = shutil.get_terminal_size((100, 24)).columns  # as bioexp compare fits its table
    print(compare.text_table(compare.efficiency_table(runs, eps), width), flush=True)
    if opts.plot:
        _write(opts.plot, lambda path: plot_fgsm(curves, path))


def _explain_parser() -> argparse.ArgumentParser:
    from bioexp.attribution import METHODS, Settings

    defaults = Settings()
    parser = argparse.ArgumentParser(prog="bioexp explain", description=COMMANDS["explain"])
    parser.add_argument("runs", nargs="+", help="run folders (each needs checkpoints/last.pt)")
    parser.add_argument("--method", default=",".join(METHODS),
                        help="comma-separated methods: ig (Integrated Gradients), saliency "
                             "(gradient x input), occlusion (default: all three)")
    parser.add_argument("--images", type=int, default=64,
                        help="test images to explain, a few per class, the same for every run "
                             "(default 64)")
    parser.add_argument("--target", choices=("predicted", "true"), default="predicted",
                        help="the class each map explains (default: the predicted one)")
    parser.add_argument("--plot", default=None,
                        help="also draw the runs' maps over the same images, a row per run "
                             "and method, into this image file")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--ig-steps", type=int, default=defaults.ig_steps,
                        help=f"Integrated Gradients' path points (default {defaults.ig_steps})")
    parser.add_argument("--window", type=int, default=defaults.window,
                        help=f"occlusion's window in pixels (default {defaults.window})")
    parser.add_argument("--stride", type=int, default=defaults.stride,
                        help=f"occlusion's stride in pixels (default {defaults.stride})")
    parser.add_argument("--deletion-steps", type=int, default=defaults.deletion_steps,
                        help=f"steps of the deletion curve (default {defaults.deletion_steps})")
    parser.add_argument("--infidelity-samples", type=int, default=defaults.infidelity_samples,
                        help="perturbations per image for infidelity (default "
                             f"{defaults.infidelity_samples})")
    parser.add_argument("--sensitivity-samples", type=int,
                        default=defaults.sensitivity_samples,
                        help="perturbations per image for max-sensitivity, each a new "
                             f"explanation (default {defaults.sensitivity_samples}; 0: skip it)")
    return parser


def explain_command(args: Sequence[str]) -> None:
    from bioexp import attribution

    opts = _explain_parser().parse_args(args)
    methods = attribution.parse_methods(opts.method)
    for option in ("images", "ig_steps", "window", "stride", "deletion_steps",
                   "infidelity_samples"):
        if getattr(opts, option) < 1:
            refuse(f"--{option.replace('_', '-')} must be at least 1, "
                   f"got {getattr(opts, option)}")
    if opts.sensitivity_samples < 0:
        refuse(f"--sensitivity-samples must be at least 0, got {opts.sensitivity_samples}")
    _check_figure_file(opts.plot)
    attribution.require_captum()
    from bioexp.checks import resolve_device

    settings = attribution.Settings(
        ig_steps=opts.ig_steps, window=opts.window, stride=opts.stride,
        deletion_steps=opts.deletion_steps, infidelity_samples=opts.infidelity_samples,
        sensitivity_samples=opts.sensitivity_samples)
    subjects = attribution.load_subjects([Path(f) for f in opts.runs], resolve_device(opts.device),
                                         opts.images, settings.seed)  # every check, then work
    explained = [(s, attribution.explain_subject(s, methods, opts.target, settings))
                 for s in subjects]
    written = [attribution.write_explanation(s, e) for s, e in explained]
    from bioexp import compare

    for path, (_, explanation) in zip(written, explained, strict=True):
        record = explanation.record
        gradient = (f"; ig and saliency by the {record['gradient']}"
                    if set(methods) & set(attribution.GRADIENT_METHODS) else "")
        print(f"{path}: the maps explain {record['explains']}{gradient}; wrote "
              "eval/attribution.json, plots/attributions.png and plots/attribution_classes.png",
              file=sys.stderr, flush=True)
    width = shutil.get_terminal_size((100, 24)).columns
    table = compare.attribution_table([compare.read_run(p) for p in written])
    print(compare.text_table(table, width), flush=True)
    if opts.plot:
        _write(opts.plot, lambda path: attribution.plot_runs(explained, path))


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_help())
        sys.exit(0 if args else 2)
    if args[0] in ("-V", "--version"):
        print(f"bioexp {__version__}")
        return
    command, rest = args[0], args[1:]
    handlers = {"train": train_command, "list": list_command, "data": data_command,
                "compare": compare_command, "eval": eval_command, "explain": explain_command}
    if command not in handlers:
        refuse(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    if command != "train":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        handlers[command](rest)
    except BioexpError as exc:
        refuse(str(exc), exc.exit_code)
    except BrokenPipeError:  # `bioexp compare ... | head` closed the pipe: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
