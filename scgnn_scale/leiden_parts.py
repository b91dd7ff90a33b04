"""Leiden and Louvain on a cell graph too large for igraph in memory (``cluster.partition = 'parts'``).

igraph holds about :data:`IGRAPH_BYTES_PER_EDGE` bytes per undirected edge while it builds a graph
(measured: 338 MB over the process for the 4.2M edges of a 300k-cell graph of degree 28), so the
140M edges of a 10M-cell graph would take about 12 GB. Instead:

1. the cells are split into parts of about ``cluster.part_cells`` by k-means on the GAE embedding
   (:func:`scgnn_scale.knn_blocks.fit_partition`): a cell's graph neighbours are near it there;
2. the stored graph is streamed once: each edge inside a part goes to that part's scratch file, and
   every cell's degree is counted;
3. in each part, Leiden optimises the **whole graph's** modularity at the finer resolution
   ``cluster.micro_resolution`` over that part's edges (CPM with each cell's whole-graph degree as
   its node weight and resolution ``gamma / 2m``: modularity's own null model), giving micro-communities;
4. the graph is streamed again into the aggregate graph of the micro-communities: an edge's weight is
   the number of cell edges between them, a self-loop carries the edges inside one;
5. :class:`CoarseGraph` is what the clustering then works on: Leiden or Louvain on the aggregate
   graph with the modularity objective and ``cluster.resolution`` (each cell takes its
   micro-community's community). A partition of the aggregate graph has the same modularity as its
   lift to the cells (tests/test_leiden_parts.py), so this optimises the whole-graph path's own
   objective over the partitions that keep every micro-community whole.

Memory: four O(N) integer arrays (part, index in the part, degree, micro-community: 20 bytes per
cell; the degree counted in int64 while the edges are spilled), the graph's indptr (8 bytes per cell), one block of streamed edges, one part's subgraph in
igraph and the aggregate graph. The edges inside the parts are spilled once to a temporary
directory (8 bytes per edge).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import igraphs
from .knn import row_blocks

log = logging.getLogger("scgnn_scale")

#: igraph's peak bytes per undirected edge while it builds a graph from an edge list (see above)
IGRAPH_BYTES_PER_EDGE = 85
#: cells sampled to fit the k-means parts
PARTITION_SAMPLE = 200_000
#: stored graph entries read per block while streaming
BLOCK_ENTRIES = 1 << 24
#: Leiden iterations of the micro-communities: until stable (-1) took 105 s instead of 0.9 s on a
#: 50k-cell graph at resolution 10, where the micro-communities need only not straddle communities
MICRO_ITERATIONS = 2


def stored_edges(location: str) -> int:
    """Undirected edges of the symmetric CSR graph stored at ``location`` (its last indptr entry / 2)."""
    import zarr

    indptr = zarr.open_group(location, mode="r", zarr_format=3)["indptr"]
    return int(indptr[indptr.shape[0] - 1]) // 2


def igraph_bytes(n_undirected_edges: int) -> int:
    """Estimated peak bytes of the whole graph in igraph."""
    return int(n_undirected_edges) * IGRAPH_BYTES_PER_EDGE


class StoredGraph:
    """A symmetric CSR graph in the store (AnnData encoding), read in row blocks; unweighted, as the
    whole-graph path (:func:`scgnn_scale.clustering._igraph`) reads it."""

    def __init__(self, location: str):
        import zarr

        self.group = zarr.open_group(location, mode="r", zarr_format=3)
        self.n = int(self.group.attrs["shape"][0])
        self.indptr = np.asarray(self.group["indptr"][:], dtype=np.int64)
        self.indices = self.group["indices"]

    @property
    def n_entries(self) -> int:
        return int(self.indptr[-1])

    def upper_edges(self, block_entries: int = BLOCK_ENTRIES):
        """Yield ``(i, j)`` int64 arrays of the edges with ``i < j``, a block of rows at a time."""
        a = 0
        while a < self.n:
            b = int(np.searchsorted(self.indptr, self.indptr[a] + block_entries, side="right")) - 1
            b = min(self.n, max(b, a + 1))
            lo, hi = int(self.indptr[a]), int(self.indptr[b])
            j = np.asarray(self.indices[lo:hi], dtype=np.int64)
            i = np.repeat(np.arange(a, b, dtype=np.int64), np.diff(self.indptr[a:b + 1]))
            upper = i < j
            yield i[upper], j[upper]
            a = b


@dataclass
class CoarseGraph:
    """The aggregate graph of the micro-communities and the map from cells to them.

    ``edges`` (E, 2) int64 with ``edges[:, 0] <= edges[:, 1]``, self-loops included; ``weights``
    the number of cell edges each stands for. igraph counts a self-loop twice in a node's strength,
    so each node's strength is the sum of its cells' degrees and modularity on this graph equals
    modularity of the lifted partition on the cells' graph. igraph's Leiden, though, leaves self-loops
    out of its default node weights: pass :meth:`node_weights`.
    """

    micro: np.ndarray
    edges: np.ndarray
    weights: np.ndarray
    info: dict = field(default_factory=dict)
    _igraph: object = None

    @property
    def n_cells(self) -> int:
        return int(self.micro.size)

    @property
    def n_nodes(self) -> int:
        return int(self.micro.max()) + 1 if self.micro.size else 0

    def igraph(self):
        """The aggregate graph in igraph, edge attribute 'weight' (built once)."""
        if self._igraph is None:
            self._igraph = igraphs.from_edges(self.n_nodes, self.edges, self.weights)
        return self._igraph

    def node_weights(self) -> np.ndarray:
        """Each node's strength, self-loops counted twice: the sum of its cells' degrees (float64)."""
        ends = np.bincount(self.edges[:, 0], weights=self.weights, minlength=self.n_nodes)
        return ends + np.bincount(self.edges[:, 1], weights=self.weights, minlength=self.n_nodes)

    def lift(self, membership: np.ndarray) -> np.ndarray:
        """Per-cell labels from a partition of the aggregate graph's nodes."""
        return np.asarray(membership, dtype=np.int64)[self.micro]

    def coarsen(self, cell_membership: np.ndarray) -> np.ndarray:
        """A partition of the nodes from per-cell labels that keep micro-communities whole
        (each node takes the label of its first cell)."""
        first = np.full(self.n_nodes, -1, np.int64)
        first[self.micro[::-1]] = np.arange(self.n_cells - 1, -1, -1)
        return np.asarray(cell_membership, dtype=np.int64)[first]

    def component_of_cells(self) -> np.ndarray:
        """The connected component of every cell (micro-communities lie inside one: Leiden's are connected)."""
        import scipy.sparse as sp
        from scipy.sparse.csgraph import connected_components

        n = self.n_nodes
        adj = sp.coo_matrix((np.ones(len(self.edges)), (self.edges[:, 0], self.edges[:, 1])), shape=(n, n))
        _, component = connected_components(adj.tocsr(), directed=False)
        return component[self.micro]


def fit_parts(z, part_cells: int, *, seed: int, block_rows: int = 1 << 18) -> np.ndarray:
    """Part of every cell (int32): k-means on a sample of the embedding ``z``, about ``part_cells`` each."""
    from .knn_blocks import fit_partition, nearest_centroid

    n = int(z.shape[0])
    n_parts = max(1, -(-n // int(part_cells)))
    parts = np.zeros(n, np.int32)
    if n_parts == 1:
        return parts
    centroids = fit_partition(z, n_parts, block_cells=int(part_cells), sample=PARTITION_SAMPLE, seed=seed).centroids
    for a, b in row_blocks(n, block_rows):
        parts[a:b] = nearest_centroid(np.ascontiguousarray(z[a:b], dtype=np.float32), centroids)
    return parts


def index_in_part(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's index among the cells of its part (int32) and the size of every part."""
    order = np.argsort(parts, kind="stable")
    sizes = np.bincount(parts)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    local = np.empty(parts.size, np.int32)
    local[order] = np.arange(parts.size, dtype=np.int64) - starts[parts[order]]
    return local, sizes


def spill_part_edges(graph: StoredGraph, parts: np.ndarray, local: np.ndarray, scratch: Path
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Write every part's inner edges (int32 pairs of indices in the part) to ``scratch/part_P.bin``.

    Returns each cell's degree (int32, the whole graph's, self-loops left out) and each part's
    number of inner edges.
    """
    n_parts = int(parts.max()) + 1
    degree = np.zeros(graph.n, np.int64)
    inner = np.zeros(n_parts, np.int64)
    files = [open(scratch / f"part_{p}.bin", "wb") for p in range(n_parts)]
    try:
        for i, j in graph.upper_edges():
            degree += np.bincount(i, minlength=graph.n) + np.bincount(j, minlength=graph.n)
            same = parts[i] == parts[j]
            i, j = i[same], j[same]
            p = parts[i]
            order = np.argsort(p, kind="stable")
            pairs = np.column_stack([local[i[order]], local[j[order]]]).astype(np.int32)
            bounds = np.searchsorted(p[order], np.arange(n_parts + 1))
            for q in np.flatnonzero(np.diff(bounds)):
                files[q].write(pairs[bounds[q]:bounds[q + 1]].tobytes())
            inner += np.bincount(p, minlength=n_parts)
    finally:
        for f in files:
            f.close()
    return degree.astype(np.int32), inner


def micro_communities(parts: np.ndarray, degree: np.ndarray, scratch: Path, *, resolution: float,
                      seed: int, n_iterations: int = MICRO_ITERATIONS, progress=None) -> np.ndarray:
    """Micro-community of every cell (int64, numbered across parts): Leiden in each part on the whole
    graph's modularity at ``resolution`` (CPM, node weight = whole-graph degree, resolution / 2m).
    ``progress`` (tqdm-like) counts the cells of the parts done."""
    two_m = float(degree.sum())
    micro = np.empty(parts.size, np.int64)
    offset = 0
    for p in range(int(parts.max()) + 1):
        cells = np.flatnonzero(parts == p)
        edges = np.fromfile(scratch / f"part_{p}.bin", dtype=np.int32).reshape(-1, 2)
        with igraphs.seeded(seed + p):
            g = igraphs.from_edges(cells.size, edges)
            del edges
            part = g.community_leiden(objective_function="CPM", resolution=resolution / max(two_m, 1.0),
                                      node_weights=degree[cells].astype(np.float64).tolist(),
                                      n_iterations=n_iterations)
        membership = np.asarray(part.membership, dtype=np.int64)
        micro[cells] = offset + membership
        offset += int(membership.max()) + 1 if membership.size else 0
        del g, part
        if progress is not None:
            progress.update(int(cells.size))
    return micro


def aggregate_edges(graph: StoredGraph, micro: np.ndarray, *, merge_at: int = 1 << 23
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The aggregate graph's edges ``(E, 2)`` (lower node first, self-loops included) and weights."""
    n_nodes = int(micro.max()) + 1
    keys = np.empty(0, np.int64)
    counts = np.empty(0, np.int64)
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def merged(parts):
        k = np.concatenate([p[0] for p in parts])
        c = np.concatenate([p[1] for p in parts])
        uniq, inverse = np.unique(k, return_inverse=True)
        return uniq, np.bincount(inverse, weights=c, minlength=uniq.size).astype(np.int64)

    for i, j in graph.upper_edges():
        a, b = micro[i], micro[j]
        key = np.minimum(a, b) * n_nodes + np.maximum(a, b)
        pending.append(np.unique(key, return_counts=True))
        if sum(p[0].size for p in pending) > max(merge_at, keys.size):
            keys, counts = merged([(keys, counts), *pending])
            pending = []
    keys, counts = merged([(keys, counts), *pending])
    return np.column_stack([keys // n_nodes, keys % n_nodes]), counts


def coarse_graph(location: str, z, *, part_cells: int, micro_resolution: float, seed: int = 0, scratch_dir: str | Path | None = None, progress=None) -> CoarseGraph:
    """The :class:`CoarseGraph` of the stored graph at ``location`` (steps 1-4 of the module's doc);
    ``progress`` counts the cells whose micro-communities are found."""
    t0 = time.perf_counter()
    graph = StoredGraph(location)
    if int(z.shape[0]) != graph.n:
        raise ValueError(f"{z.shape[0]} embedding rows for a graph of {graph.n} cells")
    parts = fit_parts(z, part_cells, seed=seed)
    local, sizes = index_in_part(parts)
    t_parts = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scgnn-leiden-", dir=scratch_dir) as scratch:
        degree, inner = spill_part_edges(graph, parts, local, Path(scratch))
        del local
        t_spill = time.perf_counter()
        micro = micro_communities(parts, degree, Path(scratch), resolution=micro_resolution, seed=seed,
                                  progress=progress)
    t_micro = time.perf_counter()
    edges, weights = aggregate_edges(graph, micro)
    info = {"parts": int(sizes.size), "largest_part": int(sizes.max()),
            "edges": int(degree.sum() // 2), "edges_inside_parts": float(round(inner.sum() / max(degree.sum() / 2, 1), 4)),
            "micro_resolution": micro_resolution, "micro_communities": int(micro.max()) + 1,
            "aggregate_edges": int(len(edges)),
            "seconds": {"parts": round(t_parts - t0, 2), "spill": round(t_spill - t_parts, 2),
                        "micro": round(t_micro - t_spill, 2), "aggregate": round(time.perf_counter() - t_micro, 2)}}
    log.info("cluster: %d parts, %d micro-communities (%.0f%% of %d edges inside parts), aggregate graph of %d edges",
             info["parts"], info["micro_communities"], 100 * info["edges_inside_parts"], info["edges"], len(edges))
    return CoarseGraph(micro=micro, edges=edges, weights=weights, info=info)


def modularity(graph: StoredGraph, labels: np.ndarray, resolution: float = 1.0) -> float:
    """Modularity of per-cell ``labels`` on the stored graph, streamed:
    ``sum_c [e_c / m - resolution (K_c / 2m)^2]`` (``e_c`` edges inside c, ``K_c`` its degree sum)."""
    labels = np.unique(np.asarray(labels), return_inverse=True)[1]
    inside = np.zeros(int(labels.max()) + 1)
    strength = np.zeros_like(inside)
    for i, j in graph.upper_edges():
        same = labels[i] == labels[j]
        inside += np.bincount(labels[i[same]], minlength=inside.size)
        strength += np.bincount(labels[i], minlength=inside.size) + np.bincount(labels[j], minlength=inside.size)
    two_m = strength.sum()
    return float((2 * inside / two_m - resolution * (strength / two_m) ** 2).sum())
