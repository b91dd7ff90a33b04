"""Publishing the latest pass: after every stage, and again on resume when a run was killed before it."""

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgnn_scale.keys import FIRST_PASS, ITERATED, PUBLISHED
from scgnn_scale.results import publish, sources
from scgnn_scale.store import RunStore
from scgnn_scale.testing import store_with_matrix


def _store_with_passes(tmp_path, *, iterated: bool):
    rng = np.random.default_rng(0)
    store = store_with_matrix(tmp_path / "run", rng.poisson(2.0, (40, 12)).astype(np.float32))
    graph = sp.random(40, 40, density=0.1, random_state=0, format="csr", dtype=np.float32)
    passes = [(FIRST_PASS, ("feature", "graph", "gae", "cluster"), 1.0)]
    if iterated:
        passes.append((ITERATED, ("iterate",), 2.0))
    for keys, stages, scale in passes:
        with store.staging(stages[-1]) as st:
            st.create_matrix(keys.feature_embedding, (40, 8), np.float32)[:] = scale
            st.write_elem(keys.graph, graph * scale)
            st.create_matrix(keys.embedding, (40, 4), np.float32)[:] = scale
            st.write_elem(keys.clusters, pd.Categorical([str(int(scale))] * 40))
        for stage in stages:
            store.record_stage(stage, f"h-{stage}", 0.0, {})
    return store


def test_the_latest_finished_pass_is_published_and_redone_stages_unpublished(tmp_path):
    store = _store_with_passes(tmp_path, iterated=True)
    assert set(publish(store)) == set(PUBLISHED)
    assert store.open_array("obsm/X_scgnn")[0, 0] == 2.0  # the iteration's
    assert list(store.read_elem("obs")["scgnn_cluster"].unique()) == ["2"]
    assert publish(store) == []  # up to date: nothing copied again
    # iterate is to be redone: the first pass is shown again
    store.forget_stages(["iterate"])
    assert set(publish(store)) == set(PUBLISHED)
    assert store.open_array("obsm/X_scgnn")[0, 0] == 1.0
    # the graph stage is to be redone: what came from it and after is not shown at all
    store.forget_stages(["graph", "gae", "cluster"])
    publish(store)
    assert store.has("obsm/X_scgnn_feature") and not store.has("obsm/X_scgnn") and not store.has("obsp/scgnn_graph")
    assert "scgnn_cluster" not in store.read_elem("obs").columns
    assert list(sources(store)) == ["obsm/X_scgnn_feature"]


def test_a_publication_lost_to_a_kill_is_made_on_the_next_call(tmp_path):
    store = _store_with_passes(tmp_path, iterated=False)
    publish(store)
    # as if killed after the iteration's commit, before its publication
    store = _store_with_passes(tmp_path / "b", iterated=True)
    reopened = RunStore.open(store.root)
    assert not reopened.has("obsm/X_scgnn")
    publish(reopened)
    assert reopened.open_array("obsm/X_scgnn")[0, 0] == 2.0
    assert reopened.manifest["published"]["obsm/X_scgnn"].startswith(ITERATED.embedding)
