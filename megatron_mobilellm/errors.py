"""The errors a user can fix, shared by every layer, and the one way a CLI reports them.

They live here, below everything else, so that checkpoint or data code can raise them without importing the
command-line module (or the model) that used to define them. ``cli_main`` turns any of them into one line,
``error: <what> (<path or flag>)``, and exit status 1: a traceback would bury the one thing the user must change.
``MOBILELLM_DEBUG=1`` lets the exception through to show where it came from. ``ArgumentParser`` reports a bad
command line the same way.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from typing import Callable, NoReturn

DEBUG_ENV = "MOBILELLM_DEBUG"


class UserError(Exception):
    """Bad input the user can fix; the message says what and names the path or flag."""


class ConfigError(UserError, ValueError):
    """A command line or DeepSpeed config that cannot work; the message names the flag or file."""


class CheckpointError(UserError, ValueError):
    """A checkpoint directory, tag or file that cannot be read; the message names it."""


class DatasetFormatError(UserError, ValueError):
    """A ``.bin``/``.idx`` pair that is missing or does not follow the format; the message names the file."""


class EvaluationError(UserError, ValueError):
    """Input that cannot be evaluated as asked (missing task file, wrong schema, not a Llama export); names it."""


def user_message(error: BaseException) -> str:
    """The error's own message, also when a DataLoader worker raised it: torch then re-raises it with the worker's
    whole traceback as the message, of which the user needs only the last line."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(f"{type(error).__module__}.{type(error).__name__}: ") else last


def cli_main(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command-line ``main``: a ``UserError`` prints one ``error:`` line to stderr and exits with status 1
    (SystemExit, so callers and tests see the same exit as the shell)."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as e:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return run


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are the same one line and exit 1 as every other bad input (``--help`` still shows the
    usage), instead of the usage block and exit 2."""

    def error(self, message: str) -> NoReturn:
        flag = re.match(r"argument ([^:]+): (.*)", message, re.S)
        line = f"{flag.group(2)} ({flag.group(1)})" if flag else message
        print(f"error: {line}; see --help", file=sys.stderr, flush=True)
        raise SystemExit(1)
