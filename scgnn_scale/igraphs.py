"""igraph graphs from edge lists, and igraph's random draws seeded: the clustering paths share these."""

from __future__ import annotations

import contextlib
import random

import numpy as np


def from_edges(n: int, edges: np.ndarray, weights: np.ndarray | None = None):
    """An undirected igraph graph of ``n`` nodes from an ``(E, 2)`` edge list; edge attribute 'weight' if given."""
    import igraph

    g = igraph.Graph(n=n, edges=np.asarray(edges, dtype=np.int64), directed=False)
    if weights is not None:
        g.es["weight"] = np.asarray(weights, dtype=np.float64).tolist()
    return g


@contextlib.contextmanager
def seeded(seed: int):
    """igraph draws from a Python RNG object (the ``random`` module by default): a private seeded one inside."""
    import igraph

    igraph.set_random_number_generator(random.Random(seed))
    try:
        yield
    finally:
        igraph.set_random_number_generator(random)
