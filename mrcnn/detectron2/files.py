"""Reading Detectron2's weight files without running pickled code.

- ``.pth`` as its ``DetectionCheckpointer`` writes them: ``{"model": state_dict, "iteration": ...,
  "optimizer": ...}``, read with ``torch.load(weights_only=True)`` as every other weights file;
- the model zoo's ``.pkl``: a pickle of ``{"model": {name: numpy array}, "__author__": ...}``
  (Detectron2 reads it with ``pickle.load(f, encoding="latin1")``). Here a restricted unpickler
  admits only what rebuilds numpy arrays and dtypes (under numpy 1.x's ``numpy.core`` and 2.x's
  ``numpy._core`` names) and refuses any other global with the file's name and the global's.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any

import fsspec
import numpy as np
import torch

from ..weights_file import load_state_dict_file

# The globals a zoo .pkl may name: numpy's array and scalar reconstruction and dtypes (under
# numpy 1.x's numpy.core and 2.x's numpy._core), and the codec protocol-2 pickles of Python 2
# bytes go through. Nothing else is looked up, so nothing else can run.
_NUMPY_NAMES = {"_reconstruct", "scalar", "ndarray", "dtype"}
_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")
_THIS_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"


class _ArraysOnly(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f, encoding="latin1")

    def find_class(self, module: str, name: str) -> Any:
        if module in _NUMPY_MODULES and name in _NUMPY_NAMES:
            if module != "numpy":  # whichever numpy wrote it, this numpy's module
                module = _THIS_NUMPY_CORE + ".multiarray"
        elif not ((module == "numpy.dtypes" and name.endswith("DType")) or (module, name) == ("_codecs", "encode")):
            raise pickle.UnpicklingError(f"refuses the global {module}.{name} (only numpy arrays are read)")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refuses persistent ids (not a Detectron2 model zoo file)")


def read_pkl(path: str) -> Any:
    """The object a zoo ``.pkl`` holds, built only from numpy arrays and plain containers."""
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    try:
        return _ArraysOnly(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001  (a hostile or broken pickle: one clear refusal)
        raise ValueError(f"{path}: cannot be read as a Detectron2 model zoo .pkl (numpy arrays only): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def is_pickle_file(path: str) -> bool:
    """A ``.pkl`` name (Detectron2's zoo files; torch files are zip archives read weights-only)."""
    return os.fspath(path).lower().endswith((".pkl", ".pickle"))


def read_weights(path: str) -> Any:
    """The top-level object of a weights file of either kind (a .pkl through the restricted
    unpickler, anything else through ``torch.load(weights_only=True)``)."""
    return read_pkl(path) if is_pickle_file(path) else load_state_dict_file(path)


def tensors(model: dict, path: str) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of a Detectron2 ``"model"`` dict whose values are tensors or numpy arrays."""
    out = {}
    for name, value in model.items():
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "fiub":
                raise ValueError(f"{path}: weight {name!r} has dtype {value.dtype}, not a number")
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: weight {name!r} is a {type(value).__name__}, not an array")
        out[str(name)] = value
    return out
