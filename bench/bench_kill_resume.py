"""SIGKILL a run at random moments, resume it, and check it ends with the reference's clusters and imputation.

    python bench/bench_kill_resume.py [--trials 20] [--seed 0] [--kills-per-trial 1] [--input PATH] [--dir DIR]
                                      [--torch-threads 1] [--imputed-atol 0] [--no-control] [--keep] [--json OUT]
                                      [-- RUN OPTIONS]

Without ``--input`` the built-in example is simulated first (``scgnn-scale simulate --cells 2000 --genes 1000
--types 6``, into DIR, default bench/out/kill_resume). The run command is ``scgnn-scale run INPUT --out RUN_DIR
--label-key label --iterate-max-iterations 3 --quiet`` (RUN OPTIONS after ``--`` replace everything after
``--out RUN_DIR``).

1. **Reference**: one uninterrupted run into DIR/reference; its wall time (process start to exit) is T.
2. **Control** (unless ``--no-control``): a second uninterrupted run, compared with the reference like a trial:
   whether the command is reproducible at all. A difference here is nondeterminism, not a resume bug.
3. **Trials**: each starts the command in a fresh DIR/trial_NN/run as its own session (process group), sends
   SIGKILL to the whole group at a time drawn uniformly from (0, T) (``random.Random(--seed)``, every time drawn
   before the first trial), checks that no process of the group (nor any process it had started) is left, then
   does the same for each further kill (``--kills-per-trial``), and finally reruns the same command to
   completion. When the trial's first invocation ends before its kill time (the machine got faster than during
   the reference), the trial starts again in an empty RUN_DIR with a kill time drawn from (0, the duration it
   just had), at most ``--max-redraws`` times (recorded as ``unlanded``); a later invocation that ends before
   its kill time (a resumed run is shorter than T) simply finishes. Recorded per kill: the time, the stage
   running (from the killed invocation's part of RUN_DIR/run.log: ``startup`` before the run's log began,
   ``STAGE`` while a stage ran, ``after STAGE`` between stages or at the end), the stages the manifest records as
   finished and what ``staging/`` held; per trial: the resume's exit code and time, and the comparison.

**Same** (a trial passes): the resume exits 0, no process survives a kill, ``obs/scgnn_cluster`` gives every cell
the reference's label (so ARI 1.0), and ``layers/imputed`` differs from the reference's by at most
``--imputed-atol`` (default 0: bitwise equal). Besides, every result of the two run directories is compared with
``bench/compare_runs.py`` (default tolerances rtol 1e-5, atol 1e-6): ``all_results_identical`` /
``all_results_exact`` and the items that differ are reported but do not fail a trial.

**Determinism**: the graph autoencoder's sparse products sum in a varying order with several torch threads, so
two uninterrupted runs differ in ``obsm/X_scgnn`` by up to about 5e-3 (bench/compare_runs.py's docstring); with
one thread they are bitwise equal. ``--torch-threads N`` (default 1) sets ``OMP_NUM_THREADS=N`` for every run
(torch's intra-op threads; 0 leaves the environment as it is). No config option covers the graph autoencoder's
threads (``feature.torch_threads`` covers the feature autoencoder only).

Prints one JSON object on stdout (config, reference, control, trials, counts, failures) and a table on stderr.
Exits 1 when a trial failed (or the control differs from the reference), 2 when the reference run fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "kill_resume"
DEFAULT_RUN_OPTIONS = ["--label-key", "label", "--iterate-max-iterations", "3", "--quiet"]
STAGES = ("ingest", "preprocess", "ltmg", "feature", "pca", "graph", "gae", "cluster", "iterate", "impute")
#: a line of RUN_DIR/run.log: '2026-12-06 02:05:27,123 INFO message'
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ (.*)$")


def _load_compare_runs():
    spec = importlib.util.spec_from_file_location("compare_runs", HERE / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scgnn_command() -> list[str]:
    """The ``scgnn-scale`` beside this interpreter (a venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "scgnn-scale"
    return [str(beside)] if beside.is_file() else ["scgnn-scale"]


def run_env(torch_threads: int) -> dict:
    env = dict(os.environ)
    if torch_threads > 0:
        env["OMP_NUM_THREADS"] = str(torch_threads)
    return env


# --- one invocation ----------------------------------------------------------------------------------------


def group_processes(pgid: int, known: list[psutil.Process]) -> list[dict]:
    """Processes still alive (zombies aside) in the process group / session ``pgid``, or among ``known``
    (descendants seen before the kill, which could have left the group)."""
    alive = {}
    for p in psutil.process_iter(["pid", "name", "status", "cmdline"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(p.pid) == pgid or os.getsid(p.pid) == pgid:
                alive[p.pid] = p
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    for p in known:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive[p.pid] = p
        except psutil.Error:
            continue
    return [{"pid": pid, "name": p.info.get("name") if hasattr(p, "info") else p.name(),
             "cmdline": " ".join((p.info.get("cmdline") if hasattr(p, "info") else p.cmdline()) or [])[:200]}
            for pid, p in alive.items()]


def invoke(cmd: list[str], env: dict, log_path: Path, *, kill_at: float | None = None,
           timeout: float | None = None) -> dict:
    """Run ``cmd`` in its own session; SIGKILL its whole process group ``kill_at`` seconds after the start
    (None: let it finish; ``timeout``: kill it then and say so). Returns seconds, returncode, killed, and after
    a kill the processes left (``survivors``, should be empty) and the descendants seen just before it."""
    with open(log_path, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        limit = kill_at if kill_at is not None else timeout
        timed_out = False
        while proc.poll() is None:
            if limit is not None and time.perf_counter() - t0 >= limit:
                break
            wait = 0.2 if limit is None else max(0.0, min(0.02, t0 + limit - time.perf_counter()))
            time.sleep(wait)
        result = {"killed": False}
        if proc.poll() is None:
            timed_out = kill_at is None
            pgid = proc.pid  # a session leader: its pid is the group's and the session's id
            try:
                before = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                before = []
            t_kill = time.perf_counter() - t0
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait()
            survivors = group_processes(pgid, before)
            deadline = time.perf_counter() + 10.0
            while survivors and time.perf_counter() < deadline:  # SIGKILL is delivered, not always at once
                time.sleep(0.1)
                survivors = group_processes(pgid, before)
            result = {"killed": True, "killed_at_s": round(t_kill, 3), "descendants_before_kill": len(before),
                      "survivors": survivors}
        result.update({"seconds": round(time.perf_counter() - t0, 3), "returncode": proc.returncode,
                       "timed_out": timed_out})
    return result


# --- where a run was when killed -------------------------------------------------------------------------------


def log_messages(run_dir: Path, offset: int) -> list[str]:
    """Messages of RUN_DIR/run.log from byte ``offset`` on (the killed invocation's part)."""
    path = run_dir / "run.log"
    if not path.is_file():
        return []
    with open(path, "rb") as fh:
        fh.seek(offset)
        text = fh.read().decode("utf-8", "replace")
    return [m.group(1) for line in text.splitlines() if (m := LOG_LINE.match(line))]


def log_size(run_dir: Path) -> int:
    path = run_dir / "run.log"
    return path.stat().st_size if path.is_file() else 0


def stage_at_kill(messages: list[str]) -> tuple[str, str]:
    """(where, last log message) for an invocation's log messages."""
    if not any(m.startswith("run ") for m in messages):
        return "startup", ""  # before the run's log began: imports, options, lock, manifest
    where = "start"
    for m in messages:
        stage, _, rest = m.partition(": ")
        if stage in STAGES:
            if rest == "started":
                where = stage
            elif rest.startswith("done in") or rest.startswith("already done"):
                where = f"after {stage}"
    last = messages[-1] if messages else ""
    return where, last[:200]


def run_dir_state(run_dir: Path) -> dict:
    """What a killed run left: finished stages, checkpoints, staging's entries."""
    state: dict = {"manifest": (run_dir / "manifest.json").is_file()}
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        state["stages_done"] = [s for s in STAGES if s in manifest.get("stages", {})]
        checkpoints = manifest.get("checkpoints", {})
        state["checkpoints"] = {s: {k: v for k, v in (c.get("state") or {}).items() if k in ("done", "step",
                                                                                            "finished", "stopped")}
                                for s, c in checkpoints.items()}
    except (OSError, ValueError) as exc:
        state["manifest_error"] = str(exc) if (run_dir / "manifest.json").exists() else None
    staging = run_dir / "staging"
    state["staging"] = sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []
    return state


# --- comparing with the reference ------------------------------------------------------------------------------


def compare(compare_runs, reference: Path, run_dir: Path, imputed_atol: float) -> dict:
    rep = compare_runs.compare_runs(reference, run_dir, work=False)
    items = rep["items"]
    clusters = items.get("obs/scgnn_cluster", {})
    imputed = items.get("layers/imputed", {})
    out = {
        "clusters_equal": bool(clusters.get("match")) and clusters.get("n_cells_differ") == 0,
        "clusters_ari": clusters.get("ari"),
        "clusters_cells_differ": clusters.get("n_cells_differ"),
        "n_clusters": [clusters.get("n_clusters_a"), clusters.get("n_clusters_b")],
        "imputed_present": bool(imputed) and "max_abs_diff" in imputed,
        "imputed_max_abs_diff": imputed.get("max_abs_diff"),
        "imputed_values_differ": imputed.get("n_differ"),
        "imputed_exact": bool(imputed.get("exact")),
        "all_results_identical": rep["identical"],
        "all_results_exact": rep["exact"],
        "differing_items": rep["reasons"],
        "inexact_items": sorted(k for k, v in items.items() if not v.get("exact")),
    }
    d = out["imputed_max_abs_diff"]
    out["imputed_within_tol"] = out["imputed_present"] and d != "inf" and float(d) <= imputed_atol
    return out


# --- the bench -------------------------------------------------------------------------------------------------


def ensure_input(args) -> Path:
    if args.input:
        return Path(args.input).resolve()
    path = args.dir / f"example_{args.cells}x{args.genes}_{args.types}types.h5ad"
    from scgnn_scale.simulate import drawn_by_default_model

    if not drawn_by_default_model(path):
        subprocess.run([*scgnn_command(), "simulate", str(path), "--cells", str(args.cells), "--genes",
                        str(args.genes), "--types", str(args.types), "--quiet", "--overwrite", "--log-level",
                        "warning"], check=True)
    return path.resolve()


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def trial(i: int, kills: list[float], cmd_for, env: dict, args, compare_runs, reference: Path,
          timeout: float) -> dict:
    tdir = args.dir / f"trial_{i:02d}"
    if tdir.exists():
        shutil.rmtree(tdir)
    tdir.mkdir(parents=True)
    run_dir = tdir / "run"
    cmd = cmd_for(run_dir)
    record: dict = {"trial": i, "kills": []}
    redraw = random.Random(f"{args.seed}-redraw-{i}")
    for k, at in enumerate(kills):
        offset = log_size(run_dir)
        inv = invoke(cmd, env, tdir / f"invocation_{k}.log", kill_at=at)
        while k == 0 and not inv["killed"] and inv["returncode"] == 0 and len(record.setdefault(
                "unlanded", [])) < args.max_redraws:
            # the run ended before its kill time (it went faster than the reference): start it again and
            # kill it at a time drawn from (0, the duration it just had)
            record["unlanded"].append({"kill_time_s": round(at, 3), "finished_after_s": inv["seconds"]})
            shutil.rmtree(run_dir)
            at = redraw.uniform(0, inv["seconds"])
            inv = invoke(cmd, env, tdir / f"invocation_{k}.log", kill_at=at)
        entry = {"kill_time_s": round(at, 3), **inv}
        if inv["killed"]:
            entry["stage"], entry["last_log"] = stage_at_kill(log_messages(run_dir, offset))
            entry["left"] = run_dir_state(run_dir)
        else:
            entry["stage"] = "finished before the kill" if inv["returncode"] == 0 else "failed before the kill"
        record["kills"].append(entry)
    resume = invoke(cmd, env, tdir / f"invocation_{len(kills)}.log", timeout=timeout)
    record["resume"] = {"returncode": resume["returncode"], "seconds": resume["seconds"],
                        "timed_out": resume["timed_out"]}
    failures = []
    survivors = [s for e in record["kills"] for s in e.get("survivors", [])]
    if survivors:
        failures.append(f"{len(survivors)} process(es) survived a kill: {survivors}")
    if resume["returncode"] != 0:
        tail = (tdir / f"invocation_{len(kills)}.log").read_text(errors="replace").strip().splitlines()[-15:]
        record["resume"]["output_tail"] = tail
        failures.append(f"resume exited {resume['returncode']}" + (" (timed out)" if resume["timed_out"] else "")
                        + (f": {tail[-1]}" if tail else ""))
    else:
        try:
            record["compare"] = compare(compare_runs, reference, run_dir, args.imputed_atol)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - an unreadable result is a failure, recorded
            record["compare"] = {"error": f"{type(exc).__name__}: {exc}"}
            failures.append(f"comparison failed: {type(exc).__name__}: {exc}")
        c = record["compare"]
        if "error" not in c:
            if not c["clusters_equal"]:
                failures.append(f"clusters differ: {c['clusters_cells_differ']} cells, ARI {c['clusters_ari']}")
            if not c["imputed_within_tol"]:
                failures.append(f"imputed differs: max abs diff {c['imputed_max_abs_diff']}")
    record["ok"] = not failures
    record["failures"] = failures
    if record["ok"] and not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return record


def row(r: dict) -> str:
    kills = "; ".join(f"{e['kill_time_s']:.1f}s {e['stage']}" for e in r["kills"])
    if r.get("unlanded"):
        ended = ", ".join(f"{u['finished_after_s']:.1f} s" for u in r["unlanded"])
        kills += f" (redrawn: ended before its kill at {ended})"
    c = r.get("compare", {})
    same_c = "-" if not c or "error" in c else ("yes" if c["clusters_equal"] else f"no (ARI {c['clusters_ari']:.4f})")
    same_i = "-" if not c or "error" in c else ("yes" if c["imputed_within_tol"] else "no")
    d = c.get("imputed_max_abs_diff", "-")
    return (f"| {r['trial']} | {kills} | {r['resume']['returncode']} | {r['resume']['seconds']:.1f} | {same_c} | "
            f"{same_i} ({d}) | {'yes' if c.get('all_results_exact') else 'no' if c else '-'} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="killed-and-resumed runs (default 20)")
    ap.add_argument("--kills-per-trial", type=int, default=1, help="SIGKILLs before the final resume (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times (default 0)")
    ap.add_argument("--input", help="input of the runs (default: simulate the built-in example into DIR)")
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--types", type=int, default=6)
    ap.add_argument("--dir", type=Path, default=OUT, help="working directory (default bench/out/kill_resume)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="OMP_NUM_THREADS for every run (default 1: bitwise reproducible; 0: the environment's)")
    ap.add_argument("--imputed-atol", type=float, default=0.0,
                    help="largest abs difference of layers/imputed that counts as the same (default 0: bitwise)")
    ap.add_argument("--no-control", action="store_true", help="skip the second uninterrupted run")
    ap.add_argument("--keep", action="store_true", help="keep every trial's run directory (default: failed ones)")
    ap.add_argument("--timeout-factor", type=float, default=5.0,
                    help="a resume running longer than this many T (plus 300 s) is killed and fails (default 5)")
    ap.add_argument("--max-redraws", type=int, default=3,
                    help="a trial's first invocation that ends before its kill time is started again with a time "
                         "drawn from (0, its duration), at most this many times (default 3; 0: never)")
    ap.add_argument("--json", type=Path, help="also write the JSON object to this file")
    ap.add_argument("run_options", nargs="*", help="'scgnn-scale run' options after -- (replace the defaults)")
    args = ap.parse_args(argv)
    args.dir = args.dir.resolve()
    args.dir.mkdir(parents=True, exist_ok=True)

    compare_runs = _load_compare_runs()
    env = run_env(args.torch_threads)
    inp = ensure_input(args)
    options = args.run_options or DEFAULT_RUN_OPTIONS

    def cmd_for(run_dir: Path) -> list[str]:
        return [*scgnn_command(), "run", str(inp), "--out", str(run_dir), *options]

    import scgnn_scale

    head = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    result: dict = {
        "input": str(inp), "command": " ".join(cmd_for(Path("RUN_DIR"))), "torch_threads": args.torch_threads,
        "seed": args.seed, "kills_per_trial": args.kills_per_trial, "imputed_atol": args.imputed_atol,
        "commit": head.stdout.strip() or None, "tracked_changes": bool(dirty.stdout.strip()),
        "package": scgnn_scale.__file__, "cpus": os.cpu_count(), "load_average_start": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "same": ("resume exits 0, no process of the killed group survives, obs/scgnn_cluster equal for every cell "
                 f"(ARI 1.0), layers/imputed max abs diff <= {args.imputed_atol:g}"),
    }

    ref = args.dir / "reference"
    if ref.exists():
        shutil.rmtree(ref)
    note(f"reference: {result['command'].replace('RUN_DIR', str(ref))}")
    inv = invoke(cmd_for(ref), env, args.dir / "reference.log")
    result["reference"] = {"seconds": inv["seconds"], "returncode": inv["returncode"],
                           "stage_seconds": {s: e["seconds"] for s, e in
                                             json.loads((ref / "manifest.json").read_text())["stages"].items()}
                           if (ref / "manifest.json").is_file() else {}}
    if inv["returncode"] != 0:
        result["error"] = f"the reference run failed (exit {inv['returncode']}), see {args.dir / 'reference.log'}"
        print(json.dumps(result, indent=1))
        return 2
    T = inv["seconds"]
    note(f"reference: {T:.1f} s")
    timeout = args.timeout_factor * T + 300

    control_ok = True
    if not args.no_control:
        ctl = args.dir / "control"
        if ctl.exists():
            shutil.rmtree(ctl)
        inv = invoke(cmd_for(ctl), env, args.dir / "control.log", timeout=timeout)
        result["control"] = {"seconds": inv["seconds"], "returncode": inv["returncode"]}
        if inv["returncode"] == 0:
            result["control"]["compare"] = compare(compare_runs, ref, ctl, args.imputed_atol)
            c = result["control"]["compare"]
            control_ok = c["clusters_equal"] and c["imputed_within_tol"]
        else:
            control_ok = False
        result["control"]["same"] = control_ok
        note(f"control: {inv['seconds']:.1f} s, same as the reference: {control_ok}"
             + (f", every result bitwise equal: {result['control']['compare']['all_results_exact']}"
                if "compare" in result["control"] else ""))
        if not args.keep:
            shutil.rmtree(ctl, ignore_errors=True)

    rng = random.Random(args.seed)
    plan = [[rng.uniform(0, T) for _ in range(args.kills_per_trial)] for _ in range(args.trials)]
    trials = []
    for i, kills in enumerate(plan, 1):
        r = trial(i, kills, cmd_for, env, args, compare_runs, ref, timeout)
        trials.append(r)
        note(row(r) + ("" if r["ok"] else f"  FAILED: {'; '.join(r['failures'])}"))
    result["trials"] = trials
    ok_resume = [r for r in trials if r["resume"]["returncode"] == 0]
    compared = [r for r in trials if "compare" in r and "error" not in r["compare"]]
    result["counts"] = {
        "trials": len(trials),
        "kills": sum(len(r["kills"]) for r in trials),
        "kills_landed": sum(e["killed"] for r in trials for e in r["kills"]),
        "redrawn": sum(len(r.get("unlanded", [])) for r in trials),
        "resumed_ok": len(ok_resume),
        "same_clusters": sum(r["compare"]["clusters_equal"] for r in compared),
        "same_imputed_within_tol": sum(r["compare"]["imputed_within_tol"] for r in compared),
        "imputed_bitwise_equal": sum(r["compare"]["imputed_exact"] for r in compared),
        "all_results_bitwise_equal": sum(r["compare"]["all_results_exact"] for r in compared),
        "survivors_after_kill": sum(len(e.get("survivors", [])) for r in trials for e in r["kills"]),
        "passed": sum(r["ok"] for r in trials),
        "failed": sum(not r["ok"] for r in trials),
    }
    result["stages_killed"] = {}
    for r in trials:
        for e in r["kills"]:
            result["stages_killed"][e["stage"]] = result["stages_killed"].get(e["stage"], 0) + 1
    result["resume_seconds"] = [r["resume"]["seconds"] for r in trials]
    result["failures"] = [{"trial": r["trial"], "failures": r["failures"], "kills": r["kills"],
                           "resume": r["resume"], "run_dir": str(args.dir / f"trial_{r['trial']:02d}" / "run")}
                          for r in trials if not r["ok"]]
    result["load_average_end"] = list(os.getloadavg())
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    note("")
    note(f"reference run T = {T:.1f} s; kill times uniform in (0, T), seed {args.seed}")
    note("| trial | killed at (stage) | resume exit | resume s | same clusters | same imputed (max abs diff) | "
         "every result bitwise |")
    note("|---|---|---|---|---|---|---|")
    for r in trials:
        note(row(r))
    n = result["counts"]
    note(f"{n['trials']} trials, {n['kills_landed']} of {n['kills']} kills landed ({n['redrawn']} redrawn): "
         f"resumed ok {n['resumed_ok']}, "
         f"same clusters {n['same_clusters']}, same imputed {n['same_imputed_within_tol']} "
         f"(bitwise {n['imputed_bitwise_equal']}), every result bitwise {n['all_results_bitwise_equal']}, "
         f"failed {n['failed']}" + ("" if control_ok else "; the CONTROL run differs from the reference"))
    return 0 if n["failed"] == 0 and control_ok else 1


if __name__ == "__main__":
    sys.exit(main())
