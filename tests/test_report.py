"""The run report (RUN_DIR/report/index.html), ``scgnn-scale report`` and ``scgnn-scale inspect`` on a tiny run."""

import base64
import io
import logging
import re
import shutil
import subprocess

import numpy as np
import pytest
import zarr
from conftest import planted_adata

from scgnn_scale import report
from scgnn_scale.cli import main
from scgnn_scale.pipeline import STAGE_NAMES
from scgnn_scale.run_state import describe_run, format_run_state
from scgnn_scale.store import RunStore, run_lock

# seconds, not minutes: few steps, 64-row chunks so that the cell arrays have several chunks to read
TINY = """
[feature]
min_steps = 100
iter_steps = 30
[gae]
epochs = 40
[iterate]
max_iterations = 2
cluster_steps = 30
[impute]
steps = 100
[ltmg]
max_iter = 30
[store]
chunk_rows = 64
[runtime]
n_workers = 1
"""
N_CELLS = 240
SECTIONS = ("Summary", "Graph embedding", "Loss curves", "Iterations", "LTMG components per gene",
            "Stages: time and peak memory", "Configuration")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def tiny_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("input")
    path = d / "tiny.h5ad"
    planted_adata(n_cells=N_CELLS, n_genes=150, n_types=3, seed=1).write_h5ad(path)
    cfg = d / "tiny.toml"
    cfg.write_text(TINY)
    return path, cfg


def _run(tiny_input, out, *extra):
    inp, cfg = tiny_input
    return main(["run", str(inp), "--out", str(out), "--config", str(cfg), "--label-key", "label", "--quiet", *extra])


@pytest.fixture(scope="module")
def finished_run(tiny_input, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "finished"
    assert _run(tiny_input, out) == 0
    return out


@pytest.fixture(scope="module")
def partial_run(tiny_input, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "partial"
    assert _run(tiny_input, out, "--until", "graph") == 0
    return out


def _sections(page: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", page)


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _png_size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(png)).size


# -- the page --------------------------------------------------------------------------------------
def test_run_writes_a_self_contained_report_with_every_section(finished_run):
    path = finished_run / "report" / "index.html"
    page = path.read_text()
    assert _sections(page) == list(SECTIONS)
    images = _images(page)
    assert len(images) == 5  # embedding, losses, iterations, LTMG, stages
    for png in images:
        width, height = _png_size(png)
        assert width == 1000 and height > 100
    # nothing fetched from elsewhere: no script, stylesheet link, or URL
    assert not re.search(r"<script|<link|https?://|src=\"(?!data:)", page)
    # the scatter is coloured by the clusters and by the run's label column, from every cell of this tiny run
    assert f"{N_CELLS} of {N_CELLS} cells" in page and "by clusters and by label &#x27;label&#x27;" in page
    # the three loss curves were recorded (the GAE's per epoch), so none is reported missing
    assert "Missing:" not in page
    assert "stopped by:" in page
    assert "<pre>[graph]\n" in page and "\nk = 10\n" in page and 'method = "leiden"' in page


def test_the_graph_autoencoder_records_its_loss_per_epoch(finished_run):
    info = RunStore.open(finished_run).stage_info("gae")
    assert [h["epoch"] for h in info["loss_history"]] == list(range(1, 41))
    assert info["loss_history"][-1]["loss"] == pytest.approx(info["loss_last"], abs=1e-4)


def test_loss_history_is_thinned_to_a_few_hundred_points():
    from scgnn_scale.graph_autoencoder import LOSS_HISTORY_POINTS, loss_history

    history = loss_history([float(i) for i in range(1000)])
    assert len(history) <= LOSS_HISTORY_POINTS + 1 and history[-1] == {"epoch": 1000, "loss": 999.0}
    assert loss_history([]) == []


def test_report_of_a_partial_run_draws_what_exists(partial_run):
    page = (partial_run / "report" / "index.html").read_text()
    assert _sections(page) == list(SECTIONS)
    # before the gae stage the feature embedding is drawn, and the missing stages are named
    assert "obsm[&#x27;X_scgnn_feature&#x27;]" in page
    assert "The iterate stage has not finished." in page
    assert "graph autoencoder (first pass): stage not finished" in page
    assert len(_images(page)) == 4  # embedding, feature loss, LTMG, stages


def test_a_report_that_fails_is_a_warning_not_a_failed_run(finished_run, tiny_input, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "report" / "index.html").unlink()

    def broken(*args, **kwargs):
        raise RuntimeError("no figure today")

    monkeypatch.setattr(report, "build_report", broken)
    with caplog.at_level(logging.INFO, logger="scgnn_scale"):
        assert _run(tiny_input, out) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("report: not written (RuntimeError: no figure today)" in w for w in warnings), warnings
    assert not (out / "report" / "index.html").exists()


def test_a_rerun_redraws_the_report_only_when_the_run_changed(finished_run, tiny_input, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    page = out / "report" / "index.html"
    before = page.read_text()
    with caplog.at_level(logging.INFO, logger="scgnn_scale"):
        assert _run(tiny_input, out) == 0
    assert any(r.getMessage().endswith("(up to date)") for r in caplog.records)
    assert page.read_text() == before
    # another label column is metadata: no stage is redone, but the page is drawn again, without the label panel
    inp, cfg = tiny_input
    assert main(["run", str(inp), "--out", str(out), "--config", str(cfg), "--quiet"]) == 0
    after = page.read_text()
    assert after != before and "coloured by clusters." in after and "label &#x27;label&#x27;" not in after


# -- bounded memory --------------------------------------------------------------------------------
class _RecordingArray:
    """An array that records each row range read from it."""

    def __init__(self, data, chunk_rows):
        self.data, self.shape, self.dtype = data, data.shape, data.dtype
        self.chunks = (chunk_rows, *data.shape[1:])
        self.reads = []

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop))
        return self.data[key]


def test_read_rows_reads_only_the_chunks_that_hold_selected_rows():
    data = np.arange(100 * 3, dtype=np.float32).reshape(100, 3)
    arr = _RecordingArray(data, chunk_rows=10)
    rows = np.array([3, 4, 57, 99])
    np.testing.assert_array_equal(report.read_rows(arr, rows), data[rows])
    assert arr.reads == [(0, 10), (50, 60), (90, 100)]


def test_subsample_is_seeded_sorted_and_capped():
    a = report.subsample(1_000_000, 20_000, seed=0)
    assert a.size == 20_000 and np.all(np.diff(a) > 0) and a[-1] < 1_000_000
    np.testing.assert_array_equal(a, report.subsample(1_000_000, 20_000, seed=0))
    np.testing.assert_array_equal(report.subsample(50, 20_000), np.arange(50))


def test_report_reads_a_subsample_chunk_by_chunk_and_never_the_expression(finished_run, tmp_path, monkeypatch):
    """With max_cells 50 of 240 cells: every read of a per-cell array is at most one chunk of rows, the scatter
    gets 50 cells, and X and the layers (cells x genes) are never read."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    store = RunStore.open(run)
    n, g = store.open_array("X").shape
    emb = store.open_array("obsm/X_scgnn")[:]
    with store.staging("publish") as st:  # the GAE writes 65,536-row chunks: here several, to see reads by block
        st.create_matrix("obsm/X_scgnn", emb.shape, emb.dtype, chunks=(64, emb.shape[1]))[:] = emb
    reads = []
    for name in ("__getitem__", "get_basic_selection", "get_orthogonal_selection", "get_coordinate_selection"):
        original = getattr(zarr.Array, name)

        def spy(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            reads.append((tuple(self.shape), tuple(self.chunks), np.shape(out)))
            return out

        monkeypatch.setattr(zarr.Array, name, spy)
    drawn = []
    monkeypatch.setattr(report.plots, "scatter", lambda xy, panels, **kw: drawn.append(len(xy)) or b"\x89PNG")
    report.write_report(run, tmp_path / "r.html", max_cells=50)
    assert drawn == [50]
    per_cell = [r for r in reads if r[0] and r[0][0] == n]
    assert per_cell, "the embedding and the clusters are read"
    assert all(out[0] <= chunks[0] for _, chunks, out in per_cell), per_cell
    assert any(chunks[0] < n for _, chunks, _ in per_cell)  # the embedding has several chunks: read by block
    assert not [r for r in reads if len(r[0]) == 2 and r[0][1] == g and r[0][0] == n]


def test_read_obs_column_of_strings_and_categories(tmp_path):
    import pandas as pd

    from scgnn_scale.config import RunConfig
    from scgnn_scale.testing import store_with_matrix

    store = store_with_matrix(tmp_path / "s", np.ones((6, 2)), labels=list("abcabc"), config=RunConfig())
    with store.staging("extra") as st:
        st.write_elem("obs/name", np.array([f"c{i}" for i in range(6)], dtype=object))
        st.write_elem("obs/cat", pd.Categorical(["x", None, "y", "x", "y", None]))
    rows = np.array([1, 2, 5])
    assert list(report.read_obs_column(store, "label", rows)) == ["b", "c", "c"]
    assert list(report.read_obs_column(store, "name", rows)) == ["c1", "c2", "c5"]
    assert list(report.read_obs_column(store, "cat", rows)) == [None, "y", None]


# -- the CLI ---------------------------------------------------------------------------------------
def test_report_command_redraws_and_refuses_to_replace_another_file(finished_run, tmp_path, capsys):
    to = tmp_path / "copy.html"
    assert main(["report", str(finished_run), "--to", str(to), "--max-cells", "60", "--projection", "tsne"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {to}"
    page = to.read_text()
    assert "t-SNE of the graph embedding" in page and f"60 of {N_CELLS} cells" in page
    assert main(["report", str(finished_run), "--to", str(to)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["report", str(finished_run), "--to", str(to), "--overwrite"]) == 0
    assert "first two principal components" in to.read_text()
    directory = tmp_path / "dir"
    directory.mkdir()
    assert main(["report", str(finished_run), "--to", str(directory)]) == 0
    assert (directory / "index.html").is_file()


@pytest.mark.parametrize("command", ["report", "inspect"])
def test_a_directory_that_is_not_a_run_is_one_line(command, tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hello")
    for target in (tmp_path, tmp_path / "absent"):
        assert main([command, str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "not a scgnn-scale run directory" in err, err


def test_inspect_a_finished_run(finished_run, tiny_input, capsys):
    assert main(["inspect", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert f"input: {tiny_input[0].resolve()} ({N_CELLS} cells x 150 genes), labels obs['label']" in out
    assert "running: no" in out
    for stage in STAGE_NAMES:
        assert re.search(rf"^  {stage} +done +[0-9.]+ s +[0-9,]+ MiB", out, re.M), (stage, out)
    assert re.search(r"cluster +done .* \d+ clusters \(leiden\), ARI [01]\.\d{3}$", out, re.M)
    assert re.search(r"iterate +done .* \d iterations?, stopped: \w+, \d+ clusters$", out, re.M)
    assert "10 of 10 stages done" in out and "left to do: nothing" in out
    assert f"report: {finished_run / 'report' / 'index.html'}" in out


def test_inspect_a_partial_run(partial_run, capsys):
    assert main(["inspect", str(partial_run)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  graph +done", out, re.M)
    for stage in ("gae", "cluster", "iterate", "impute"):
        assert re.search(rf"^  {stage} +to do +- +-$", out, re.M), (stage, out)
    assert "6 of 10 stages done" in out
    assert "left to do: gae, cluster, iterate, impute" in out


def test_inspect_tells_a_running_run_stale_stages_and_a_killed_iteration(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    with run_lock(out):
        state = describe_run(out)
        assert state["running"] and state["running"].startswith("pid ")
        assert f"running: yes, {state['running']} holds the lock" in format_run_state(state)
    assert describe_run(out)["running"] is None
    # another graph.k in the manifest's config: the graph stage and those after it are stale
    store = RunStore.open(out)
    store.manifest["config"]["graph"]["k"] = 12
    store.manifest["stages"].pop("iterate")
    store.save_checkpoint("iterate", "old", {"done": 1, "history": [], "stopped": None})
    store._save_manifest()
    states = {s["stage"]: s["state"] for s in describe_run(out)["stages"]}
    assert states == {**dict.fromkeys(STAGE_NAMES[:5], "done"), "graph": "stale", "gae": "stale",
                      "cluster": "stale", "iterate": "to do", "impute": "stale"}
    # a checkpoint of this config is a stage part-way done
    from scgnn_scale.config import config_from_dict
    from scgnn_scale.pipeline import chain_hashes

    hashes = chain_hashes(config_from_dict(store.manifest["config"]), store.manifest["identity"]["input"])
    store.save_checkpoint("iterate", hashes["iterate"], {"done": 1, "history": [], "stopped": None})
    state = describe_run(out)
    assert [s for s in state["stages"] if s["stage"] == "iterate"][0]["state"] == "partial"
    assert "1 iteration(s) finished; resumes after them" in format_run_state(state)


# -- the page in a browser -------------------------------------------------------------------------
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(finished_run, tmp_path):
    from PIL import Image

    url = (finished_run / "report" / "index.html").resolve().as_uri()
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,3000", url], check=True,
                   capture_output=True, timeout=120)
    dom = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    assert _sections(dom) == list(SECTIONS)
    assert len(re.findall(r"<img [^>]*src=\"data:image/png;base64,", dom)) == 5

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (3000, 1200, 3)
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 200, "the page looks blank"
    # the scatter (the page's first figure, in its upper third) shows the clusters' colours: tab10's orange and
    # green are used by clusters 1 and 2 and by no other figure
    top = image[:1000].reshape(-1, 3)
    for rgb in ((255, 127, 14), (44, 160, 44)):
        assert (np.abs(top.astype(int) - rgb).sum(axis=1) < 10).sum() > 50, rgb
