"""A newcomer's first inputs and outputs: a guessed CSV orientation is said, URL inputs without their packages
are one-line errors, and outputs under missing folders are created."""

import importlib.util
import logging
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgnn_scale.cli import main
from scgnn_scale.errors import InputError
from scgnn_scale.readers import open_input
from scgnn_scale.testing import store_with_matrix

HAVE_HTTP = all(importlib.util.find_spec(m) is not None for m in ("aiohttp", "requests"))


def _table(path, x, rows, cols):
    pd.DataFrame(x, index=rows, columns=cols).to_csv(path, sep="\t", float_format="%g")
    return str(path)


def _orientation_warnings(caplog):
    return [r for r in caplog.records
            if r.name == "scgnn_scale" and r.levelno == logging.WARNING and "--orientation" in r.getMessage()]


def _dense(reader):
    x = np.zeros((reader.n_obs, reader.n_vars), dtype=np.float32)
    for start, stop, block in reader.iter_blocks():
        x[start:stop] = block.toarray()
    return x


# ---- 1. CSV/TSV orientation guessed without evidence --------------------------------------------------


def test_auto_orientation_without_evidence_warns(tmp_path, caplog):
    """7 cells x 4 genes whose names show nothing: read as 4 cells x 7 genes, and the log says so."""
    x = np.arange(28, dtype=np.float32).reshape(7, 4)
    path = _table(tmp_path / "cells_by_genes.tsv", x, [f"c{i}" for i in range(7)], [f"g{j}" for j in range(4)])
    caplog.set_level(logging.WARNING, logger="scgnn_scale")
    with open_input(path) as reader:
        assert (reader.n_obs, reader.n_vars) == (4, 7)
    (record,) = _orientation_warnings(caplog)
    message = record.getMessage()
    assert path in message
    assert "genes x cells" in message
    assert "4 cells x 7 genes" in message
    assert "--orientation cells-x-genes" in message

    caplog.clear()
    with open_input(path, orientation="cells-x-genes") as reader:
        assert (reader.n_obs, reader.n_vars) == (7, 4)
        np.testing.assert_array_equal(_dense(reader), x)
    with open_input(path, orientation="genes-x-cells") as reader:
        assert (reader.n_obs, reader.n_vars) == (4, 7)
    assert _orientation_warnings(caplog) == []


@pytest.mark.parametrize("rows,cols,shape", [
    ([f"c{i}" for i in range(7)], [f"ENSG{j:011d}" for j in range(4)], (7, 4)),  # header: Ensembl genes
    ([f"gene{i}" for i in range(7)], [f"c{j}" for j in range(4)], (4, 7)),  # first column: genes
])
def test_auto_orientation_with_evidence_is_silent(tmp_path, caplog, rows, cols, shape):
    path = _table(tmp_path / "m.tsv", np.ones((7, 4), dtype=np.float32), rows, cols)
    caplog.set_level(logging.WARNING, logger="scgnn_scale")
    with open_input(path) as reader:
        assert (reader.n_obs, reader.n_vars) == shape
    assert _orientation_warnings(caplog) == []


# ---- 2. URL inputs -----------------------------------------------------------------------------------


class _RangeHandler(BaseHTTPRequestHandler):
    """GET/HEAD of the files in ``directory``, with the byte ranges fsspec's HTTP files ask for."""

    directory = None

    def log_message(self, *args):
        pass

    def _send(self, with_body: bool) -> None:
        path = self.directory / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            start = int(wanted[1])
            end = min(int(wanted[2]) if wanted[2] else len(data) - 1, len(data) - 1)
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            data = data[start:end + 1]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def do_GET(self):
        self._send(True)

    def do_HEAD(self):
        self._send(False)


@pytest.fixture
def http_dir(tmp_path):
    """(directory, base URL): the directory served on 127.0.0.1 until the test ends."""
    served = tmp_path / "served"
    served.mkdir()
    handler = type("Handler", (_RangeHandler,), {"directory": served})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_http_input(http_dir, tmp_path, capsys):
    served, base = http_dir
    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, (40, 12)).astype(np.float32)
    ad.AnnData(sp.csr_matrix(x), obs=pd.DataFrame(index=[f"c{i}" for i in range(40)]),
               var=pd.DataFrame(index=[f"g{j}" for j in range(12)])).write_h5ad(served / "a.h5ad")
    url = f"{base}/a.h5ad"
    if HAVE_HTTP:
        with open_input(url, block_rows=16) as reader:
            assert (reader.n_obs, reader.n_vars) == (40, 12)
            np.testing.assert_array_equal(_dense(reader), x)
    else:
        assert main(["run", url, "--out", str(tmp_path / "run"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("scgnn-scale: error:")]
        assert lines == [f"scgnn-scale: error: {url}: reading http:// inputs needs aiohttp and requests; "
                         "install them with pip install -e \".[remote]\""]


@pytest.mark.parametrize("url,package", [("s3://bucket/a.h5ad", "s3fs"), ("gs://bucket/a.h5ad", "gcsfs")])
def test_cloud_input_without_its_package(url, package, monkeypatch):
    cached = importlib.import_module("fsspec.registry")._registry  # (fsspec.registry is its read-only view)
    # as where the package is not installed: its import fails, and fsspec has no class of it cached
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.delitem(cached, url.split(":")[0], raising=False)
    with pytest.raises(InputError, match=re.escape(f"{url}: reading {url.split(':')[0]}:// inputs needs "
                                                   f"{package}; install them with pip install "
                                                   "-e \".[remote]\"")):
        open_input(url)


def test_unknown_url_scheme():
    with pytest.raises(InputError, match=re.escape("nosuchscheme://x/a.h5ad: unknown URL scheme nosuchscheme://")):
        open_input("nosuchscheme://x/a.h5ad")


@pytest.mark.skipif(not HAVE_HTTP, reason="reading http:// inputs needs aiohttp and requests")
def test_unreachable_http_input():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a.h5ad"
    with pytest.raises(InputError, match=re.escape(f"{url}: input file not found")):
        open_input(url)


# ---- 3. outputs under missing folders -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["atlas.h5ad", "atlas.zarr"])
def test_simulate_creates_missing_folders(tmp_path, name):
    out = tmp_path / "new" / "deeper" / name
    assert main(["simulate", str(out), "--cells", "60", "--genes", "20", "--types", "2", "--quiet"]) == 0
    adata = ad.read_h5ad(out) if name.endswith(".h5ad") else ad.read_zarr(out)
    assert adata.shape == (60, 20)


def test_simulate_under_a_file_is_an_input_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["simulate", str(tmp_path / "file" / "a.h5ad"), "--cells", "10", "--genes", "5",
                 "--types", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot create the directory" in err and "Traceback" not in err


@pytest.fixture
def small_run(tmp_path):
    x = np.random.default_rng(0).poisson(1.0, (30, 8)).astype(np.float32)
    return store_with_matrix(tmp_path / "run", x)


def test_export_h5ad_creates_missing_folders(small_run, tmp_path):
    out = tmp_path / "new" / "deeper" / "res.h5ad"
    assert main(["export", str(small_run.root), "--format", "h5ad", "--to", str(out)]) == 0
    assert ad.read_h5ad(out).shape == (30, 8)


def test_export_csv_creates_missing_folders(small_run, tmp_path):
    out = tmp_path / "new" / "deeper" / "csv"
    assert main(["export", str(small_run.root), "--format", "csv", "--to", str(out)]) == 0
    assert out.is_dir()


def test_export_under_a_file_is_an_input_error(small_run, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for fmt, to in (("h5ad", "file/sub/res.h5ad"), ("csv", "file/sub/csv")):
        assert main(["export", str(small_run.root), "--format", fmt, "--to", str(tmp_path / to)]) == 2
        err = capsys.readouterr().err
        assert "cannot create the directory" in err and "Traceback" not in err


def test_an_element_of_unknown_encoding_is_an_input_error(tmp_path, capsys):
    # found by tests/test_fuzz.py ('garbled'): anndata has no reader for an empty encoding-type
    import h5py

    path = tmp_path / "counts.h5ad"
    ad.AnnData(np.ones((20, 5), np.float32)).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        f["var/_index"].attrs["encoding-type"] = ""
    before = path.read_bytes()
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--until", "ingest", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert path.read_bytes() == before


def test_a_row_pointer_that_ends_short_of_the_data_is_an_input_error(tmp_path, capsys):
    # found by tests/test_fuzz.py ('indptr_decreasing'): each block's rows were consistent, but the pointer
    # ended before the stored values, so only a prefix of them was read
    import h5py
    import scipy.sparse as sp

    path = tmp_path / "counts.h5ad"
    ad.AnnData(sp.csr_matrix(np.arange(1, 13, dtype=np.float32).reshape(3, 4))).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        f["X/indptr"][...] = [0, 4, 8, 9]  # 12 values stored
    before = path.read_bytes()
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--until", "ingest", "--quiet",
                 "--ingest-block-rows", "2"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "indptr" in err and "Traceback" not in err
    assert path.read_bytes() == before
