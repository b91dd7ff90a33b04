"""The container and Kubernetes files of deploy/: they parse and say what the README says they do.

Nothing here builds an image or starts a container, except the test marked ``container``, which runs
``scgnn-scale --version`` in the CPU image when podman and the image are present (it skips otherwise).
"""

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "deploy" / "containers"
KUBERNETES = ROOT / "deploy" / "kubernetes"
IMAGE = "localhost/scgnn-scale:cpu"


def _torch_pin() -> str:
    """The torch version the README's quick start installs (`pip install torch==X`)."""
    match = re.search(r"pip install torch==([0-9.]+)", (ROOT / "README.md").read_text())
    assert match, "the README names no torch==X"
    return match.group(1)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def _arg_default(instructions, name):
    for word, rest in instructions:
        if word == "ARG" and rest.startswith(name + "="):
            return rest.split("=", 1)[1]
    return None


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_install_the_package_and_the_pinned_torch(name):
    ins = _instructions(CONTAINERS / name)
    assert _arg_default(ins, "TORCH_VERSION") == _torch_pin()
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert 'torch==${TORCH_VERSION}' in runs
    # the package comes from the build context's copy of the repository, with the remote extra
    copies = [rest for word, rest in ins if word == "COPY"]
    assert any("pyproject.toml" in c for c in copies) and any(c.startswith("scgnn_scale") for c in copies)
    assert '"/src[remote' in runs and "pip install --no-deps /src" in runs
    assert "scgnn-scale --version" in runs
    assert any(w == "USER" for w, _ in ins) and any(w == "ENV" and "/opt/scgnn/bin" in r for w, r in ins)


def test_cpu_dockerfile_builds_from_the_bootstrapped_base_with_a_cpu_torch():
    ins = _instructions(CONTAINERS / "Dockerfile.cpu")
    assert _arg_default(ins, "BASE") == "localhost/debian-bookworm:base"
    assert _arg_default(ins, "TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "assert not torch.version.cuda" in runs  # a CUDA build of torch fails the build
    assert "moto_server" in runs  # the compose file's S3 server
    base = (CONTAINERS / "build-base.sh").read_text()
    assert "debootstrap --variant=minbase bookworm" in base and "import" in base
    assert "localhost/debian-bookworm:base" in base
    setup = (CONTAINERS / "setup-podman.sh").read_text()
    assert "apt-get install" in setup and 'runtime = "runc"' in setup and "default_ulimits" in setup
    # the wheel folder the Dockerfile copies is kept in git, its wheels are not
    assert (CONTAINERS / "wheels" / "README.md").is_file()
    assert "/deploy/containers/wheels/*.whl" in (ROOT / ".gitignore").read_text().splitlines()
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore and {"!pyproject.toml", "!README.md", "!scgnn_scale"} <= set(ignore)


def test_cuda_dockerfile_starts_from_a_cuda_runtime_image_and_adds_cugraph():
    ins = _instructions(CONTAINERS / "Dockerfile.cuda")
    base = _arg_default(ins, "CUDA_IMAGE")
    assert base and base.startswith("nvidia/cuda:") and "runtime" in base
    assert any(w == "FROM" and "${CUDA_IMAGE}" in r for w, r in ins)
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "torch.version.cuda" in runs and "${CUGRAPH}" in runs


def _compose():
    return yaml.safe_load((CONTAINERS / "compose.yaml").read_text())


def test_compose_has_a_scheduler_two_workers_s3_and_a_job():
    services = _compose()["services"]
    assert set(services) == {"scheduler", "worker-1", "worker-2", "s3", "job"}
    for svc in services.values():
        assert svc["image"] == "${SCGNN_IMAGE:-localhost/scgnn-scale:cpu}"
        assert svc["environment"]["AWS_ENDPOINT_URL"] == "http://s3:5000"
    assert services["scheduler"]["command"][:2] == ["dask", "scheduler"]
    assert "8786" in services["scheduler"]["command"]
    for name in ("worker-1", "worker-2"):
        cmd = services[name]["command"]
        assert cmd[:3] == ["dask", "worker", "tcp://scheduler:8786"]
        assert "run:/data" in services[name]["volumes"]
    assert services["s3"]["command"] == ["moto_server", "-H", "0.0.0.0", "-p", "5000"]
    # published on loopback only
    assert all(p.startswith("127.0.0.1:") for p in services["s3"].get("ports", []))
    job = services["job"]
    script = job["command"][-1]
    assert job["command"][:2] == ["bash", "-c"]
    assert "run:/data" in job["volumes"]
    assert set(job["depends_on"]) == {"scheduler", "worker-1", "worker-2", "s3"}
    run_line = next(line for line in script.splitlines() if line.strip().startswith("scgnn-scale run"))
    args = shlex.split(run_line)
    assert args[2].startswith("s3://") and args[args.index("--out") + 1].startswith("/data/")
    assert args[args.index("--scheduler") + 1] == "tcp://scheduler:8786"
    assert "fs.put('/data/example.h5ad', 'scgnn/example.h5ad')" in script and args[2] == "s3://scgnn/example.h5ad"
    assert "$$hp" in script  # escaped for compose's interpolation
    assert "run" in _compose()["volumes"]


def _k8s(name):
    return list(yaml.safe_load_all((KUBERNETES / name).read_text()))


def test_kubernetes_daskcluster_runs_the_image_with_the_run_volume():
    (cluster,) = _k8s("daskcluster.yaml")
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1" and cluster["kind"] == "DaskCluster"
    name = cluster["metadata"]["name"]
    spec = cluster["spec"]
    assert spec["worker"]["replicas"] == 2
    (worker,) = spec["worker"]["spec"]["containers"]
    (scheduler,) = spec["scheduler"]["spec"]["containers"]
    assert worker["image"] == scheduler["image"] == IMAGE
    assert worker["args"][:2] == ["dask", "worker"] and scheduler["args"][:2] == ["dask", "scheduler"]
    assert {m["mountPath"] for m in worker["volumeMounts"]} == {"/data"}
    (vol,) = spec["worker"]["spec"]["volumes"]
    assert vol["persistentVolumeClaim"]["claimName"] == "scgnn-run"
    service = spec["scheduler"]["service"]
    assert service["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    assert {p["name"]: p["port"] for p in service["ports"]}["tcp-comm"] == 8786


def test_kubernetes_job_runs_against_the_scheduler_service_with_the_pvc():
    (cluster,) = _k8s("daskcluster.yaml")
    (pvc,) = _k8s("pvc.yaml")
    (job,) = _k8s("job.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    script = container["command"][-1]
    # the operator's Service for the DaskCluster is named <name>-scheduler
    assert f"--scheduler tcp://{cluster['metadata']['name']}-scheduler:8786" in script
    assert "scgnn-scale run" in script and "--out /data/" in script
    (vol,) = pod["volumes"]
    assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data"}


def test_container_marker_is_registered():
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("container:") for m in markers)


@pytest.mark.container
def test_cpu_image_runs_scgnn_scale():
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is not installed (deploy/containers/setup-podman.sh; see deploy/README.md)")
    if subprocess.run([podman, "image", "exists", IMAGE], capture_output=True).returncode != 0:
        pytest.skip(f"no image {IMAGE}: build it with deploy/containers/build-base.sh and Dockerfile.cpu "
                    "(deploy/README.md)")
    out = subprocess.run([podman, "run", "--rm", IMAGE, "scgnn-scale", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # the image was built from some commit of this package, not necessarily this one: any version
    assert re.fullmatch(r"scgnn-scale \d+\.\d+\.\d+\S*", out.stdout.strip()), out.stdout
