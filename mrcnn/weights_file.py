"""Reading a weights file without unpickling code: a leaf module, so builders and the checkpoint
format can both use it without importing each other."""
import os
from typing import Any

import fsspec
import torch


def load_state_dict_file(path) -> Any:
    """``torch.load(weights_only=True)`` of a local path or fsspec URI, with errors that name the file."""
    path = os.fspath(path)
    try:
        with fsspec.open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as e:  # pickle refusal, truncated zip, not a torch file, ...
        raise ValueError(
            f"{path}: cannot be read as a weights-only torch checkpoint (tensors and plain containers "
            f"only; arbitrary pickled objects are refused): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
