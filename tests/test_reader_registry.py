"""The input-format registry: detection order, the unknown-format error, and a format registered from outside."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgnn_scale.errors import InputError
from scgnn_scale.readers import (
    Format,
    InputReader,
    Location,
    detect_format,
    open_input,
    register,
    registered_formats,
    unregister,
)

BUILTIN = ["anndata-zarr", "10x-mtx", "h5ad", "delimited", "10x-h5"]


@pytest.fixture
def detect_calls():
    """Every registered format's detect, recording the name of each format it is asked for (the formats are
    registered again, in the same order, with a recording detect, and put back afterwards)."""
    calls = []

    def recording(fmt):
        def detect(loc):
            calls.append(fmt.name)
            return fmt.detect(loc)
        return dataclasses.replace(fmt, detect=detect)

    originals = registered_formats()
    for fmt in originals:
        unregister(fmt.name)
    for fmt in originals:
        register(recording(fmt))
    yield calls
    for fmt in originals:
        unregister(fmt.name)
        register(fmt)


def test_detect_tries_every_format_in_registration_order(tmp_path, detect_calls):
    assert [f.name for f in registered_formats()] == BUILTIN
    unknown = tmp_path / "counts.xyz"
    unknown.write_text("hello\n")
    with pytest.raises(InputError):
        detect_format(Location(str(unknown)))
    assert detect_calls == BUILTIN

    detect_calls.clear()
    csv = tmp_path / "counts.csv"
    csv.write_text(",c1\ng1,1\n")
    assert detect_format(Location(str(csv))).name == "delimited"
    assert detect_calls == BUILTIN[:BUILTIN.index("delimited") + 1]  # the first match wins


def test_unknown_input_names_the_registered_formats(tmp_path):
    unknown = tmp_path / "counts.xyz"
    unknown.write_text("hello\n")
    with pytest.raises(InputError, match="unknown input format") as err:
        open_input(unknown)
    for name in BUILTIN:
        assert name in str(err.value)
    with pytest.raises(InputError, match="a directory that no registered format reads"):
        open_input(tmp_path)


class ToyReader(InputReader):
    """A '.toy' file: a line of gene names, then one line per cell: its name and its counts."""

    format = "toy"

    def __init__(self, loc, **opts):
        super().__init__(loc.text, **opts)
        with loc.open_text() as fh:
            lines = [line.split() for line in fh if line.strip()]
        self.genes, self.cells = lines[0], [row[0] for row in lines[1:]]
        self.x = np.array([row[1:] for row in lines[1:]], dtype=np.float32)

    def _load_names(self):
        return pd.DataFrame(index=self.cells), pd.DataFrame(index=self.genes)

    def _blocks(self):
        for start, stop in self._row_ranges():
            yield start, stop, sp.csr_matrix(self.x[start:stop])


TOY = Format(name="toy", expected=".toy", detect=lambda loc: loc.name.endswith(".toy"),
             open=lambda loc, *, orientation, **opts: ToyReader(loc, **opts))


def test_a_registered_format_is_opened_by_open_input(tmp_path):
    path = tmp_path / "counts.toy"
    path.write_text("g1 g2 g3\nc1 1 0 2\nc2 0 0 0\nc3 5 1 0\n")
    with pytest.raises(InputError, match="unknown input format"):
        open_input(path)
    register(TOY)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register(TOY)
        with open_input(path, block_rows=2) as reader:
            assert isinstance(reader, ToyReader) and reader.format == "toy"
            assert list(reader.obs.index) == ["c1", "c2", "c3"] and list(reader.var.index) == ["g1", "g2", "g3"]
            blocks = list(reader.iter_blocks())
        assert [(start, stop) for start, stop, _ in blocks] == [(0, 2), (2, 3)]
        assert np.array_equal(sp.vstack([b for _, _, b in blocks]).toarray(), reader.x)
        unknown = tmp_path / "counts.xyz"
        unknown.write_text("hello\n")
        with pytest.raises(InputError, match=r"toy \(\.toy\)"):  # listed while registered
            open_input(unknown)
    finally:
        unregister("toy")
    assert "toy" not in [f.name for f in registered_formats()]
    with pytest.raises(InputError, match="unknown input format"):
        open_input(path)

