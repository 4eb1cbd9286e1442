"""Load checkpoints without running anything pickled in them.

``safe_torch_load`` is ``torch.load(weights_only=True)`` plus a short allowlist of plain-data types
that real checkpoints carry. A file that needs anything else (a function, a class with a custom
``__reduce__``, dill's code objects) is refused before any of it runs, with the one-time fix: convert a
file you trust in place, so that every config naming it keeps working,
``python -m equidiff.classifiers.convert --trust-pickle --in-place FILE``.

The allowlist:

* ``argparse.Namespace``: training scripts save their ``args``. It is built with ``__new__`` and its
  ``__dict__`` filled with values that were themselves loaded under the same rules.
* numpy scalars (``np.float64(0.93)`` as a best accuracy, ``np.int64`` step counts), through stand-ins
  registered under the names pickles use (``numpy.dtype``, ``numpy.core.multiarray.scalar`` and
  numpy 2's ``numpy._core.multiarray.scalar``). The stand-ins accept only fixed-size plain types (bool,
  integers, floats, complex, bytes, str) and rebuild the dtype from its type code. numpy's own
  ``dtype.__setstate__`` takes forged fields and flags: with the real ``numpy.dtype``, dtype classes and
  ``scalar`` allowlisted, a crafted file yields a structured scalar whose object field is a pointer
  read from the file, and printing the loaded checkpoint crashes the interpreter (checked with numpy
  2.4). numpy arrays (``numpy.ndarray``) stay out for the same reason:
  ``np.ndarray((1,), object, buffer=...)`` reads pointers from bytes.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equidiff.errors import ConfigError

CONVERT_IN_PLACE = "python -m equidiff.classifiers.convert --trust-pickle --in-place {path}"


class UnsafeCheckpointError(ConfigError):
    """A checkpoint that needs pickled code or classes to load; refused without running any of it."""


_PLAIN_NUMPY_KINDS = "biufcSU"  # bool, signed and unsigned integers, floats, complex, bytes, str


class _NumpyDType:
    """Stands in for ``numpy.dtype(spec, align, copy)`` when unpickling; keeps type code and byte order."""

    def __init__(self, spec, align=False, copy=False):
        self.spec, self.byteorder = spec, "="

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
            self.byteorder = state[1]

    def resolve(self) -> np.dtype:
        try:
            dtype = np.dtype(self.spec) if isinstance(self.spec, str) else None
        except (TypeError, ValueError):
            dtype = None
        plain = dtype is not None and dtype.kind in _PLAIN_NUMPY_KINDS and dtype.fields is None
        if not plain or dtype.subdtype:
            raise pickle.UnpicklingError(f"numpy dtype {self.spec!r} is not a plain numeric or string type")
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


def _numpy_scalar(dtype, data=None):
    """Stands in for ``numpy.core.multiarray.scalar(dtype, bytes)``: plain types only."""
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("only numpy scalars of plain numeric or string types can be loaded")
    dtype = dtype.resolve()
    if len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"numpy {dtype} scalar needs {dtype.itemsize} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype)[0]


def allowed_globals() -> list:
    """The globals ``safe_torch_load`` allows beyond torch's own (tensors, dicts, lists, numbers, strings)."""
    return [
        argparse.Namespace,
        (_NumpyDType, "numpy.dtype"),
        (_numpy_scalar, "numpy.core.multiarray.scalar"),
        (_numpy_scalar, "numpy._core.multiarray.scalar"),
    ]


def safe_torch_load(path: str | os.PathLike, *, extra_allowed: Iterable = ()) -> Any:
    """Load a checkpoint on the CPU without running pickled code.

    ``.safetensors`` files load with ``safetensors``; anything else with
    ``torch.load(map_location="cpu", weights_only=True)`` under ``allowed_globals()`` plus
    ``extra_allowed`` (objects or ``(object, "module.name")`` pairs, for types you have checked).

    Raises:
        ConfigError: the file does not exist or is not a readable checkpoint.
        UnsafeCheckpointError: the file needs globals outside the allowlist; none of them was run.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header
            raise ConfigError(f"could not read {path} as a safetensors file: {e}") from e
    with torch.serialization.safe_globals([*allowed_globals(), *extra_allowed]):
        try:
            return _resolve_dtypes(torch.load(path, map_location="cpu", weights_only=True), set())
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(_refusal_message(path, str(e), _unsafe_globals(path))) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise ConfigError(f"could not read {path} as a PyTorch checkpoint: {e}") from e


def _unsafe_globals(path: Path) -> list[str]:
    """The globals in a zip checkpoint outside the allowlist, read without unpickling (best effort)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) files cannot be scanned; torch's own message still names one
        return []


def _refusal_message(path: Path, torch_message: str, names: list[str]) -> str:
    # torch wraps the unpickler's reason in advice whose layout varies; keep the reason
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", torch_message) if p.strip()]
    marker, boilerplate = "WeightsUnpickler error:", ("Weights only load failed", "Please file an issue",
                                                      "Check the documentation")
    inline = [p.split(marker, 1)[1].strip() for p in paragraphs if marker in p]
    detail = next((p for p in inline + paragraphs if p and not p.startswith(boilerplate)), torch_message)
    detail = detail.strip().split(" Please use `torch.serialization")[0]  # we offer extra_allowed instead
    names = names or re.findall(r"GLOBAL (\S+)", detail)
    needs = f"it needs {', '.join(names)}, which" if names else "it needs pickled objects that"
    return (
        f"refused to load {path}: {needs} weights-only loading does not allow, because unpickling them "
        f"can run arbitrary code. The file was not executed. If you trust where it came from, convert it "
        f"once, in place, to a plain tensor file (the configs that name it keep working): "
        f"{CONVERT_IN_PLACE.format(path=path)} "
        f"(torch said: {detail})")


def _resolve_dtypes(obj, seen: set[int]):
    """Replace leftover ``numpy.dtype`` stand-ins (dtypes stored on their own) with real dtypes."""
    if isinstance(obj, _NumpyDType):
        return obj.resolve()
    if id(obj) in seen or not isinstance(obj, dict | list | tuple | argparse.Namespace):
        return obj
    seen.add(id(obj))
    if isinstance(obj, tuple):
        return tuple(_resolve_dtypes(v, seen) for v in obj)
    items = vars(obj) if isinstance(obj, argparse.Namespace) else obj
    for k, v in (items.items() if isinstance(items, dict) else enumerate(items)):
        if isinstance(v, _NumpyDType | dict | list | tuple | argparse.Namespace):
            items[k] = _resolve_dtypes(v, seen)
    return obj
