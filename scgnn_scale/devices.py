"""Torch device choice: CPU by default here, CUDA when present and asked for (or 'auto')."""

from __future__ import annotations

from .errors import InputError


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is visible to torch (torch {torch.__version__})")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a torch device name") from None
