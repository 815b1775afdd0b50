"""Reading and writing PyTorch-layout state dicts as ``{name: numpy array}``.

``.safetensors`` files are read and written with the ``safetensors`` package's numpy backend, so
neither needs PyTorch. ``.pt`` / ``.pth`` / ``.bin`` files are pickles (or TorchScript archives,
like OpenAI's released CLIP files) and need PyTorch (the ``[torch]`` extra); they are loaded with
``weights_only=True`` first, so a checkpoint cannot run code on load unless it is TorchScript.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Mapping

import numpy as np

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Wrappers training scripts put around the weights (open_clip saves {'epoch', 'name',
# 'state_dict', 'optimizer'}; others use 'model').
_WRAPPER_KEYS = ("state_dict", "model", "module")


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading or writing .pt/.pth/.bin checkpoints needs PyTorch: pip install 'contrastive_jax[torch]' "
            "(or torch==2.13.0 for the CPU build); .safetensors files need no PyTorch") from e
    return torch


def _to_numpy(value: Any) -> Any:
    """A torch tensor -> numpy (bfloat16 through ml_dtypes, exactly); other values unchanged."""
    if hasattr(value, "detach") and hasattr(value, "dtype"):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import ml_dtypes

            return t.view(dtype=_torch().int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return value


@contextlib.contextmanager
def _quiet_torchscript():
    """torch.load hands TorchScript archives (OpenAI's files) to torch.jit.load, saying so, and
    torch.jit.load announces its deprecation: neither is news to the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated.*")
        yield


def _load_torch_file(path: str) -> Any:
    torch = _torch()
    try:
        with _quiet_torchscript():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - fall back to TorchScript, else report both
        try:
            with _quiet_torchscript():
                module = torch.jit.load(path, map_location="cpu")
        except Exception:  # noqa: BLE001
            raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True "
                             f"({type(first).__name__}: {str(first)[:300]}) nor as a TorchScript archive") from first
        return module.state_dict()


def unwrap_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, Any]:
    """The flat ``{name: tensor}`` inside a loaded checkpoint.

    Descends one level of known wrappers (``state_dict`` / ``model`` / ``module`` keys holding a
    dict) and strips a ``module.`` prefix that every key shares (DistributedDataParallel).
    """
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    keys = list(obj)
    if keys and all(k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a checkpoint file into ``{name: numpy array}`` (original dtypes, e.g. float16).

    Args:
      path: ``.safetensors`` (no PyTorch needed) or ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``
        (needs PyTorch; TorchScript archives such as OpenAI's ``ViT-B-32.pt`` are read too).

    Non-tensor entries (e.g. an epoch number beside the weights) are dropped.
    """
    path = os.fspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if path.endswith(SAFETENSORS_SUFFIXES):
        from safetensors.numpy import load_file

        raw = load_file(path)
    elif path.endswith(TORCH_SUFFIXES):
        raw = _load_torch_file(path)
    else:
        raise ValueError(f"{path}: unknown checkpoint format; expected one of "
                         f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}")
    flat = unwrap_state_dict(raw, source=path)
    out = {}
    for name, value in flat.items():
        value = _to_numpy(value)
        if isinstance(value, np.ndarray):
            out[name] = value
    return out


def write_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes ``{name: numpy array}`` as ``.safetensors`` (no PyTorch) or ``.pt``/``.bin`` (a
    plain dict of tensors saved with ``torch.save``, loadable by ``model.load_state_dict``)."""
    path = os.fspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}
    if path.endswith(SAFETENSORS_SUFFIXES):
        from safetensors.numpy import save_file

        save_file(arrays, path, metadata={"format": "pt"})
    elif path.endswith(TORCH_SUFFIXES):
        torch = _torch()
        # torch.from_numpy needs a writable array; copy only the read-only ones (views of jax arrays).
        torch.save({k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in arrays.items()}, path)
    else:
        raise ValueError(f"{path}: unknown checkpoint format; expected one of "
                         f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}")
