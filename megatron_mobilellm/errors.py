"""The errors a user can fix, shared by every layer; a CLI prints their message as one ``error:`` line.

They live here, below everything else, so that checkpoint or data code can raise them without importing the
command-line module (or the model) that used to define them.
"""


class ConfigError(ValueError):
    """A command line or DeepSpeed config that cannot work; the message names the flag or file."""


class CheckpointError(ValueError):
    """A checkpoint directory, tag or file that cannot be read; the message names it."""


class DatasetFormatError(ValueError):
    """A ``.bin``/``.idx`` pair that is missing or does not follow the format; the message names the file."""


class EvaluationError(ValueError):
    """Input that cannot be evaluated as asked (missing task file, wrong schema, not a Llama export); names it."""


def user_message(error: BaseException) -> str:
    """The error's own message, also when a DataLoader worker raised it: torch then re-raises it with the worker's
    whole traceback as the message, of which the user needs only the last line."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(f"{type(error).__module__}.{type(error).__name__}: ") else last
