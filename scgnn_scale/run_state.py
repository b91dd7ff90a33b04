"""``scgnn-scale inspect``: the state of a run directory, read from its manifest without opening any array.

Each stage is *done* (recorded with the hash of the run's current config chain), *stale* (recorded, but
for a config or input the run directory no longer holds: the next run redoes it), *partial* (a killed
stage left a checkpoint it resumes from) or *to do*.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InputError
from .paths import as_path
from .report import report_path
from .store import RunStore, lock_holder


def _expected_hashes(manifest: dict) -> dict[str, str] | None:
    """The chain hashes the run's own config and input give (None when the manifest cannot tell)."""
    from .config import config_from_dict
    from .pipeline import chain_hashes

    source = manifest.get("identity", {}).get("input")
    if not source or not manifest.get("config"):
        return None
    try:
        return chain_hashes(config_from_dict(manifest["config"]), source)
    except InputError:  # options of another version of the package
        return None


def _loss(info: dict) -> str:
    first, last = info.get("loss_first"), info.get("loss_last")
    return f", loss {first:.4g} -> {last:.4g}" if first is not None and last is not None else ""


def stage_result(stage: str, info: dict) -> str:
    """The one or two numbers that say what a finished stage produced."""
    if stage == "ingest":
        return f"{info.get('n_cells', 0):,} cells x {info.get('n_genes', 0):,} genes ({info.get('format', '?')})"
    if stage == "preprocess":
        return f"{info.get('n_cells', 0):,} cells x {info.get('n_genes', 0):,} genes kept"
    if stage == "ltmg":
        if info.get("enabled") is False:
            return "disabled"
        return "genes per K: " + ", ".join(f"{k}: {c:,}" for k, c in info.get("k_counts", {}).items())
    if stage in ("feature", "impute"):
        return f"{info.get('steps', '?')} steps{_loss(info)}"
    if stage == "pca":
        if not info.get("n_comps"):
            return "off (pca.n_comps = 0)"
        share = 100 * sum(info.get("variance_ratio", []))
        return f"{info['n_comps']} components of {info.get('n_genes', 0):,} genes, {share:.1f}% of their variance"
    if stage == "graph":
        return f"{info.get('n_edges', 0):,} edges, mean degree {info.get('mean_degree', 0):.1f}"
    if stage == "gae":
        return f"{info.get('epochs', '?')} epochs ({info.get('mode', '?')}){_loss(info)}"
    if stage == "cluster":
        ari = info.get("metrics", {}).get("ari")
        return f"{info.get('n_clusters', '?')} clusters ({info.get('method', '?')})" + (
            f", ARI {ari:.3f}" if ari is not None else "")
    if stage == "iterate":
        n = info.get("iterations", 0)
        return (f"{n} iteration{'s' if n != 1 else ''}, stopped: {info.get('stopped', '?')}, "
                f"{info.get('n_clusters', '?')} clusters" if n else "no iteration (iterate.max_iterations = 0)")
    return ""


def _progress(stage: str, checkpoint: dict | None) -> str:
    """What a killed stage's checkpoint says it had finished."""
    state = (checkpoint or {}).get("state") or {}
    if "done" in state:
        return f"{state['done']} iteration(s) finished; resumes after them"
    if "step" in state:
        return f"checkpoint at step {state['step']:,}; resumes there"
    return "resumes from its checkpoint"


def describe_run(run_dir: str | Path) -> dict[str, Any]:
    """The state of ``run_dir`` as a mapping (what ``inspect`` prints)."""
    from .pipeline import STAGE_NAMES

    root = as_path(run_dir)
    if not root.is_dir():
        raise InputError(f"{root}: not a scgnn-scale run directory (no such directory)")
    store = RunStore.open(root, check=False)  # a directory without a manifest is refused here; damage is shown
    manifest = store.manifest
    expected = _expected_hashes(manifest)
    done = manifest.get("stages", {})
    stages = []
    for name in STAGE_NAMES:
        entry = done.get(name)
        checkpoint = manifest.get("checkpoints", {}).get(name)
        if entry and (expected is None or entry.get("hash") == expected[name]):
            info = entry.get("info", {})
            stages.append({"stage": name, "state": "done", "seconds": entry.get("seconds"),
                           "peak_rss_mb": info.get("peak_rss_mb"), "result": stage_result(name, info)})
        elif entry:
            stages.append({"stage": name, "state": "stale", "seconds": entry.get("seconds"),
                           "peak_rss_mb": entry.get("info", {}).get("peak_rss_mb"),
                           "result": "done for an earlier config or input; the next run redoes it"})
        elif checkpoint and (expected is None or checkpoint.get("hash") == expected[name]):
            stages.append({"stage": name, "state": "partial", "result": _progress(name, checkpoint)})
        else:
            stages.append({"stage": name, "state": "to do", "result": ""})
    source = {**manifest.get("identity", {}).get("input", {}), **manifest.get("input", {})}
    damaged, _ = store.check_integrity()
    ingest = done.get("ingest", {}).get("info", {})
    report = report_path(store.root)
    return {
        "run_dir": str(store.root),
        "input": source.get("path") or source.get("url") or ("an AnnData in memory" if source else None),
        "input_exists": Path(source["path"]).exists() if source.get("path") else None,
        "input_shape": (ingest.get("n_cells"), ingest.get("n_genes")) if ingest else None,
        "label_key": manifest.get("config", {}).get("ingest", {}).get("label_key") or None,
        "package_version": manifest.get("package_version"),
        "running": lock_holder(store.root),
        "stages": stages,
        "left": [s["stage"] for s in stages if s["state"] != "done"],
        "report": str(report) if report.is_file() else None,
        "sealed": store.integrity.present,
        "damaged": [d.line() for d in damaged],
    }


def format_run_state(state: dict[str, Any]) -> str:
    """The lines ``scgnn-scale inspect`` prints."""
    lines = [f"run {state['run_dir']} (scgnn-scale {state['package_version']})"]
    if state["input"]:
        shape = state["input_shape"]
        lines.append(f"  input: {state['input']}"
                     + (f" ({shape[0]:,} cells x {shape[1]:,} genes)" if shape and shape[0] is not None else "")
                     + (" [missing now]" if state["input_exists"] is False else "")
                     + (f", labels obs['{state['label_key']}']" if state["label_key"] else ""))
    lines.append("  running: " + (f"yes, {state['running']} holds the lock" if state["running"] else "no"))
    if state["damaged"]:
        lines.append(f"  damaged: {len(state['damaged'])} file(s), the next run redoes their stages; first: "
                     f"{state['damaged'][0]} ('scgnn-scale verify' lists all)")
    elif state["sealed"]:
        lines.append("  integrity: the quick check finds no damage ('scgnn-scale verify' reads every file)")
    lines.append(f"  {'stage':<11}{'state':<9}{'time':>9}{'peak memory':>13}  result")
    for s in state["stages"]:
        seconds = f"{s['seconds']:.1f} s" if s.get("seconds") is not None else "-"
        peak = f"{s['peak_rss_mb']:,.0f} MiB" if s.get("peak_rss_mb") is not None else "-"
        lines.append(f"  {s['stage']:<11}{s['state']:<9}{seconds:>9}{peak:>13}  {s['result']}".rstrip())
    done = [s for s in state["stages"] if s["state"] == "done"]
    total = sum(s["seconds"] or 0 for s in done)
    lines.append(f"  {len(done)} of {len(state['stages'])} stages done, {total:,.1f} s in all")
    if state["left"]:
        rerun = ("the run holding the lock is on it" if state["running"]
                 else "'scgnn-scale run' with this input and these options resumes there")
        lines.append(f"  left to do: {', '.join(state['left'])} ({rerun})")
    else:
        lines.append("  left to do: nothing, the run is finished")
    if state["report"]:
        lines.append(f"  report: {state['report']}")
    return "\n".join(lines)
