"""Whether a server answers, found out within a bounded wait, before anything depends on it.

A preflight check asks this of an MLflow tracking server and of a dataset's download mirrors, so
that a machine without network (or a server that is down) costs one line and a couple of seconds
instead of a run folder left `failed`. HTTP servers get one request through urllib (so the
environment's proxy settings apply, as they do to the real traffic); database servers a TCP
connection, opened and closed. Name resolution counts towards the wait: each probe runs in a
thread, since getaddrinfo has no timeout of its own. Answers are remembered for a minute, so the
preflight of a sweep asks once per server, and a notebook that waits for the network sees it
come back.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TypeVar

WAIT_S = 2.0  # seconds a probe waits for an answer
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
REMEMBER_S = 60.0  # seconds an answer is remembered
T = TypeVar("T")


def remembered(probe: Callable[..., T]) -> Callable[..., T]:
    """`probe` with its answers remembered for REMEMBER_S seconds, per argument tuple."""
    answers: dict[tuple, tuple[float, T]] = {}

    @functools.wraps(probe)
    def ask(*args):
        now = time.monotonic()
        if args not in answers or now - answers[args][0] > REMEMBER_S:
            answers[args] = now, probe(*args)
        return answers[args][1]

    ask.forget = answers.clear  # type: ignore[attr-defined]
    return ask


def _within(probe: Callable[[], T], wait_s: float) -> T | str:
    """`probe()`'s result, or a sentence when it has not returned within `wait_s` seconds (it
    then finishes in a daemon thread, unobserved)."""
    outcome: list[T] = []
    thread = threading.Thread(target=lambda: outcome.append(probe()), daemon=True)
    thread.start()
    thread.join(wait_s + 0.5)
    return outcome[0] if outcome else f"no answer within {wait_s:g} s"


def _reason(exc: BaseException) -> str:
    """An OS or URL error in a few words: `Connection refused`, `its name does not resolve`."""
    inner = getattr(exc, "reason", exc)
    if isinstance(inner, socket.gaierror):
        return "its name does not resolve"
    if isinstance(inner, TimeoutError):
        return "no answer in time"
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    return str(inner) or type(inner).__name__


@remembered
def http_answer(url: str, method: str = "GET", wait_s: float = WAIT_S) -> tuple[int, str] | str:
    """(HTTP status, the first 2 kB of the body) of one request to `url`, error statuses
    included; a sentence saying why nothing answered within `wait_s` seconds otherwise."""

    def probe() -> tuple[int, str] | str:
        request = urllib.request.Request(url, method=method,
                                         headers={"User-Agent": "bioexp-preflight"})
        try:
            with urllib.request.urlopen(request, timeout=wait_s) as response:  # noqa: S310
                return response.status, response.read(2048).decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(2048).decode(errors="replace") if exc.fp else ""
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return _reason(exc)

    return _within(probe, wait_s)


@remembered
def tcp_unreachable(url: str, wait_s: float = WAIT_S) -> str | None:
    """Why the host and port of `url` (a database URI) take no TCP connection within `wait_s`
    seconds, naming them; None when they do, or when the URI names no host."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.split("+")[0])
    except ValueError:
        port = None
    if not parts.hostname or not port:
        return None

    def probe() -> str | None:
        try:
            with socket.create_connection((parts.hostname, port), timeout=wait_s):
                return None
        except OSError as exc:
            return _reason(exc)

    reason = _within(probe, wait_s)
    return None if reason is None else f"{parts.hostname}:{port} does not answer ({reason})"
