"""Cells x genes reconstructions computed as they are read, instead of stored in the run store.

A feature autoencoder's reconstruction is ``decoder(embedding)``: with the model file and the 128-d
embedding the run keeps anyway, every row can be computed again (128 floats a cell on disk instead
of one per gene). A cluster autoencoder's output is its model applied to that row. The arrays here
look like read-only zarr arrays to the readers of the store (``shape``, ``dtype``, ``chunks``, rows
``a[i:j]``): :class:`~scgnn_scale.loader.MinibatchLoader`, :func:`~scgnn_scale.loader.iter_row_blocks`
and :func:`~scgnn_scale.train.write_outputs` read them block by block, so nothing of size
cells x genes is ever held or written. They pickle as paths (a data-parallel rank or a Dask task
opens them again, ``on(device)`` puts the models on its own device).
"""

from __future__ import annotations

import numpy as np

from .paths import as_path


def _rows(key, n: int) -> slice:
    """A row slice ``a:b`` (what the block readers ask for); anything else is refused, not read whole."""
    if isinstance(key, tuple):
        if len(key) != 1 and not all(k == slice(None) for k in key[1:]):
            raise TypeError("recomputed arrays are read in whole rows")
        key = key[0]
    if not isinstance(key, slice) or key.step not in (None, 1):
        raise TypeError(f"recomputed arrays are read in row slices, not {key!r}")
    return slice(*key.indices(n)[:2])


class DecodedRows:
    """``decoder(embedding[a:b])`` of a saved feature autoencoder, computed when rows are read.

    Parameters
    ----------
    model_path
        The autoencoder saved with the embedding (:func:`scgnn_scale.train.save_model`).
    embedding_path
        Path of the zarr array of its embedding (cells x latent).
    device
        Where the decoder runs.
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, model_path, embedding_path, device="cpu"):
        import torch
        import zarr

        from .errors import InputError
        from .train import load_model

        self.model_path, self.embedding_path = str(model_path), str(embedding_path)
        self.device = torch.device(device)
        self.model, _ = load_model(self.model_path, self.device)
        self.model.eval()
        self.embedding = zarr.open_array(self.embedding_path, mode="r", zarr_format=3)
        if int(self.embedding.shape[1]) != self.model.latent:
            raise InputError(f"{self.embedding_path}: {self.embedding.shape[1]} columns, {model_path} decodes "
                             f"{self.model.latent}")
        self.shape = (int(self.embedding.shape[0]), int(self.model.n_genes))
        self.chunks = (int(self.embedding.chunks[0]), self.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        import torch

        rows = _rows(key, self.shape[0])
        z = np.ascontiguousarray(self.embedding[rows], dtype=np.float32)
        with torch.inference_mode():
            return self.model.decode(torch.from_numpy(z).to(self.device)).float().cpu().numpy()

    def on(self, device) -> DecodedRows:
        return DecodedRows(self.model_path, self.embedding_path, device)

    def __reduce__(self):
        return DecodedRows, (self.model_path, self.embedding_path, "cpu")


class ClusterOutputs:
    """Each cell's row of ``source`` through its cluster's autoencoder (the iteration's ``X_t``), when read.

    Parameters
    ----------
    source
        The rows the cluster autoencoders were trained on (a :class:`DecodedRows`).
    labels
        ``(N,)`` cluster of each cell, 0..k-1.
    model_paths
        The saved autoencoder of each cluster, in cluster order.
    device
        Where the autoencoders run.
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, source: DecodedRows, labels: np.ndarray, model_paths: list, device="cpu"):
        import torch

        from .train import load_model

        self.source = source if str(source.device) == str(torch.device(device)) else source.on(device)
        self.labels = np.asarray(labels)
        self.model_paths = [str(p) for p in model_paths]
        self.device = torch.device(device)
        self.models = [load_model(p, self.device)[0].eval() for p in self.model_paths]
        if self.labels.shape != (source.shape[0],):
            raise ValueError(f"{len(self.labels)} labels for {source.shape[0]} cells")
        self.shape, self.chunks = source.shape, source.chunks

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        import torch

        rows = _rows(key, self.shape[0])
        x = self.source[rows]
        labels = self.labels[rows]
        with torch.inference_mode():
            for c in np.unique(labels):
                mask = labels == c
                xb = torch.from_numpy(np.ascontiguousarray(x[mask])).to(self.device)
                x[mask] = self.models[int(c)](xb)[0].float().cpu().numpy()
        return x

    def on(self, device) -> ClusterOutputs:
        return ClusterOutputs(self.source, self.labels, self.model_paths, device)

    def __reduce__(self):
        return ClusterOutputs, (self.source, self.labels, self.model_paths, "cpu")


def feature_reconstruction(store, model_path, embedding_key: str, device) -> DecodedRows | None:
    """The reconstruction of the feature autoencoder ``model_path`` from its embedding in ``store``;
    None when the model or the embedding is missing (the stage that made them must be redone)."""
    if not as_path(model_path).is_file() or not store.has(embedding_key):
        return None
    return DecodedRows(model_path, store.path_of(embedding_key), device)
