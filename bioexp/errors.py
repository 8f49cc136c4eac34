"""User-facing errors: each one is reported as a single sentence, without a traceback."""

import sys


class BioexpError(Exception):
    """A mistake in the user's input or environment that bioexp reports in one sentence.

    The message is that sentence: the commands print it as `bioexp: error: <message>` and exit
    with `exit_code`; from Python (`bioexp.run`, `bioexp.load_run`) it is raised as it is.
    Catch BioexpError for any of the kinds below.

    Attributes:
        exit_code: The exit status of a command that stops on this error (2, as for a usage
            error).
    """

    exit_code = 2


class ConfigError(BioexpError):
    """A config value that is unknown, of the wrong type or out of range."""


class DataError(BioexpError):
    """A dataset that cannot be found, read or downloaded."""


class DeviceError(BioexpError):
    """A device that was asked for but is not available."""


def refuse(message: str, code: int = 2) -> None:
    """End the command with `bioexp: error: <message>` on stderr and exit code `code`.

    Args:
        message: The one sentence to print.
        code: The exit status.

    Raises:
        SystemExit: Always (`sys.exit(code)`).
    """
    print(f"bioexp: error: {message}", file=sys.stderr)
    sys.exit(code)
