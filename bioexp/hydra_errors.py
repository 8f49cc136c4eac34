"""Hydra's and OmegaConf's complaints about `bioexp train`'s overrides, as one sentence.

Hydra prints a mistake in an override as a block of lines: a caret under the override, the
config search path, a hint about HYDRA_FULL_ERROR. `run_app` runs the `@hydra.main` app with
HYDRA_FULL_ERROR=1, so that Hydra raises the mistake instead of printing it, and `explain` says
it in one sentence that names the override and, for a key that does not exist, the closest key
that does (for a model's key, the model's own settings). An error of a job itself is reported
as Hydra reports it. A user who sets HYDRA_FULL_ERROR=1 gets Hydra's own behaviour.
"""

from __future__ import annotations

import difflib
import itertools
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from hydra.errors import (
    CompactHydraException,
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from bioexp.errors import BioexpError, refuse

FULL_ERROR = "HYDRA_FULL_ERROR"
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"
MULTIRUN_FLAGS = ("-m", "--multirun")
# Flags that show something instead of running; Hydra takes none of them together with -m.
SHOW_FLAGS = ("-c", "--cfg", "-i", "--info", "-sc", "--shell-completion")


def run_app(app: Callable[[], Any], args: Sequence[str]) -> None:
    """Run the Hydra app of `bioexp train ARGS`. Hydra's or OmegaConf's complaint about the
    command line ends in `bioexp: error: <one sentence>` and exit code 2; an exception of a
    job is printed as Hydra prints it (exit code 1); SystemExit passes through."""
    if os.environ.get(FULL_ERROR) == "1":  # the user asked for Hydra's full report
        app()
        return
    try:
        with _environment(FULL_ERROR, "1"):
            app()
    except BioexpError:
        raise
    except Exception as exc:
        if _a_mistake(exc) and not _raised_by_job(exc):
            refuse(explain(exc, args))
        if not _passed(exc, "run_and_report"):
            raise  # Hydra did not report it either (`--help | head`: BrokenPipeError)
        _report_as_hydra(exc)


def single_run_flags(args: Sequence[str]) -> list[str]:
    """`-m` beside `--cfg`, `--info` or `--shell-completion` is dropped (Hydra refuses the pair
    with a traceback): they show one run's config, which a sweep's values make ambiguous, and
    that Hydra then says (see `explain`)."""
    return [a for a in args if a not in MULTIRUN_FLAGS] if _shows(args) else list(args)


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _frames(tb: TracebackType | None) -> Iterator[TracebackType]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _passed(exc: BaseException, function: str) -> bool:
    """Whether `exc` passed through a frame of a function of that name."""
    return any(tb.tb_frame.f_code.co_name == function for tb in _frames(exc.__traceback__))


def _raised_by_job(exc: BaseException) -> bool:
    """Whether `exc` is a job's own exception: Hydra re-raises those from JobReturn's
    `return_value` (after its line `Error executing job with overrides: ...`)."""
    return any(tb.tb_frame.f_code.co_name == "return_value"
               and Path(tb.tb_frame.f_code.co_filename).parts[-3:] == ("hydra", "core", "utils.py")
               for tb in _frames(exc.__traceback__))


def _a_mistake(exc: BaseException) -> bool:
    """Hydra's and OmegaConf's errors, and the ValueErrors Hydra raises itself (an override
    `=3`, `-m` beside `--run`)."""
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return True
    frames = list(_frames(exc.__traceback__))
    module = frames[-1].tb_frame.f_globals.get("__name__", "") if frames else ""
    return isinstance(exc, ValueError) and module.startswith(("hydra.", "omegaconf."))


def _report_as_hydra(exc: BaseException) -> None:
    """What Hydra prints without HYDRA_FULL_ERROR (hydra._internal.utils.run_and_report): the
    message of a compact Hydra error, else the traceback below Hydra's `run_job` without
    OmegaConf's frames (the whole traceback when it did not pass run_job); exit code 1."""
    if isinstance(exc, CompactHydraException):
        sys.stderr.write(str(exc) + os.linesep)
        if isinstance(exc.__cause__, OmegaConfBaseException):
            sys.stderr.write(str(exc.__cause__) + os.linesep)
    else:
        frames = list(_frames(exc.__traceback__))
        below = [i + 1 for i, tb in enumerate(frames) if tb.tb_frame.f_code.co_name == "run_job"]
        if not below or below[0] >= len(frames):
            traceback.print_exception(type(exc), exc, exc.__traceback__)
            sys.exit(1)
        frames = frames[below[0]:]
        omegaconf = next((i for i, tb in enumerate(frames)
                          if tb.tb_frame.f_globals.get("__name__", "").startswith("omegaconf.")),
                         len(frames))
        traceback.print_exception(type(exc), exc, frames[0], limit=max(omegaconf, 1))
    sys.stderr.write(f"\nSet the environment variable {FULL_ERROR}=1 for a complete stack trace.\n")
    sys.exit(1)


# ---------------------------------------------------------------------------------------------
# the sentences


def explain(exc: BaseException, args: Sequence[str]) -> str:
    """One sentence for Hydra's or OmegaConf's complaint `exc` about the overrides `args`."""
    message = str(exc)
    if isinstance(exc, OverrideParseException):
        return unparseable(exc.override, message)
    if isinstance(exc, MissingConfigException) and "/" in (exc.missing_cfg_file or ""):
        return unknown_option(exc.missing_cfg_file, exc.options, args)
    if isinstance(exc, ConfigCompositionException):
        cause = exc.__cause__
        if message.startswith("Could not override '") and isinstance(
                cause, (ConfigKeyError, ConfigAttributeError)):
            return unknown_key(message.split("'")[1], args)
        if message.startswith("Could not append to config. An item is already at '"):
            key = message.split("'")[1]
            given = next((a for a in args if a.lstrip("+").split("=", 1)[0] == key), key)
            return (f"{given}: {key} is already in the config; set it without the +: "
                    f"{given.lstrip('+')}")
        if message.startswith("Ambiguous value for argument '"):
            given = message.split("'")[1]
            key, _, value = given.partition("=")
            if _shows(args):
                return (f"{given} gives {key} several values, and {_shows(args)} shows the "
                        f"config of one run: give one value (or a list, {key}=[{value}])")
            return (f"{given} gives {key} several values: add -m to run one job for each "
                    f"(bioexp train -m ...), or write a list as {key}=[{value}]")
        if message.startswith("Error merging override ") and cause is not None:
            given = message.removeprefix("Error merging override ").strip()
            return f"{given}: {_merge_problem(given, str(cause))}"
    keyless = next((a for a in args if a.startswith("=")), None)
    if keyless and "Config group override must be" in message:
        return f"cannot read the override {keyless}: it has no key; write key=value"
    if message.startswith("Only one of --run, --multirun"):
        return "give only one of --run, --multirun (-m), --cfg, --info and --shell-completion"
    if isinstance(exc, OmegaConfBaseException) and getattr(exc, "full_key", None):
        return f"{exc.full_key}: {one_line(message)}"
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause) not in message:
        message = f"{message}\n{cause}"
    return one_line(message)


def _shows(args: Sequence[str]) -> str | None:
    """The flag among `args` that shows a config instead of running (`--cfg`, `--info`)."""
    return next((a.split("=", 1)[0] for a in args
                 if a in SHOW_FLAGS or a.split("=", 1)[0] in SHOW_FLAGS[1::2]), None)


def _merge_problem(given: str, cause: str) -> str:
    """OmegaConf's reason why the value of override `given` does not fit its key."""
    kinds = {"DictConfig": "a dict", "ListConfig": "a list"}
    words = cause.split()
    if cause.startswith("Cannot merge ") and len(words) > 4 and words[2] in kinds:
        key = given.split("=", 1)[0].lstrip("+~")
        return f"{key} holds {kinds.get(words[4], words[4])}, not {kinds[words[2]]}"
    return one_line(cause)


def one_line(message: str) -> str:
    """Hydra's multi-line complaint as one sentence: its lines joined, lists (the options of
    a config group) inlined, the config search path, OmegaConf's key details and Hydra's
    pointers to its documentation left out."""
    parts: list[list[str]] = []
    for line in message.split("Config search path:")[0].splitlines():
        text = line.strip()
        if not text or text.startswith(("full_key:", "object_type=", "reference_type=", "See https",
                                        f"Set the environment variable {FULL_ERROR}")):
            continue
        if line[0].isspace() and parts and parts[-1][0].endswith(":"):
            parts[-1].append(text)
        else:
            parts.append([text])
    return "; ".join(f"{p[0]} {', '.join(p[1:])}" if p[1:] else p[0].rstrip(".") for p in parts)


def unparseable(override: str, message: str) -> str:
    """Why Hydra's override grammar cannot read `override`, without its caret diagram."""
    lines = message.splitlines()
    prefix = "LexerNoViableAltException: "
    why = next((ln.strip() for ln in lines if ln.strip() and not ln.startswith(
        ("Error parsing override", "See https"))), "")
    if why.startswith(prefix) and len(lines) > 1 and "^" in lines[1]:
        at = lines[1].index("^") - len(prefix)
        char = override[at] if 0 <= at < len(override) else ""
        if char in "'\"" and override.count(char) % 2:
            why = f"its quote {char} is not closed"
        else:
            why = f"{char!r} cannot appear there" if char else "it ends too early"
    elif override.count("[") != override.count("]"):
        why = "its brackets [ ] do not pair up"
    elif override.count("{") != override.count("}"):
        why = "its braces { } do not pair up"
    elif why == "missing EQUAL at '<EOF>'":
        why = "it has no =; write key=value"
    if why.endswith("cannot appear there"):
        why += " (quote a value with such characters: key='...')"
    return f"cannot read the override {override}: {why}; Hydra's override grammar: {GRAMMAR}"


def unknown_option(missing: str, options: Sequence[str] | None, args: Sequence[str]) -> str:
    """`model=nosuch`: the group's options, and the closest one."""
    group, _, name = missing.rpartition("/")
    if options is None:
        from bioexp.config import option_names

        options = option_names(group)
    options = [o for o in options if not o.startswith("_")]
    given = next((a for a in args if a.lstrip("+~").split("=", 1)[0] == group), f"{group}={name}")
    guess = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean {group}={guess[0]}?)" if guess else ""
    return f"{given}: {group} has no option {name}{hint}; available: {', '.join(options)}"


def unknown_key(key: str, args: Sequence[str]) -> str:
    """A key that is not in the config: the closest one, and for a key of the model, the
    model's own settings."""
    cfg = composed_without(key, args)
    if cfg is None:
        return f"{key} is not a key of the config (bioexp train --cfg job shows them all)"
    parts = key.split(".")
    model = cfg.get("model")
    if parts[0] == "model" and len(parts) > 1 and isinstance(model, DictConfig) \
            and parts[1] not in model:
        settings = [k for k in model if k != "name"]
        guess = difflib.get_close_matches(parts[1], settings, n=1)
        hint = f"; did you mean model.{guess[0]}?" if guess else ""
        return (f"model.{parts[1]} is not a setting of model {model.get('name')}{hint} (its "
                f"settings: {', '.join(settings)}; bioexp list model={model.get('name')} "
                "describes them)")
    parent = ".".join(parts[:-1])
    node = OmegaConf.select(cfg, parent) if parent else None
    siblings = [str(k) for k in node] if isinstance(node, DictConfig) else []
    guess = [f"{parent}.{g}" for g in difflib.get_close_matches(parts[-1], siblings, n=1)
             if f"{parent}.{g}" != key]
    if not guess:
        names = [k for k in _keys(cfg)
                 if k != key and k.startswith("hydra.") == key.startswith("hydra.")]
        guess = difflib.get_close_matches(key, names, n=1, cutoff=0.75)
    hint = f"; did you mean {guess[0]}?" if guess else ""
    choice = OmegaConf.select(cfg, f"hydra.runtime.choices.{parts[0]}", default=None)
    where = f"with {parts[0]}={choice}, " if isinstance(choice, str) and parent else ""
    known = (f"{where}{parent} has {', '.join(siblings)}" if siblings
             else "bioexp train --cfg job shows them all")
    return f"{key} is not a key of the config{hint} ({known})"


def _keys(cfg: DictConfig) -> list[str]:
    """Every dotted key of `cfg`, its inner nodes included, without resolving it."""
    keys: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                keys.append(f"{prefix}{k}")
                walk(v, f"{prefix}{k}.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return keys


def composed_without(key: str, args: Sequence[str]) -> DictConfig | None:
    """The config of the command line without the overrides of `key`, Hydra's node included:
    the keys it has and the model it chose. For a sweep, the config of its first job that lacks
    `key` (where Hydra stopped). With fewer overrides when that fails; None when not even the
    defaults compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bioexp.config import config_dir

    others = [a for a in args if "=" in a and a.split("=", 1)[0].lstrip("+~") != key]
    jobs = list(itertools.islice(sweep_product(others) or iter(()), 20))
    groups = [[a for a in jobs[0] if "." not in a.split("=", 1)[0]]] if jobs else []
    GlobalHydra.instance().clear()
    found = None
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for overrides in [*jobs, *groups, []]:
            try:
                cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
            except Exception:  # the next job, or fewer overrides
                continue
            found = found or cfg
            if OmegaConf.select(cfg, key, default=_MISSING,
                                throw_on_resolution_failure=False) is _MISSING:
                return cfg
    return found


_MISSING = object()


def sweep_product(arguments: Sequence[str]) -> Iterator[list[str]] | None:
    """The jobs of a grid sweep of the overrides `arguments`, as Hydra's basic sweeper makes
    them: the product of every key's values, a later override of a key replacing an earlier
    one; flags and overrides that do not parse are left out. None when one is a sweep the basic
    sweeper cannot run (`interval(...)`, which Hydra then refuses itself)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    choices: dict[str, list[str]] = {}  # key -> its overrides
    for arg in arguments:
        if arg.startswith("-"):
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue
        if override.is_sweep_override() and not override.is_discrete_sweep():
            return None
        key = override.get_key_element()
        values = (list(override.sweep_string_iterator()) if override.is_discrete_sweep()
                  else [override.get_value_element_as_str()])
        choices[key] = [f"{key}={value}" for value in values]
    return (list(job) for job in itertools.product(*choices.values()))
