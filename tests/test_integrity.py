"""A damaged store is found (verify, run, export, evaluate, read_run) and repaired by the next run; the
input is known by all of its bytes."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import SHORT_CONFIG, planted_adata

from scgnn_scale import read_run
from scgnn_scale.cli import main
from scgnn_scale.errors import InputError
from scgnn_scale.integrity import RECORD_NAME, store_key
from scgnn_scale.store import RunStore

TINY = SHORT_CONFIG


@pytest.fixture(scope="module")
def tiny_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("input")
    path = d / "tiny.h5ad"
    planted_adata(n_cells=200, n_genes=120, n_types=3, seed=4).write_h5ad(path)
    cfg = d / "tiny.toml"
    cfg.write_text(TINY)
    return path, cfg


def _args(inp, cfg, out, *extra):
    return ["run", str(inp), "--out", str(out), "--config", str(cfg), "--label-key", "label", "--quiet", *extra]


@pytest.fixture(scope="module")
def finished(tiny_input, tmp_path_factory):
    inp, cfg = tiny_input
    out = tmp_path_factory.mktemp("runs") / "finished"
    assert main(_args(inp, cfg, out)) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst, copy_function=shutil.copy2)  # times kept: the quick check reads nothing
    return dst


def _first_chunk(run: Path, array_dir: str) -> Path:
    chunks = sorted(p for p in (run / array_dir / "c").rglob("*") if p.is_file())
    assert chunks, f"no chunk under {array_dir}"
    return chunks[0]


def _damage(path: Path, how: str, keep_time: bool = False) -> None:
    st = path.stat()
    if how == "delete":
        path.unlink()
        return
    if how == "truncate":
        os.truncate(path, st.st_size - 3)
    else:  # flip one bit in the middle
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    if keep_time:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_every_kept_file_is_sealed_and_every_chunk_checks_itself(finished):
    record = json.loads((finished / RECORD_NAME).read_text())["files"]
    kept = {str(p.relative_to(finished)) for top in ("adata.zarr", "work.zarr", "models")
            for p in (finished / top).rglob("*") if p.is_file()}
    unsealed = {p for p in kept - set(record) if not p.startswith("adata.zarr/uns/scgnn/")}
    # only the groups' own metadata stays out (the root and the dict groups: no stage's output)
    assert all(p.endswith("zarr.json") and p.count("/") <= 2 for p in unsealed), sorted(unsealed)
    assert {"preprocess", "ltmg", "feature", "impute", "publish"} <= {v[2] for v in record.values()}
    for array in ("X", "layers/imputed", "obsm/X_scgnn", "obs/scgnn_cluster/codes", "obsp/scgnn_graph/data"):
        codecs = json.loads((finished / "adata.zarr" / array / "zarr.json").read_text())["codecs"]
        assert any(c["name"] == "crc32c" for c in codecs), array
    assert any(r.startswith("models/") and v[3] is not None for r, v in record.items())


def test_verify_passes_a_whole_run_and_a_copy(finished, tmp_path, capsys):
    assert main(["verify", str(finished), "--quiet"]) == 0
    assert "no damage" in capsys.readouterr().out
    plain = tmp_path / "copied"
    shutil.copytree(finished, plain)  # new modification times: every file is read once, all pass
    assert main(["verify", str(plain), "--quick", "--quiet"]) == 0


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
@pytest.mark.parametrize("array", ["adata.zarr/X", "adata.zarr/obsm/X_scgnn", "adata.zarr/layers/imputed",
                                   "adata.zarr/obs/scgnn_cluster/codes", "work.zarr/first_pass/X_scgnn_feature",
                                   "models"])
def test_damage_is_named_by_verify_and_refused_by_readers(finished, tmp_path, capsys, array, how):
    run = _copy(finished, tmp_path)
    if array == "models":
        target = sorted((run / "models").glob("*.pt"))[0]
    elif not (run / array).exists():
        pytest.fail(f"{array} is not in the run")
    else:
        target = _first_chunk(run, array)
    _damage(target, how)
    key, chunk = store_key(str(target.relative_to(run)))
    assert main(["verify", str(run), "--quick", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"damaged: {key} chunk {chunk}" in out, out
    for argv in (["evaluate", str(run)], ["export", str(run), "--to", str(tmp_path / "x.h5ad")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0] and "rerun" in err[0], err
    assert not (tmp_path / "x.h5ad").exists()
    with pytest.raises(InputError, match=key):
        read_run(run)


def test_a_change_with_its_time_put_back_is_found_by_verify_and_by_reading(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    target = _first_chunk(run, "adata.zarr/layers/imputed")
    _damage(target, "flip", keep_time=True)
    assert main(["verify", str(run), "--quick", "--quiet"]) == 0  # documented: the quick check trusts the time
    assert main(["verify", str(run), "--quiet"]) == 1
    assert "layers/imputed chunk" in capsys.readouterr().out
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(run / "adata.zarr/layers/imputed", mode="r")[:]
    # verify marked it: the quick check of the next run, export or evaluate now finds it too
    assert main(["verify", str(run), "--quick", "--quiet"]) == 1
    assert main(["evaluate", str(run)]) == 2
    assert "layers/imputed chunk" in capsys.readouterr().err


def test_a_checksum_error_while_reading_is_one_line(finished, tmp_path, capsys, monkeypatch):
    run = _copy(finished, tmp_path)
    _damage(_first_chunk(run, "adata.zarr/obs/scgnn_cluster/codes"), "flip", keep_time=True)
    assert main(["evaluate", str(run)]) == 2  # the quick check trusts the time; the read does not
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failed its checksum" in err[0] and "scgnn-scale verify" in err[0], err


def test_run_redoes_the_damaged_stage_and_those_after_it(finished, tiny_input, tmp_path, caplog):
    inp, cfg = tiny_input
    run = _copy(finished, tmp_path)
    _damage(_first_chunk(run, "adata.zarr/layers/imputed"), "flip")
    _damage(_first_chunk(run, "adata.zarr/obsm/X_scgnn"), "delete")
    with caplog.at_level("INFO", logger="scgnn_scale"):
        assert main(_args(inp, cfg, run)) == 0
    text = caplog.text
    assert "damaged: layers/imputed chunk" in text and "damaged: obsm/X_scgnn chunk" in text
    assert "redoing impute" in text and "iterate: already done, skipped" in text
    assert main(["verify", str(run), "--quiet"]) == 0
    before, after = read_run(finished), read_run(run)
    np.testing.assert_array_equal(before.obs["scgnn_cluster"], after.obs["scgnn_cluster"])
    np.testing.assert_allclose(before.obsm["X_scgnn"], after.obsm["X_scgnn"])
    # the imputation was trained again from the same seed and inputs
    np.testing.assert_allclose(before.layers["imputed"].compute(), after.layers["imputed"].compute(), atol=1e-4)


def test_damage_to_an_early_stage_redoes_the_run_from_there(finished, tiny_input, tmp_path, caplog):
    inp, cfg = tiny_input
    run = _copy(finished, tmp_path)
    _damage(_first_chunk(run, "adata.zarr/X"), "truncate")
    with caplog.at_level("INFO", logger="scgnn_scale"):
        assert main(_args(inp, cfg, run)) == 0
    assert "redoing preprocess, ltmg, feature" in caplog.text
    assert main(["verify", str(run), "--quiet"]) == 0
    before, after = read_run(finished), read_run(run)
    np.testing.assert_array_equal(before.X[:].compute(), after.X[:].compute())  # preprocessing is exact
    from scgnn_scale.evaluate import clustering_metrics

    assert clustering_metrics(after.obs["label"], after.obs["scgnn_cluster"])["ari"] > 0.8


def test_a_run_without_a_record_is_said_to_be_unchecked(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (run / RECORD_NAME).unlink()
    assert main(["verify", str(run), "--quiet"]) == 0
    assert "no integrity record" in capsys.readouterr().out
    RunStore.open(run)  # nothing to check against: readable as before


def test_store_key_names_the_array_and_chunk():
    assert store_key("adata.zarr/X/c/3/1") == ("X", "3.1")
    assert store_key("adata.zarr/obs/c/codes/c/0") == ("obs/c/codes", "0")  # a column named 'c'
    assert store_key("work.zarr/first_pass/graph/data/c/2") == ("work/first_pass/graph/data", "2")
    assert store_key("adata.zarr/obsm/X_scgnn/zarr.json") == ("obsm/X_scgnn", "zarr.json")
    assert store_key("models/feature_ae.pt") == ("models/feature_ae.pt", "file")


# -- the input's identity ------------------------------------------------------------------------------
def _csv(path: Path, seed: int = 0) -> None:
    counts = np.random.default_rng(seed).poisson(2.0, size=(60, 40))
    lines = ["," + ",".join(f"cell{i}" for i in range(60))]
    lines += [f"gene{j}," + ",".join(str(v) for v in counts[:, j]) for j in range(40)]
    path.write_text("\n".join(lines) + "\n")


def test_a_same_size_edit_in_the_middle_of_the_input_is_named(tmp_path, capsys):
    inp = tmp_path / "counts.csv"
    _csv(inp)
    out = tmp_path / "run"
    assert main(["run", str(inp), "--out", str(out), "--until", "ingest", "--quiet"]) == 0
    data = bytearray(inp.read_bytes())
    middle = len(data) // 2
    while not chr(data[middle]).isdigit():
        middle += 1
    data[middle] = ord("7") if data[middle] != ord("7") else ord("3")  # same size, one count changed
    inp.write_bytes(bytes(data))
    assert main(["run", str(inp), "--out", str(out), "--until", "ingest", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the input {inp.resolve()} as it was before it changed" in err[0], err


def test_a_copy_of_the_input_is_the_same_input_and_an_unchanged_one_is_not_read_again(tmp_path, monkeypatch):
    from scgnn_scale import fingerprint

    inp = tmp_path / "counts.csv"
    _csv(inp)
    out = tmp_path / "run"
    assert main(["run", str(inp), "--out", str(out), "--until", "ingest", "--quiet"]) == 0
    hashed = []
    real = fingerprint.content_digest
    monkeypatch.setattr(fingerprint, "content_digest", lambda *a: hashed.append(a) or real(*a))
    assert main(["run", str(inp), "--out", str(out), "--until", "ingest", "--quiet"]) == 0
    assert hashed == []  # sizes and times unchanged: the recorded hash is reused
    moved = tmp_path / "elsewhere" / "counts.csv"
    moved.parent.mkdir()
    shutil.copy(inp, moved)
    assert main(["run", str(moved), "--out", str(out), "--until", "ingest", "--quiet"]) == 0
    assert len(hashed) == 1  # read once, found to be the same bytes: the run is reused
