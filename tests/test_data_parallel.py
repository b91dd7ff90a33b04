"""Data-parallel training (DistributedDataParallel) on two gloo ranks against one process: the multi-GPU
code path, run on CPU processes."""


import numpy as np
import pytest
import torch
import zarr

from scgnn_scale.data_parallel import RankGroup, rank_rows
from scgnn_scale.nn.autoencoder import DenseAutoencoder
from scgnn_scale.nn.optim import adam
from scgnn_scale.train import TrainPlan, fit_autoencoder


def test_rank_rows_share_whole_chunks_disjointly():
    shares = [rank_rows(10_000, 512, r, 2) for r in range(2)]
    assert sum(len(s) for s in shares) == 10_000 and len(np.intersect1d(*shares)) == 0
    assert all(np.all(np.diff(s) == 1) for s in shares)  # contiguous: whole chunks, read by one rank each
    assert shares[0][-1] % 512 == 511  # the cut falls on a chunk boundary
    assert abs(len(shares[0]) - len(shares[1])) <= 512
    # too few chunks to share out: rows interleaved, still disjoint and complete
    few = [rank_rows(700, 512, r, 2) for r in range(2)]
    assert sorted(np.concatenate(few).tolist()) == list(range(700))
    # a subset of rows (one cluster's) is shared the same way
    sub = np.arange(0, 10_000, 3)
    parts = [rank_rows(10_000, 512, r, 2, rows=sub) for r in range(2)]
    assert np.array_equal(np.sort(np.concatenate(parts)), sub)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 2, size=(4, 40)).astype(np.float32)
    x = np.maximum(centers[rng.integers(0, 4, 512)] + rng.normal(0, 0.5, size=(512, 40)), 0).astype(np.float32)
    path = tmp_path_factory.mktemp("dp") / "x.zarr"
    arr = zarr.create_array(path, shape=x.shape, chunks=(32, 40), dtype=np.float32)
    arr[:] = x
    return zarr.open_array(path, mode="r")


@pytest.fixture(scope="module")
def two_ranks():
    group = RankGroup(2, torch.device("cpu"))
    yield group
    group.close()


def _model(seed=3):
    torch.manual_seed(seed)
    model = DenseAutoencoder(40, 32, 8)
    return model, adam(model.parameters(), lr=1e-3)


def _plan(batch, steps=40):
    return TrainPlan(steps=steps, batch_size=batch, gamma=1.0, alpha=0.0, l1=1e-4, seed=5, memory_budget_mb=64)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_two_ranks_train_the_same_model_as_one_process_on_full_batches(matrix, two_ranks):
    # full batches: one process and two ranks see every cell at every step, so the models may differ only
    # by the order of float sums (stated tolerance: 1e-4 relative to the weights' norm after 40 steps)
    one, opt_one = _model()
    fit_autoencoder(one, opt_one, [matrix], _plan(512))
    two, opt_two = _model()
    info = two_ranks.fit_autoencoder(two, opt_two, [matrix], _plan(512))
    assert info["ranks"] == 2 and info["rank_rows"] == 256 and info["global_batch"] == 512
    moved = (_flat(two) - _flat(_model()[0])).norm()
    assert moved > 1e-2  # it trained
    assert (_flat(one) - _flat(two)).norm() / _flat(one).norm() < 1e-4


def test_two_ranks_on_minibatches_learn_as_well_as_one_process(matrix, two_ranks):
    one, opt_one = _model()
    single = fit_autoencoder(one, opt_one, [matrix], _plan(128, steps=300))
    assert single["batch_size"] == 128
    two, opt_two = _model()
    multi = two_ranks.fit_autoencoder(two, opt_two, [matrix], _plan(128, steps=300))
    assert multi["batch_size"] == 64 and multi["global_batch"] == 128
    x = torch.from_numpy(matrix[:])
    with torch.no_grad():
        err_one = float(((one(x)[0] - x) ** 2).mean())
        err_two = float(((two(x)[0] - x) ** 2).mean())
    with torch.no_grad():
        start = float(((_model()[0](x)[0] - x) ** 2).mean())
    assert err_two < 0.5 * start
    assert abs(err_two - err_one) / err_one < 0.15, (err_one, err_two)


def test_cluster_jobs_are_dealt_out_to_the_ranks(two_ranks):
    from scgnn_scale.config import RunConfig

    jobs = [{"cluster": c, "config": RunConfig(), "size": s} for c, s in enumerate([5, 50, 20, 1])]
    done = []
    results = two_ranks.map_jobs(_where, jobs, done.append, size=lambda j: j["size"])
    assert sorted(r["cluster"] for r in results) == [0, 1, 2, 3] and sum(done) == 4
    assert {r["pid"] for r in results} == {_where(jobs[0])["pid"], next(r["pid"] for r in results if r["rank"])}
    assert {r["cluster"] for r in results if r["rank"] == 0} == {1, 0}  # largest first, dealt in turn


def _where(job):
    import os

    import torch.distributed as dist

    return {"cluster": job["cluster"], "pid": os.getpid(), "rank": dist.get_rank() if dist.is_initialized() else 0}


@pytest.mark.parametrize("mode", ["full", "minibatch"])
def test_the_graph_autoencoder_on_two_ranks_finds_the_planted_groups(tmp_path, two_ranks, mode):
    import anndata
    from sklearn.cluster import KMeans
    from sklearn.neighbors import kneighbors_graph

    from scgnn_scale.config import GAEConfig
    from scgnn_scale.evaluate import clustering_metrics
    from scgnn_scale.graph_autoencoder import fit_gae
    from scgnn_scale.nn.sampling import CSRGraph

    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, 600)
    x = (rng.normal(0, 4, size=(4, 32))[truth] + rng.normal(0, 1, size=(600, 32))).astype(np.float32)
    adj = kneighbors_graph(x, 10, include_self=False)
    adj = ((adj + adj.T) > 0).astype(np.float32).tocsr()
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    anndata.settings.zarr_write_format = 3
    anndata.io.write_elem(group, "emb", x)
    anndata.io.write_elem(group, "graph", adj)
    cfg = GAEConfig(mode=mode, epochs=60, batch_size=128, epoch_cells=256)
    z2, info = two_ranks.fit_gae(str(tmp_path / "g.zarr/emb"), str(tmp_path / "g.zarr/graph"), cfg, seed=0)
    z1, _ = fit_gae(x, CSRGraph.from_scipy(adj), cfg, device=torch.device("cpu"), seed=0)
    assert info["ranks"] == 2 and info["mode"] == mode and z2.shape == (600, 16)
    for z in (z1, z2):
        found = KMeans(4, n_init=10, random_state=0).fit_predict(z)
        assert clustering_metrics(truth, found)["ari"] > 0.9

