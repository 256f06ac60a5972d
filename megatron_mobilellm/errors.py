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
