"""Checkpoint loading that never runs code from the file: ``torch.load(weights_only=True)`` everywhere, DeepSpeed's
own loads included.

A ``.pt`` file is a pickle, and DeepSpeed reads its checkpoints (``engine.load_checkpoint``, ``zero_to_fp32``,
``ds_to_universal``) with ``weights_only=False``, so a planted file would run arbitrary code on ``--load`` or export.
Inside :func:`weights_only_loads` every ``torch.load`` is forced to PyTorch's restricted unpickler, which accepts
tensors, containers and primitives plus the few DeepSpeed types listed in ``DEEPSPEED_GLOBALS`` (found by saving
ZeRO 0–3 checkpoints, fp32 and bf16, and asking ``torch.serialization.get_unsafe_globals_in_checkpoint``). Anything
else stops the load with a :class:`CheckpointError` naming the file and the refused type.

``python -m megatron_mobilellm.safe_load MODULE ARGS...`` runs a module (e.g. ``deepspeed.checkpoint.ds_to_universal``)
with the same guard, for the loads that happen in a subprocess.
"""

from __future__ import annotations

import importlib
import pickle
import re
import runpy
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from megatron_mobilellm.errors import CheckpointError

DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _resolve(name: str) -> Any | None:
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):  # a DeepSpeed version without it stores none of them either
        return None


def _refused_global(error: Exception) -> str:
    """The type PyTorch's restricted unpickler refused, from its message."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error)) or re.search(r"Unsupported global: ([\w. ]+)", str(error))
    return found.group(1) if found else str(error).splitlines()[0]


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in this block, whatever it asks for, unpickles only tensors and the allow-listed types."""
    original = torch.load
    allowed = [g for g in map(_resolve, DEEPSPEED_GLOBALS) if g is not None]

    def guarded(f, *args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        with torch.serialization.safe_globals(allowed):
            try:
                return original(f, *args, **kwargs)
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"refusing to load {f}: it contains {_refused_global(e)}, which is not a "
                                      "tensor or a type DeepSpeed stores (a tampered or foreign checkpoint)") from None

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = original


def load(path, **kwargs) -> Any:
    """``torch.load`` of one checkpoint file under the guard."""
    with weights_only_loads():
        return torch.load(path, map_location="cpu", **kwargs)


if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    try:
        with weights_only_loads():
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
