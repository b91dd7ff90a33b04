"""CUDA paths: run on a lent H100/H200 with ``python -m pytest -m gpu`` (deselected by default).

Each test checks a GPU result against the CPU reference or planted structure, so a broken CUDA path
fails here rather than silently falling back to the CPU.
"""

import json

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import planted_counts

from scgnn_scale import knn
from scgnn_scale.cli import main
from scgnn_scale.evaluate import clustering_metrics

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


@requires_cuda
def test_torch_knn_on_cuda_matches_exact_cpu():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6000, 32)) + rng.normal(scale=3, size=(20, 32))[rng.integers(0, 20, 6000)]).astype(
        np.float32)
    ref_idx, ref_dist = knn.knn_exact(x, 10)
    # small blocks so the running top-k merges several reference blocks and the self-mask crosses blocks;
    # then the whole reference in one block, wide enough for smallest_k's grouped selection
    for block_bytes in (4 * 1000 * 1500, None):
        idx, dist = knn.knn_torch(x, 10, device="cuda", query_block=1000, block_bytes=block_bytes)
        assert (idx == ref_idx).mean() > 0.999  # ties in float32 distances may swap equal neighbours
        np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)
        assert not (idx == np.arange(len(x))[:, None]).any()


def test_smallest_k_on_cuda_equals_topk():
    import torch

    d = torch.randint(0, 100, (500, 70001), device="cuda").float()  # wide rows, many ties, a ragged group
    values, cols = knn.smallest_k(d, 18)
    torch.testing.assert_close(values.sort(1).values, torch.topk(d, 18, dim=1, largest=False).values.sort(1).values)
    torch.testing.assert_close(torch.gather(d, 1, cols), values)


def _planted_h5ad(path, **planted):
    """Write planted counts (with their types in obs['label']) to ``path``; return the types."""
    counts, labels = planted_counts(**planted)
    adata = anndata.AnnData(X=sp.csr_matrix(counts))
    adata.obs_names = [f"c{i}" for i in range(counts.shape[0])]
    adata.var_names = [f"g{j}" for j in range(counts.shape[1])]
    adata.obs["label"] = labels.astype(str)
    adata.write_h5ad(path)
    return labels


@requires_cuda
def test_full_run_on_cuda_recovers_planted_types(tmp_path):
    inp = tmp_path / "planted.h5ad"
    labels = _planted_h5ad(inp, n_cells=600, n_genes=300, n_types=4, seed=3)
    out = tmp_path / "run"
    # torch KNN (the GPU graph backend) even at this size, and iterate with the in-process executor
    assert main(["run", str(inp), "--out", str(out), "--device", "cuda", "--label-key", "label", "--quiet",
                 "--graph-method", "torch", "--iterate-max-iterations", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    info = {s: e.get("info", {}) for s, e in manifest["stages"].items()}
    assert info["feature"]["device"].startswith("cuda")
    assert info["graph"]["method"] == "torch"
    result = anndata.read_zarr(out / "adata.zarr")
    assert np.isfinite(result.layers["imputed"][:50]).all()
    scores = clustering_metrics(labels, result.obs["scgnn_cluster"].to_numpy())
    assert scores["ari"] > 0.9


@requires_cuda
def test_cuda_and_cpu_feature_training_agree_in_quality(tmp_path):
    """Same planted data through the feature AE on both devices: the embeddings separate the types alike."""
    from sklearn.metrics import silhouette_score

    inp = tmp_path / "p.h5ad"
    labels = _planted_h5ad(inp, n_cells=500, n_genes=200, n_types=3, seed=5)
    sil = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert main(["run", str(inp), "--out", str(out), "--device", device, "--until", "feature", "--quiet"]) == 0
        emb = anndata.read_zarr(out / "adata.zarr").obsm["X_scgnn_feature"]
        sil[device] = silhouette_score(emb, labels)
    assert sil["cuda"] > 0.5 * sil["cpu"] and sil["cuda"] > 0.2


@requires_cuda
def test_pinned_loader_batches_equal_the_plain_ones():
    from scgnn_scale.loader import MinibatchLoader

    x = np.random.default_rng(1).random((1000, 40), dtype=np.float32)
    plain = list(MinibatchLoader([x], 64, seed=5, block_rows=100, buffer_blocks=3).epoch(2))
    pinned = list(MinibatchLoader([x], 64, seed=5, block_rows=100, buffer_blocks=3, pin_memory=True).epoch(2))
    assert len(plain) == len(pinned) == 16
    for p, q in zip(plain, pinned, strict=True):
        assert isinstance(q[0], torch.Tensor) and q[0].is_pinned()
        np.testing.assert_array_equal(p[0], q[0].numpy())
        np.testing.assert_array_equal(p.row_index, q.row_index)


@requires_cuda
def test_adam_on_cuda_takes_torchs_for_each_steps_bit_for_bit():
    """Our Adam (scgnn_scale/nn/optim.py) on CUDA parameters: the same values as torch's for-each Adam there."""
    from scgnn_scale.nn.autoencoder import DenseAutoencoder
    from scgnn_scale.nn.optim import adam

    torch.manual_seed(0)
    ours_model = DenseAutoencoder(300, 64, 16).cuda()
    plain_model = DenseAutoencoder(300, 64, 16).cuda()
    plain_model.load_state_dict(ours_model.state_dict())
    ours = adam(ours_model.parameters(), lr=1e-3)
    plain = torch.optim.Adam(plain_model.parameters(), lr=1e-3, foreach=True)
    x = torch.rand(256, 300, device="cuda")
    for _ in range(30):
        for model, opt in ((ours_model, ours), (plain_model, plain)):
            opt.zero_grad()
            ((model(x)[0] - x) ** 2).sum().backward()
            opt.step()
    for a, b in zip(ours_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(a, b)
