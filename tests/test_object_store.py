"""A run directory on an object store: the input and RUN_DIR on a real S3 API server (moto's, on 127.0.0.1).

The same run on local disk is the reference: the S3 run must give the same clusters, embedding and imputation;
a run SIGKILLed mid-stage resumes from the manifest (the commit point: no rename on S3) to the same results;
verify, inspect, report and export read it; bad URLs, a missing bucket and missing credentials are one line;
the secret key of the S3 client is never written anywhere.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import S3_SECRET, TINY_CONFIG, planted_adata

from scgnn_scale import read_run
from scgnn_scale.cli import main
from scgnn_scale.paths import ObjectPath, as_path, redact, replace_tree


def _args(inp, cfg, out, *extra):
    return ["run", str(inp), "--out", str(out), "--config", str(cfg), "--label-key", "label", "--quiet", *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, s3_server):
    """The tiny planted atlas on local disk and at s3://inputs/tiny.h5ad, its config, and the local run."""
    d = tmp_path_factory.mktemp("input")
    path = d / "tiny.h5ad"
    planted_adata(n_cells=240, n_genes=150, n_types=3, seed=1).write_h5ad(path)
    cfg = d / "tiny.toml"
    cfg.write_text(TINY_CONFIG)
    s3_server.bucket("inputs")
    s3_server.filesystem().put_file(str(path), "inputs/tiny.h5ad")
    local = d / "local_run"
    assert main(_args(path, cfg, local)) == 0
    return {"local_input": path, "url": "s3://inputs/tiny.h5ad", "cfg": cfg, "local_run": local}


@pytest.fixture(scope="module")
def s3_run(tiny, s3_server):
    out = s3_server.bucket("runs") + "/full"
    assert main(_args(tiny["url"], tiny["cfg"], out)) == 0
    return out


def _assert_same_results(a_dir, b_dir):
    a, b = read_run(a_dir), read_run(b_dir)
    np.testing.assert_array_equal(a.obs_names, b.obs_names)
    np.testing.assert_array_equal(a.obs["scgnn_cluster"].to_numpy(), b.obs["scgnn_cluster"].to_numpy())
    np.testing.assert_allclose(a.obsm["X_scgnn"], b.obsm["X_scgnn"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.layers["imputed"][:100].compute(), b.layers["imputed"][:100].compute(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(a.layers["ltmg"][:].compute(), b.layers["ltmg"][:].compute())


def test_the_run_on_s3_equals_the_run_on_local_disk(tiny, s3_run, s3_server):
    _assert_same_results(tiny["local_run"], s3_run)
    fs = s3_server.filesystem()
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("runs/full")}
    assert {"adata.zarr", "work.zarr", "manifest.json", "integrity.json", "models", "run.log", "report"} <= names
    assert ".lock" not in names and "staging" not in names  # the lease is given back, nothing left staged
    manifest = json.loads(fs.cat_file("runs/full/manifest.json"))
    assert list(manifest["stages"]) == list(json.loads((tiny["local_run"] / "manifest.json").read_text())["stages"])
    log = fs.cat_file("runs/full/run.log").decode()
    assert "impute: done" in log and "report: s3://runs/full/report/index.html" in log  # uploaded at the end
    # the integrity record holds every kept object, with its ETag where a local run has a time
    record = json.loads(fs.cat_file("runs/full/integrity.json"))["files"]
    etags = {p: info["ETag"].strip('"') for p, info in fs.find("runs/full", detail=True).items()}
    assert record and all(entry[1] == etags[f"runs/full/{rel}"] for rel, entry in record.items())
    assert any(rel.startswith("models/") for rel in record)


def test_verify_inspect_report_and_export_read_the_run_on_s3(tiny, s3_run, tmp_path, capsys):
    assert main(["verify", s3_run]) == 0
    assert "no damage" in capsys.readouterr().out
    assert main(["inspect", s3_run]) == 0
    out = capsys.readouterr().out
    assert "10 of 10 stages done" in out and "running: no" in out and "s3://runs/full/report/index.html" in out
    assert main(["report", s3_run, "--to", str(tmp_path / "report.html")]) == 0
    assert "scgnn-scale run report" in (tmp_path / "report.html").read_text()
    assert main(["export", s3_run, "--to", str(tmp_path / "out.h5ad")]) == 0
    assert main(["export", str(tiny["local_run"]), "--to", str(tmp_path / "local.h5ad")]) == 0
    import anndata

    a, b = anndata.read_h5ad(tmp_path / "out.h5ad"), anndata.read_h5ad(tmp_path / "local.h5ad")
    assert a.shape == b.shape and set(a.layers) == set(b.layers) and set(a.obsm) == set(b.obsm)
    np.testing.assert_array_equal(a.obs["scgnn_cluster"].to_numpy(), b.obs["scgnn_cluster"].to_numpy())


def test_a_changed_object_is_found_by_verify_and_refused_by_readers(tiny, s3_run, s3_server, capsys):
    fs = s3_server.filesystem()
    fs.copy("runs/full", "runs/damaged", recursive=True)
    chunk = sorted(f for f in fs.find("runs/damaged/adata.zarr/obsm/X_scgnn") if "/c/" in f)[0]
    data = bytearray(fs.cat_file(chunk))
    data[len(data) // 2] ^= 0xFF  # same size: only the ETag and the checksum tell
    fs.pipe_file(chunk, bytes(data))
    assert main(["verify", "s3://runs/damaged"]) == 1
    captured = capsys.readouterr()
    assert "obsm/X_scgnn chunk" in captured.out + captured.err and "fails its checksum" in captured.out + captured.err
    assert main(["export", "s3://runs/damaged", "--to", "/dev/null/x.h5ad"]) == 2
    err = capsys.readouterr().err
    assert "obsm/X_scgnn chunk" in err and "Traceback" not in err


@pytest.mark.parametrize("kill_after_stage", ["ltmg", "cluster"])
def test_sigkill_mid_stage_then_resume_on_s3_gives_the_same_results(tiny, s3_run, s3_server, kill_after_stage):
    """Killed in the stage after ``kill_after_stage`` (feature: models and checkpoints; iterate: moved working
    arrays and the cluster autoencoders), the rerun takes the dead run's lease at once and ends equal."""
    out = f"s3://runs/killed-{kill_after_stage}"
    fs = s3_server.filesystem()
    cmd = [sys.executable, "-m", "scgnn_scale.cli", *_args(tiny["url"], tiny["cfg"], out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **s3_server.env, "PYTHONPATH": os.getcwd()})
    deadline, manifest = time.time() + 600, out[len("s3://"):] + "/manifest.json"
    while time.time() < deadline and proc.poll() is None:
        try:
            if kill_after_stage in json.loads(fs.cat_file(manifest))["stages"]:
                break
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    time.sleep(1.0)  # into the next stage
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stages = json.loads(fs.cat_file(manifest))["stages"]
    assert kill_after_stage in stages and "impute" not in stages
    assert fs.exists(out[len("s3://"):] + "/.lock")  # the killed run's lease is left behind...
    t0 = time.perf_counter()
    assert main(_args(tiny["url"], tiny["cfg"], out)) == 0  # ...and taken at once: its holder is dead
    assert time.perf_counter() - t0 < 400
    _assert_same_results(s3_run, out)
    assert not fs.exists(out[len("s3://"):] + "/staging")


def test_a_live_lease_refuses_a_second_run_and_a_lapsed_one_is_taken(tiny, s3_server, capsys):
    out = s3_server.bucket("leases") + "/run"
    fs = s3_server.filesystem()
    fs.pipe_file("leases/run/.lock", json.dumps({"holder": "pid 4242 on another-host", "host": "another-host",
                                                 "pid": 4242, "token": "x", "heartbeat": time.time()}).encode())
    assert main(_args(tiny["url"], tiny["cfg"], out, "--until", "ingest")) == 2
    err = capsys.readouterr().err
    assert "another scgnn-scale run is using this directory (pid 4242 on another-host)" in err
    assert len(err.strip().splitlines()) == 1
    fs.pipe_file("leases/run/.lock", json.dumps({"holder": "pid 4242 on another-host", "host": "another-host",
                                                 "pid": 4242, "token": "x", "heartbeat": time.time() - 3600}).encode())
    assert main(_args(tiny["url"], tiny["cfg"], out, "--until", "ingest")) == 0
    assert not fs.exists("leases/run/.lock")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("scgnn-scale: error: "), err
    return lines[0]


def test_a_missing_bucket_or_a_bad_url_is_one_line(tiny, s3_server, capsys):
    assert main(_args(tiny["local_input"], tiny["cfg"], "s3://no-such-bucket/run")) == 2
    line = _one_line_error(capsys)
    assert "s3://no-such-bucket/run: cannot" in line and "the bucket no-such-bucket does not exist" in line
    assert main(_args(tiny["local_input"], tiny["cfg"], "nosuchscheme://b/run")) == 2
    assert "nosuchscheme://b/run: unknown URL scheme nosuchscheme://" in _one_line_error(capsys)
    fs = s3_server.filesystem()
    s3_server.bucket("other")
    fs.pipe_file("other/data/notes.txt", b"not a run")
    assert main(_args(tiny["local_input"], tiny["cfg"], "s3://other/data")) == 2
    assert "s3://other/data: --out is a non-empty prefix that is not a scgnn-scale run" in _one_line_error(capsys)
    for command in (["verify", "s3://other/data"], ["inspect", "s3://no-such-bucket/run"]):
        assert main(command) == 2
        assert "not a scgnn-scale run" in _one_line_error(capsys)


def test_no_credentials_is_one_line(tiny, s3_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
                "PYTHONPATH": os.getcwd()})
    s3_server.bucket("nocreds")
    proc = subprocess.run([sys.executable, "-m", "scgnn_scale.cli",
                           *_args(tiny["local_input"], tiny["cfg"], "s3://nocreds/run")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "s3://nocreds/run" in lines[0] and "no credentials found" in lines[0], lines


def test_the_secret_key_and_secrets_in_urls_are_never_shown_or_kept(tiny, s3_run, s3_server, capsys, caplog):
    fs = s3_server.filesystem()
    kept = [fs.cat_file(f"runs/full/{name}") for name in ("run.log", "manifest.json", "integrity.json",
                                                          "report/index.html")]
    config = read_run(s3_run).uns["scgnn"]["config"]
    kept.append(json.dumps(config, default=str).encode())
    for blob in kept:
        assert S3_SECRET.encode() not in blob
    # secrets carried by URLs: a password, a signed query
    token = "sig-" + S3_SECRET
    for out in (f"s3://user:{token}@runs/x", f"s3://runs/x?X-Amz-Signature={token}"):
        assert main(_args(tiny["local_input"], tiny["cfg"], out)) == 2
        err = capsys.readouterr().err
        assert token not in err and "Traceback" not in err
    assert main(_args(f"https://user:{token}@127.0.0.1:9/tiny.h5ad?sig={token}", tiny["cfg"], "s3://runs/y")) == 2
    captured = capsys.readouterr()
    assert token not in captured.err + captured.out + caplog.text
    assert redact(f"see https://u:{token}@h/p?q={token} and s3://b/k") == "see https://***@h/p?*** and s3://b/k"


def test_paths_resolve_local_and_object_store_places(tmp_path):
    assert as_path(str(tmp_path)) == tmp_path
    assert as_path(f"file://{tmp_path}") == tmp_path  # file:// is a local directory, handled as before
    place = as_path("memory://scgnn-paths/run")
    assert isinstance(place, ObjectPath) and str(place / "models" / "a.pt") == "memory:///scgnn-paths/run/models/a.pt"


def test_replace_tree_repeated_after_a_kill_finishes_the_move():
    """A copy cut short leaves the source whole (the next call redoes it); the source's metadata goes first,
    so a removal cut short leaves no array that a later call would move half of."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = as_path("memory://scgnn-replace")
    for name, data in {"src/zarr.json": b"{}", "src/c/0": b"a", "src/c/1": b"b", "dst/c/0": b"old"}.items():
        fs.pipe_file(f"{root.path}/{name}", data)
    fs.copy(f"{root.path}/src/c/0", f"{root.path}/dst/c/9")  # a copy cut short: no metadata at the destination
    replace_tree(root / "src", root / "dst")
    assert sorted(fs.find(f"{root.path}/dst")) == [f"{root.path}/dst/{n}" for n in ("c/0", "c/1", "zarr.json")]
    assert fs.cat_file(f"{root.path}/dst/c/0") == b"a" and not fs.exists(f"{root.path}/src")


def test_cloud_vm_script_resumes_a_preempted_vms_run_from_the_bucket(tiny, s3_run, s3_server):
    """deploy/cloud-vm.sh with OUT in a bucket: the VM is killed mid-run; its successor (another host: the
    dead run's lease names another machine, so only its lapse frees it) runs the same script, waits for the
    lease and resumes to the same results."""
    fs = s3_server.filesystem()
    script = os.path.join(os.getcwd(), "deploy", "cloud-vm.sh")
    env = {**os.environ, **s3_server.env, "INPUT": tiny["url"], "OUT": "s3://runs/vm", "VENV": sys.prefix,
           "EXTRA": f"--config {tiny['cfg']} --label-key label --quiet", "SCGNN_LEASE_SECONDS": "8",
           "PYTHONPATH": os.getcwd()}
    vm = subprocess.Popen(["bash", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and vm.poll() is None:
        try:
            if "ltmg" in json.loads(fs.cat_file("runs/vm/manifest.json"))["stages"]:
                break
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    time.sleep(1.0)
    assert vm.poll() is None, "the run ended before the VM could be pre-empted"
    os.killpg(vm.pid, signal.SIGKILL)
    vm.wait()
    lease = json.loads(fs.cat_file("runs/vm/.lock"))
    fs.pipe_file("runs/vm/.lock", json.dumps({**lease, "host": "the-preempted-vm",
                                              "heartbeat": time.time()}).encode())
    successor = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=900)
    assert successor.returncode == 0, successor.stderr[-2000:]
    assert "held by another run (a pre-empted VM's lease?); trying again" in successor.stderr
    assert "impute" in json.loads(fs.cat_file("runs/vm/manifest.json"))["stages"]
    _assert_same_results(s3_run, "s3://runs/vm")
