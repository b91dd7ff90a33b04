"""Stage feature on a small planted store: outputs, quality, determinism, continuing a saved model."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import planted_counts
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from scgnn_scale import train
from scgnn_scale.config import FeatureConfig, RunConfig, StoreConfig
from scgnn_scale.keys import FEATURE_MODEL, FIRST_PASS
from scgnn_scale.nn.autoencoder import DenseAutoencoder
from scgnn_scale.reconstruction import feature_reconstruction
from scgnn_scale.stages import feature
from scgnn_scale.testing import stage_context, store_with_matrix
from scgnn_scale.train import TrainPlan


def small_config(**feature_options) -> RunConfig:
    options = {"batch_size": 64, "min_steps": 150, "max_epochs": 1, "memory_budget_mb": 0, **feature_options}
    return RunConfig(store=StoreConfig(chunk_rows=64, chunk_genes=64), feature=FeatureConfig(**options))


def fake_ltmg(counts: np.ndarray) -> np.ndarray:
    """States 0 (zero), 1 (low), 2 (high): enough to exercise the TRS-weighted term."""
    positive = np.where(counts > 0, counts, np.nan)
    median = np.nanmedian(positive, axis=0, keepdims=True)
    return np.where(counts > 0, 1 + (counts > median), 0).astype(np.uint8)


def planted_store(tmp_path, config, with_ltmg=True):
    counts, labels = planted_counts(n_cells=300, n_genes=200, n_types=3, seed=0)
    store = store_with_matrix(tmp_path / "run", counts, labels=labels, config=config)
    if with_ltmg:
        with store.staging("ltmg") as st:
            st.create_matrix("layers/ltmg", counts.shape, np.uint8)[:] = fake_ltmg(counts)
    return store, counts, labels


def test_feature_stage_writes_outputs_that_separate_planted_types(tmp_path):
    config = small_config()
    store, counts, labels = planted_store(tmp_path, config)
    info = feature.run(stage_context(store, "feature", config))
    emb = store.open_array(FIRST_PASS.feature_embedding)[:]
    assert not store.has("work/recon")  # not stored unless runtime.keep_work: computed from the model as read
    recon = feature_reconstruction(store, store.model_path(FEATURE_MODEL), FIRST_PASS.feature_embedding, "cpu")[:]
    assert emb.shape == (300, 128) and emb.dtype == np.float32
    assert recon.shape == (300, 200) and recon.dtype == np.float32
    assert np.isfinite(emb).all() and np.isfinite(recon).all()
    assert info["ltmg"] and info["loader"] == "stream" and info["steps"] == 150
    assert (store.root / "models" / "feature_ae.pt").is_file()
    x = np.log1p(counts)
    # the reconstruction beats the per-gene mean, and the reported MSE is the true one
    mse = float(np.mean((recon - x) ** 2))
    assert mse == pytest.approx(info["recon_mse"], rel=1e-4)
    assert mse < 0.8 * float(np.mean((x - x.mean(axis=0)) ** 2))
    assert info["loss_last"] < info["loss_first"]
    pred = KMeans(3, n_init=10, random_state=0).fit_predict(emb)
    assert adjusted_rand_score(labels, pred) > 0.9


def test_deterministic_and_same_in_memory_and_streamed(tmp_path):
    config = small_config()
    store, _, _ = planted_store(tmp_path, config)
    memory_config = dataclasses.replace(config, feature=dataclasses.replace(config.feature, memory_budget_mb=100))
    embeddings = []
    for i, cfg in enumerate([config, config, memory_config]):
        ctx = stage_context(store, "iterate", cfg)
        with store.staging("iterate") as st:
            info = train.train_feature(ctx, st, x_key="X", trs_key="layers/ltmg", steps=12, model_in=None,
                                         model_out=None, embedding_key=f"work/emb{i}", recon_key=None)
        embeddings.append(store.open_array(f"work/emb{i}")[:])
        assert info["loader"] == ("memory" if i == 2 else "stream")
    np.testing.assert_array_equal(embeddings[0], embeddings[1])
    np.testing.assert_array_equal(embeddings[0], embeddings[2])


def test_model_in_continues_a_saved_model(tmp_path):
    config = small_config(min_steps=60)
    store, _, _ = planted_store(tmp_path, config, with_ltmg=False)
    info = feature.run(stage_context(store, "feature", config))
    assert not info["ltmg"]
    saved = store.root / "models" / "feature_ae.pt"
    ctx = stage_context(store, "iterate", config)
    with store.staging("iterate") as st:
        # zero steps: the saved model's embedding, exactly
        train.train_feature(ctx, st, x_key="X", trs_key=None, steps=0, model_in=saved, model_out=None,
                              embedding_key="work/emb_same", recon_key=None)
        cont = train.train_feature(ctx, st, x_key="X", trs_key=None, steps=20, model_in=saved,
                                     model_out=store.root / "models" / "iter1.pt", embedding_key=None,
                                     recon_key="work/recon_cont")
        fresh = train.train_feature(ctx, st, x_key="X", trs_key=None, steps=20, model_in=None, model_out=None,
                                      embedding_key=None, recon_key=None)
    np.testing.assert_array_equal(store.open_array("work/emb_same")[:],
                                  store.open_array(FIRST_PASS.feature_embedding)[:])
    assert cont["recon_mse"] < fresh["recon_mse"]
    assert cont["recon_mse"] <= info["recon_mse"] * 1.05
    # the saved state carries the optimiser, so the continued run keeps Adam's moments
    state = torch.load(store.root / "models" / "iter1.pt", weights_only=True)
    assert "optimizer" in state and state["shape"] == {"n_genes": 200, "hidden": 512, "latent": 128}


def test_a_resumed_fit_equals_an_uninterrupted_one(tmp_path):
    config = small_config()
    store, _, _ = planted_store(tmp_path, config)
    arrays = [store.open_array("X"), store.open_array("layers/ltmg")]

    def plan(steps):
        return TrainPlan(steps=steps, batch_size=64, gamma=0.1, alpha=0.9, l1=1.0, seed=0, memory_budget_mb=0)

    def fresh():
        torch.manual_seed(0)
        model = DenseAutoencoder(200, 32, 8)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    model_a, opt_a = fresh()
    train.fit_autoencoder(model_a, opt_a, arrays, plan(11))  # 5 batches per epoch: crosses epochs
    model_b, opt_b = fresh()
    train.fit_autoencoder(model_b, opt_b, arrays, plan(7))
    path = train.save_model(tmp_path / "ckpt.pt", model_b, opt_b)
    model_c, state = train.load_model(path, "cpu")
    opt_c = torch.optim.Adam(model_c.parameters(), lr=1e-3)
    opt_c.load_state_dict(state["optimizer"])
    train.fit_autoencoder(model_c, opt_c, arrays, plan(11), start_step=7)
    for p, q in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(p, q)


def test_schedule():
    assert train.training_steps(3000, 1024, 500, 10) == 500
    assert train.training_steps(100, 1024, 500, 10) == 500
    assert train.training_steps(100_000, 1024, 500, 10) == 980
    assert train.training_steps(1_000_000, 1024, 500, 10) == 9770
    # the cap: from ~205k cells on the schedule stops growing; min_steps still wins below it
    assert train.training_steps(100_000, 1024, 500, 10, max_steps=2000) == 980
    assert train.training_steps(1_000_000, 1024, 500, 10, max_steps=2000) == 2000
    assert train.training_steps(10_000_000, 1024, 500, 10, max_steps=2000) == 2000
    assert train.training_steps(1_000_000, 1024, 500, 10, max_steps=300) == 500
    defaults = RunConfig().feature
    assert train.training_steps(1_000_000, defaults.batch_size, defaults.min_steps, defaults.max_epochs,
                                  defaults.max_steps) == 2000


def test_model_of_other_genes_is_refused(tmp_path):
    from scgnn_scale.errors import InputError

    config = small_config()
    store, _, _ = planted_store(tmp_path, config, with_ltmg=False)
    path = train.save_model(tmp_path / "m.pt", DenseAutoencoder(50, 16, 4))
    ctx = stage_context(store, "iterate", config)
    with pytest.raises(InputError, match="50 genes"), store.staging("iterate") as st:
        train.train_feature(ctx, st, x_key="X", trs_key=None, steps=1, model_in=path, model_out=None,
                              embedding_key=None, recon_key=None)


def test_killed_stage_resumes_from_its_checkpoint(tmp_path):
    config = small_config(min_steps=12, checkpoint_minutes=1e-9)  # a checkpoint after every step
    store, _, _ = planted_store(tmp_path / "a", config)
    reference, _, _ = planted_store(tmp_path / "b", config)
    feature.run(stage_context(reference, "feature", config))

    def dies_after_step_5(name, info):  # a kill right after the checkpoint of step 5 was saved
        if name == "checkpoint" and info["step"] == 5:
            raise KeyboardInterrupt("killed")

    ctx = stage_context(store, "feature", config, on_event=dies_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        feature.run(ctx)
    assert ctx.load_checkpoint()["step"] == 5 and not store.has(FIRST_PASS.feature_embedding)
    info = feature.run(stage_context(store, "feature", config))
    assert info["start_step"] == 5 and info["steps_run"] == 7
    assert not (store.root / "models" / "feature_ae.pt.ckpt").exists()
    np.testing.assert_array_equal(store.open_array(FIRST_PASS.feature_embedding)[:],
                                  reference.open_array(FIRST_PASS.feature_embedding)[:])


def test_fit_on_one_clusters_rows(tmp_path):
    config = small_config()
    store, _, labels = planted_store(tmp_path, config, with_ltmg=False)
    rows = np.flatnonzero(labels == 1)
    torch.manual_seed(0)
    model = DenseAutoencoder(200, 32, 8)
    plan = TrainPlan(steps=4, batch_size=512, gamma=0.1, alpha=0.0, l1=1.0, seed=0, memory_budget_mb=0)
    info = train.fit_autoencoder(model, torch.optim.Adam(model.parameters(), lr=1e-3), [store.open_array("X")],
                                 plan, rows=rows)
    assert info["batch_size"] == len(rows) and info["reference_cells"] == len(rows)
    assert info["batches_per_epoch"] == 1 and info["steps_run"] == 4


def test_the_autoencoder_stops_on_a_loss_plateau_and_the_fixed_count_stays_an_option(tmp_path):
    config = small_config()
    store, _, _ = planted_store(tmp_path, config)
    arrays = [store.open_array("X"), store.open_array("layers/ltmg")]

    def fit(plateau_tol, lr):
        torch.manual_seed(0)
        model = DenseAutoencoder(200, 32, 8)
        plan = TrainPlan(steps=400, batch_size=300, gamma=0.1, alpha=0.9, l1=1.0, seed=0, memory_budget_mb=0,
                         plateau_tol=plateau_tol)  # one full batch a step: a flat loss is exactly flat
        return train.fit_autoencoder(model, torch.optim.Adam(model.parameters(), lr=lr), arrays, plan)

    flat = fit(0.01, 0.0)  # a model that does not learn: the second window is the first it can compare
    assert flat["stopped_on_plateau"] and flat["steps_total"] == 100 and flat["epochs_seen"] == 100
    learning = fit(0.01, 1e-3)  # falling by more than 1% a window at the start: not stopped there
    assert learning["steps_total"] > 100
    losses = [h["loss"] for h in learning["loss_history"]]
    assert all((a - b) / a >= 0.01 for a, b in zip(losses[:-2], losses[1:-1], strict=True))
    if learning["stopped_on_plateau"]:
        assert (losses[-2] - losses[-1]) / losses[-2] < 0.01
    fixed = fit(0.0, 0.0)  # 0: the fixed count, whatever the loss does
    assert fixed["steps_total"] == 400 and not fixed["stopped_on_plateau"]


def test_bfloat16_training_learns_the_planted_types_and_writes_float32_outputs(tmp_path):
    config = small_config(precision="bfloat16")
    store, counts, labels = planted_store(tmp_path, config)
    info = feature.run(stage_context(store, "feature", config))
    emb = store.open_array(FIRST_PASS.feature_embedding)[:]
    assert emb.dtype == np.float32 and np.isfinite(emb).all()
    assert info["loss_last"] < 0.5 * info["loss_first"]
    pred = KMeans(3, n_init=10, random_state=0).fit_predict(emb)
    assert adjusted_rand_score(labels, pred) > 0.9
    # the same seed in float32 trains another trajectory: the option is not ignored
    float32 = small_config(precision="float32")
    reference_store, _, _ = planted_store(tmp_path / "reference", float32)
    reference = feature.run(stage_context(reference_store, "feature", float32))
    assert info["precision"] == "bfloat16" and reference["precision"] == "float32"
    assert reference["loss_last"] != info["loss_last"]


def test_auto_precision_is_bfloat16_only_on_a_cpu_that_has_it(monkeypatch):
    from scgnn_scale import devices

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: True)
    assert devices.training_precision("auto", cpu) == "bfloat16"
    assert devices.training_precision("auto", cuda) == "float32"
    assert devices.training_precision("float32", cpu) == "float32"
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: False)
    assert devices.training_precision("auto", cpu) == "float32"
    assert devices.training_precision("bfloat16", cpu) == "bfloat16"
