"""Export a finished run: one ``.h5ad`` file, or the CSV files the published scGNN writes.

``export_run(run_dir, to, fmt="h5ad")`` writes every element of the run's ``adata.zarr`` (X, layers,
obs, var, obsm, obsp, varm, uns, raw) into an h5ad that ``anndata.read_h5ad`` opens. Cells x genes
arrays are copied in row blocks through h5py, the sparse ``raw`` counts chunk by chunk of their CSR
arrays, never held whole.

``fmt="csv"`` writes into the directory ``to`` the four files of the published tool
(``scGNN.py``, end of the run), with ``<name>`` the run directory's name unless given:

==========================  ==============================================================
``<name>_results.txt``      CSV, header ``,Celltype``; one row per cell: cell name, cluster id
``<name>_embedding.csv``    CSV, header ``,embedding0,...``; one row per cell: ``obsm['X_scgnn']``,
                            the graph-autoencoder embedding the clusters come from
``<name>_graph.csv``        CSV, header ``NodeA,NodeB,Weights``; one row per stored entry of the
                            pruned graph (0-based cell indices; a cell lists all its neighbours,
                            so an undirected edge appears as (i, j) and (j, i))
``<name>_recon.csv``        CSV, genes x cells (header ``,cell1,cell2,...``; one row per gene): the
                            imputed matrix ``layers['imputed']`` in the log1p space of ``X``
==========================  ==============================================================

plus ``<name>_feature_embedding.csv`` (the 128-d feature-autoencoder embedding, same layout), a file
the published tool writes only when it clusters on that embedding. A file whose source the run does
not hold yet (e.g. no ``layers/imputed`` before the impute stage) is skipped with a log message.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from .atomic import atomic_path
from .errors import InputError
from .keys import CLUSTER_COLUMN, KEYS
from .store import RunStore

log = logging.getLogger("scgnn_scale")

FORMATS = ("h5ad", "csv")
_DICT_GROUPS = ("layers", "obsm", "obsp", "varm", "varp")
#: bytes of a gene block read for the genes x cells CSV (all cells x some genes)
_TRANSPOSE_BUDGET = 256 * 2**20


def export_run(run_dir: str | Path, to: str | Path, *, fmt: str = "h5ad", overwrite: bool = False,
               name: str | None = None, block_rows: int | None = None, compression: str | None = "gzip") -> Path:
    """Write a run's results as an h5ad file or as the published scGNN's CSV files.

    Parameters
    ----------
    run_dir
        A run directory (``scgnn-scale run ... --out RUN_DIR``).
    to
        The output ``.h5ad`` file (``fmt="h5ad"``) or directory (``fmt="csv"``).
    fmt
        ``"h5ad"`` or ``"csv"``.
    overwrite
        Replace an existing output; without it an existing ``to`` is an error.
    name
        File name prefix of the CSV files (default: the run directory's name).
    block_rows
        Cells per streamed block (default: the store's chunk rows).
    compression
        h5py compression of the large h5ad arrays (``"gzip"``, ``"lzf"`` or None).

    Returns
    -------
    Path
        The written file or directory.
    """
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: not one of {', '.join(FORMATS)}")
    store = RunStore.open(run_dir)
    if not store.has(KEYS.x):
        raise InputError(f"{run_dir}: the run has not finished preprocessing yet; nothing to export")
    to = Path(to)
    block_rows = int(block_rows or store.store_config.chunk_rows)
    if fmt == "h5ad":
        return _export_h5ad(store, to, overwrite=overwrite, block_rows=block_rows, compression=compression)
    return _export_csv(store, to, overwrite=overwrite, name=name or store.root.resolve().name,
                       block_rows=block_rows)


# -- h5ad ----------------------------------------------------------------------------------------
def _check_target_file(to: Path, overwrite: bool) -> None:
    if to.is_dir():
        raise InputError(f"{to}: is a directory; --to must name an .h5ad file")
    if to.exists() and not overwrite:
        raise InputError(f"{to}: already exists; pass --overwrite to replace it")
    try:
        to.parent.mkdir(parents=True, exist_ok=True)  # as `run` makes its --out
    except OSError as exc:
        raise InputError(f"{to}: cannot create the directory {to.parent}: {exc.strerror or exc}") from exc


def _export_h5ad(store: RunStore, to: Path, *, overwrite: bool, block_rows: int, compression) -> Path:
    import h5py
    from anndata.io import write_elem

    _check_target_file(to, overwrite)
    root = zarr.open_group(str(store.adata_path), mode="r", zarr_format=3)
    with atomic_path(to) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        _copy_dense(root["X"], f, "X", block_rows, compression)
        write_elem(f, "obs", store.read_elem(KEYS.obs))
        write_elem(f, "var", store.read_elem(KEYS.var))
        for group_name in _DICT_GROUPS:
            out = f.create_group(group_name)
            out.attrs["encoding-type"] = "dict"
            out.attrs["encoding-version"] = "0.1.0"
            if group_name not in root:
                continue
            for key in sorted(root[group_name].keys()):
                node = root[group_name][key]
                if _is_dense_matrix(node):
                    _copy_dense(node, out, key, block_rows, compression)
                else:
                    write_elem(out, key, store.read_elem(f"{group_name}/{key}"))
        uns = store.read_elem("uns") if "uns" in root else {}
        write_elem(f, "uns", uns)
        if "raw" in root:
            _copy_raw(root["raw"], f, compression)
    return to


def _is_dense_matrix(node) -> bool:
    return isinstance(node, zarr.Array) and node.ndim == 2 and node.attrs.get("encoding-type", "array") == "array"


def _copy_dense(src: zarr.Array, group, key: str, block_rows: int, compression) -> None:
    """Copy a 2-D zarr array into an h5py dataset in row blocks, with AnnData's array encoding."""
    from .loader import iter_row_blocks

    n, g = src.shape
    chunks = (max(1, min(n, block_rows)), max(1, min(g, 512))) if n and g else None
    dset = group.create_dataset(key, shape=src.shape, dtype=src.dtype, chunks=chunks,
                                compression=compression if chunks else None)
    for a, b, block in iter_row_blocks(src, block_rows):
        dset[a:b] = block
    dset.attrs["encoding-type"] = "array"
    dset.attrs["encoding-version"] = "0.2.0"


def _copy_raw(src: zarr.Group, f, compression) -> None:
    """Copy ``raw`` (sparse counts of every input gene) into the h5ad, its CSR arrays chunk by chunk."""
    from anndata.io import read_elem, write_elem

    out = f.create_group("raw")
    out.attrs["encoding-type"] = "raw"
    out.attrs["encoding-version"] = "0.1.0"
    x = out.create_group("X")
    for name in ("encoding-type", "encoding-version", "shape"):
        x.attrs[name] = src["X"].attrs[name]
    for name in ("data", "indices", "indptr"):
        _copy_1d(src["X"][name], x, name, compression)
    write_elem(out, "var", read_elem(src["var"]))
    write_elem(out, "varm", read_elem(src["varm"]) if "varm" in src else {})


def _copy_1d(src: zarr.Array, group, key: str, compression) -> None:
    """Copy a 1-D zarr array into an h5py dataset one zarr chunk at a time."""
    n = src.shape[0]
    step = int(src.chunks[0])
    dset = group.create_dataset(key, shape=(n,), dtype=src.dtype, chunks=(min(n, step),) if n else None,
                                compression=compression if n else None)
    for a in range(0, n, step):
        dset[a:a + step] = src[a:a + step]


# -- csv -----------------------------------------------------------------------------------------
def _prepare_dir(to: Path, overwrite: bool) -> None:
    if to.exists() and not to.is_dir():
        raise InputError(f"{to}: exists and is not a directory; --to must name a directory for CSV")
    if to.is_dir() and any(to.iterdir()) and not overwrite:
        raise InputError(f"{to}: already exists and is not empty; pass --overwrite to replace its files")
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{to}: cannot create the directory: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _atomic_text(path: Path):
    """A text file written under a temporary name and moved into place on success."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        yield fh


def _export_csv(store: RunStore, to: Path, *, overwrite: bool, name: str, block_rows: int) -> Path:
    _prepare_dir(to, overwrite)
    obs = store.read_elem(KEYS.obs)
    cells = obs.index.astype(str)
    written = []
    if CLUSTER_COLUMN in obs.columns:
        path = to / f"{name}_results.txt"
        with _atomic_text(path) as fh:
            pd.DataFrame({"Celltype": _cluster_ids(obs[CLUSTER_COLUMN])}, index=cells).to_csv(fh)
        written.append(path.name)
    else:
        log.warning("export: the run has no clusters yet (obs/scgnn_cluster); %s_results.txt skipped", name)
    for key, suffix in ((KEYS.embedding, "embedding"), (KEYS.feature_embedding, "feature_embedding")):
        if store.has(key):
            path = to / f"{name}_{suffix}.csv"
            _write_embedding_csv(store.open_array(key), cells, path, block_rows)
            written.append(path.name)
        else:
            log.warning("export: the run has no %s yet; %s_%s.csv skipped", key, name, suffix)
    if (store.adata_path / "obsp" / "scgnn_graph").is_dir():
        path = to / f"{name}_graph.csv"
        _write_graph_csv(store.read_elem(KEYS.graph), path, block_rows)
        written.append(path.name)
    else:
        log.warning("export: the run has no graph yet (obsp/scgnn_graph); %s_graph.csv skipped", name)
    if store.has(KEYS.imputed):
        path = to / f"{name}_recon.csv"
        genes = store.read_elem(KEYS.var).index.astype(str)
        _write_genes_by_cells_csv(store.open_array(KEYS.imputed), genes, cells, path)
        written.append(path.name)
    else:
        log.warning("export: the run has no imputed matrix yet; %s_recon.csv skipped", name)
    log.info("export: wrote %s into %s", ", ".join(written), to)
    return to


def _cluster_ids(labels: pd.Series) -> np.ndarray:
    """Cluster ids as integers (the published file's), or as strings when they are not numbers."""
    values = np.asarray(labels.astype(str))
    try:
        return values.astype(np.int64)
    except ValueError:
        return values


def _write_embedding_csv(array: zarr.Array, cells: pd.Index, path: Path, block_rows: int) -> None:
    from .loader import iter_row_blocks

    columns = [f"embedding{i}" for i in range(array.shape[1])]
    with _atomic_text(path) as fh:
        for a, b, block in iter_row_blocks(array, block_rows):
            pd.DataFrame(block, index=cells[a:b], columns=columns).to_csv(fh, header=a == 0)
        if array.shape[0] == 0:
            pd.DataFrame(columns=columns).to_csv(fh)


def _write_graph_csv(graph, path: Path, block_rows: int) -> None:
    import scipy.sparse as sp

    graph = sp.csr_matrix(graph)
    indptr = graph.indptr.astype(np.int64)
    with _atomic_text(path) as fh:
        fh.write("NodeA,NodeB,Weights\n")
        for a in range(0, graph.shape[0], block_rows):
            b = min(a + block_rows, graph.shape[0])
            p0, p1 = indptr[a], indptr[b]
            rows = np.repeat(np.arange(a, b, dtype=np.int64), np.diff(indptr[a:b + 1]))
            frame = pd.DataFrame({"NodeA": rows, "NodeB": graph.indices[p0:p1].astype(np.int64),
                                  "Weights": graph.data[p0:p1].astype(np.float64)})
            frame.to_csv(fh, header=False, index=False, float_format="%.1f")


def _write_genes_by_cells_csv(array: zarr.Array, genes: pd.Index, cells: pd.Index, path: Path) -> None:
    """The published recon file: one row per gene, one column per cell, streamed in gene blocks."""
    n, g = array.shape
    chunk_genes = int(array.chunks[1]) if g else 1
    # whole gene chunks when all cells x a chunk fit the budget, else fewer genes per read
    per_gene = max(1, n * np.dtype(array.dtype).itemsize)
    gene_block = max(1, min(g, _TRANSPOSE_BUDGET // per_gene))
    if gene_block >= chunk_genes:
        gene_block = gene_block // chunk_genes * chunk_genes
    with _atomic_text(path) as fh:
        fh.write("," + ",".join(_csv_field(c) for c in cells) + "\n")
        for g0 in range(0, g, gene_block):
            g1 = min(g, g0 + gene_block)
            block = np.asarray(array[:, g0:g1]).T
            pd.DataFrame(block, index=genes[g0:g1]).to_csv(fh, header=False, float_format="%.6g")


def _csv_field(value: str) -> str:
    if any(ch in value for ch in ',"\n\r'):
        return '"' + value.replace('"', '""') + '"'
    return value

