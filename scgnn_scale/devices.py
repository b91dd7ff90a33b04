"""Torch device choice: CPU by default here, CUDA when present and asked for (or 'auto')."""

from __future__ import annotations

import re

from .errors import InputError, shown

#: the devices the package trains on: 'cpu', 'cuda' or 'cuda:N'
_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")


def resolve_device(name: str):
    """``runtime.device`` as a torch device; one that is not 'auto', 'cpu', 'cuda' or an existing 'cuda:N' is an
    :class:`InputError` (checked when the run starts, before any work)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = _DEVICE.fullmatch(str(name).strip())
    name = shown(name)
    if match is None or (match[1] == "cpu" and match[2] not in (None, "0")):
        raise InputError(f"--device {name}: not a device this package runs on ('auto', 'cpu', 'cuda' or 'cuda:N')")
    if match[1] == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is visible to torch (torch {torch.__version__})")
        if match[2] is not None and int(match[2]) >= torch.cuda.device_count():
            raise InputError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    return torch.device(match[0])


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX-BF16, read from
    /proc/cpuinfo; elsewhere False): only there is bfloat16 training faster than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def training_precision(option: str, device) -> str:
    """``feature.precision`` for ``device``: 'auto' is 'bfloat16' on a CPU with native bfloat16 and
    'float32' elsewhere (CUDA included, until bfloat16 has been measured on a GPU)."""
    if option != "auto":
        return option
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bfloat16() else "float32"
