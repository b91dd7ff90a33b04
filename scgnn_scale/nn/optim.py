"""The optimiser of every network here: Adam, fused where torch has the fused kernel."""

from __future__ import annotations

import torch


def adam(parameters, lr: float) -> torch.optim.Optimizer:
    """Adam over ``parameters`` with learning rate ``lr``; the fused implementation when available.

    On the CPU the default (per-tensor) Adam step of the 2.2M-parameter feature autoencoder costs as
    much as its backward pass on a small batch (52 ms against 60 ms for 200 cells x 2000 genes, 2
    cores); the fused step takes 9 ms. Same update rule; a torch or device without the fused kernel
    gets the plain one.
    """
    params = list(parameters)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)
