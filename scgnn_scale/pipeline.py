"""The order of stages, skipping finished ones, resuming killed runs.

Each stage is a module in :mod:`scgnn_scale.stages` with ``run(ctx) -> dict``. A stage's *chain
hash* covers its own config sections and the chain hash of the stage before it, so changing an
option redoes that stage and everything after it, and nothing before.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .config import RunConfig
from .context import StageContext
from .errors import InputError
from .fingerprint import describe_change, input_identity, input_record
from .keys import FEATURE_MODEL, INTERMEDIATE_RECONS, ITERATE_MODELS, ITERATED, KEYS
from .memory import peak_rss_mb, release_freed_memory, unfreeze_survivors
from .paths import LogMirror, as_path, is_url, listing, redact
from .results import publish
from .runtime import Runtime
from .store import RunStore, run_lock

log = logging.getLogger("scgnn_scale")

# stage name -> config sections it depends on (besides the chain before it)
STAGES: dict[str, tuple[str, ...]] = {
    "ingest": ("ingest",),
    "preprocess": ("preprocess",),
    "ltmg": ("ltmg",),
    "feature": ("feature",),
    "pca": ("pca",),
    "graph": ("graph",),
    "gae": ("gae",),
    "cluster": ("cluster",),
    "iterate": ("iterate", "feature", "graph", "gae", "cluster"),
    "impute": ("impute",),
}
STAGE_NAMES = tuple(STAGES)


def chain_hashes(config: RunConfig, identity: dict) -> dict[str, str]:
    hashes, prev = {}, hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    seed = config.runtime.seed
    for stage, sections in STAGES.items():
        own = config.section_hash(*sections)
        prev = hashlib.sha256(f"{prev}:{stage}:{own}:{seed}".encode()).hexdigest()[:16]
        hashes[stage] = prev
    return hashes


class _RedactingFormatter(logging.Formatter):
    """The run log never holds a URL's password or signed query (see :func:`scgnn_scale.paths.redact`)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _setup_logging(store: RunStore) -> tuple[logging.Handler, LogMirror]:
    mirror = LogMirror(store.log_path)  # run.log itself on disk; a local copy uploaded for an object store
    handler = logging.FileHandler(mirror.local)
    handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)  # the run log keeps every stage's record whatever the console shows
    return handler, mirror


def _run_identity(identity: dict, config: RunConfig) -> dict:
    """What a run directory is for: the input, the options that shape results, and the seed."""
    return {"input": identity, "config": config.section_hash(*[s for s in config.to_dict() if s != "runtime"]),
            "seed": config.runtime.seed}


def _refuse_other_run(out: Path, identity: dict, config: RunConfig, hashes: dict[str, str], source: Any) -> None:
    """Refuse ``out`` when it holds a run of another input or other options, naming what differs and
    which stages ``--overwrite`` would redo."""
    from .config import changed_options, result_options

    old = RunStore.read_manifest(out)
    if old is None:
        return  # no run there, or a corrupt manifest, which RunStore.create names
    if old.get("identity") == _run_identity(identity, config) or not old.get("stages"):
        return  # the same run, or one that finished no stage (nothing to lose)
    other_input = old.get("identity", {}).get("input") != identity
    differences = []
    for option, before, after in changed_options(old.get("config", {}), config):
        section, name = option.split(".")
        if section != "runtime" and name in result_options(getattr(config, section)):
            differences.append(f"{option} {before!r} -> {after!r}")
    if old.get("identity", {}).get("seed") != config.runtime.seed:
        differences.append(f"runtime.seed {old.get('identity', {}).get('seed')!r} -> {config.runtime.seed!r}")
    what = "other options"
    if other_input:
        what = describe_change(old.get("input"), source) or "another input"
    if differences:
        what += f" ({'; '.join(differences)})" if not other_input else f" and other options ({'; '.join(differences)})"
    done = old.get("stages", {})
    kept = [s for s in STAGE_NAMES if done.get(s, {}).get("hash") == hashes[s]]
    redo = [s for s in STAGE_NAMES if s in done and s not in kept]
    plan = (f"--overwrite keeps {', '.join(kept) or 'no stage'} and redoes {', '.join(redo) or 'nothing done so far'}"
            if done else "--overwrite starts it afresh")
    raise InputError(f"{out}: holds a run of {what}; {plan}; or choose another --out")


def run(
    source: Any,
    out: str | Path,
    *,
    config: RunConfig | None = None,
    until: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    open_hint: str | None = None,
) -> RunStore:
    """Run scGNN on ``source`` (a path to h5ad / 10x / CSV / zarr, or an AnnData) into the run directory ``out``.

    Finished stages with the same config are skipped; a killed run resumes. Logs a summary of the
    results at the end (clusters, scores against ``ingest.label_key``, times) and returns the run
    store; :func:`scgnn_scale.read_run` opens its results as an AnnData, :func:`scgnn_scale.tl.scgnn`
    runs on an AnnData and writes the results into it. ``open_hint`` replaces the summary's last line
    (how to open the results).
    """
    config = config or RunConfig()
    if until is not None and until not in STAGES:
        raise InputError(f"--until {until}: not a stage; stages are {', '.join(STAGE_NAMES)}")
    runtime = Runtime.from_config(config.runtime, quiet=quiet)  # a bad --device or --memory-limit fails first
    known = (RunStore.read_manifest(out) or {}).get("input")
    identity = input_identity(source, known=known)  # reuses the run's hash of an unchanged input
    hashes = chain_hashes(config, identity)
    if not is_url(str(out)):
        _refuse_out_inside_input(source, Path(as_path(out)))
    with run_lock(out):  # one run per directory; released however this process ends
        if not overwrite:
            _refuse_other_run(as_path(out), identity, config, hashes, source)
        store = RunStore.create(out, identity=_run_identity(identity, config), config=config, overwrite=overwrite)
        store.record_input(input_record(source, identity))
        handler, mirror = _setup_logging(store)
        t_start = time.perf_counter()
        try:
            log.info("run %s -> %s", redact(source) if isinstance(source, str | os.PathLike) else identity, store.root)
            order = list(STAGES)
            last = order.index(until) if until else len(order) - 1
            _redo_damaged(store)
            _check_input_copy(store, config, order[: last + 1], hashes)
            _check_reconstruction_models(store, config, order[: last + 1], hashes)
            _drop_input_copy(store, config, hashes)  # a run killed between preprocess and its removal
            for i, stage in enumerate(order[: last + 1]):
                if store.stage_done(stage, hashes[stage]):
                    log.info("%s: already done, skipped", stage)
                    continue
                store.forget_stages(order[i:])  # everything after a redone stage is stale
                if i > order.index("preprocess"):
                    _check_options_against_cells(store, config)  # before minutes of training, not after
                publish(store)  # what a stage reads of the published results is the latest finished pass
                ctx = StageContext(store=store, config=config, stage=stage, chain_hash=hashes[stage],
                                   runtime=runtime, input=source)
                module = importlib.import_module(f".stages.{stage}", __package__)
                log.info("%s: started", stage)
                t0, cpu0 = time.perf_counter(), time.process_time()
                store.current_stage = stage  # what the stage commits is sealed as its own
                try:
                    info = module.run(ctx) or {}
                except Exception:
                    if runtime.lost_workers():  # the Dask cluster lost every worker: say so, not its traceback
                        raise InputError(runtime.lost_workers()) from None
                    raise
                store.current_stage = None
                seconds = time.perf_counter() - t0
                info["peak_rss_mb"] = peak_rss_mb()  # of this process so far (Dask worker threads included)
                info["cpu_seconds"] = round(time.process_time() - cpu0, 3)  # every thread of this process
                del ctx  # the finished stage's context is garbage before its survivors are frozen
                runtime.stop_idle_cluster()
                release_freed_memory(freeze_survivors=True)
                store.record_stage(stage, hashes[stage], seconds, info)
                log.info("%s: done in %.1f s%s", stage, seconds, _short(info))
                if stage in ("preprocess", "pca"):
                    _drop_input_copy(store, config, hashes)
                handler.flush()
                mirror.sync()
            publish(store)
            if order[last] == order[-1] and not config.runtime.keep_work:
                _remove_intermediates(store)
            if store.has(KEYS.x):
                from .summary import final_metrics, format_summary, run_summary, uns_summary

                metrics = final_metrics(store, source, config)
                store.write_uns_summary(uns_summary(store, metrics))
                summary = run_summary(store, metrics, wall_seconds=time.perf_counter() - t_start)
                log.info("%s", format_summary(summary, open_hint=open_hint))
            from .report import write_report_safely

            write_report_safely(store)  # RUN_DIR/report/index.html; a failure is a warning, not the run's
            store.remove_empty_staging()
        finally:
            unfreeze_survivors()
            runtime.close()
            log.removeHandler(handler)
            handler.close()
            try:
                mirror.close()
            except Exception as exc:  # the results are committed; only the log's last lines are not uploaded
                log.warning("run.log: not uploaded to %s (%s)", store.root, redact(f"{type(exc).__name__}: {exc}"))
        return store


def _refuse_out_inside_input(source: Any, out: Path) -> None:
    """A run directory inside a directory input (10x folder, .zarr store) would change the input."""
    if not isinstance(source, str | os.PathLike) or "://" in str(source):
        return
    src = Path(source).resolve()
    if src.is_dir() and (out.resolve() == src or src in out.resolve().parents):
        raise InputError(f"{out}: --out lies inside the input {src}; the input is never written into, choose "
                         "another --out")


#: fewer cells than this cannot be clustered (a KNN graph and two clusters need a few)
MIN_CELLS = 3


def _check_options_against_cells(store: RunStore, config: RunConfig) -> None:
    """Options that must fit the number of cells preprocessing kept, checked before the stages that need them."""
    n = store.n_obs
    if n < MIN_CELLS:
        raise InputError(f"{store.root}: {n} cell(s) left after preprocessing; at least {MIN_CELLS} are needed "
                         "(lower --preprocess-min-gene-fraction or check the input)")
    if config.graph.k >= n:
        raise InputError(f"{store.root}: graph.k = {config.graph.k} neighbours needs more cells than that; "
                         f"{n} are left after preprocessing (lower --graph-k)")


def _pca_reads_input(store: RunStore, config: RunConfig, hashes: dict) -> bool:
    """Whether the pca stage is still to read ``work/input``: it is to be (re)done and there is no ``.raw``
    (``preprocess.keep_counts`` off: preprocess removes it)."""
    return (config.pca.n_comps > 0 and not store.stage_done("pca", hashes["pca"])
            and not config.preprocess.keep_counts)


def _check_input_copy(store: RunStore, config: RunConfig, stages: list[str], hashes: dict) -> None:
    """Ingest again where preprocess (or pca without ``.raw``) is to be (re)done and the input copy was
    removed after the last one."""
    redo = "preprocess" in stages and not store.stage_done("preprocess", hashes["preprocess"])
    redo = redo or ("pca" in stages and _pca_reads_input(store, config, hashes))
    if redo and store.stage_done("ingest", hashes["ingest"]) and not store.has(KEYS.input):
        log.info("a stage that reads %s is to be redone and it was removed after the last one: ingesting again",
                 KEYS.input)
        store.forget_stages(list(STAGE_NAMES))


def _drop_input_copy(store: RunStore, config: RunConfig, hashes: dict) -> None:
    """Remove ``work/input`` once preprocess has finished: only preprocess reads it (and pca, when
    ``preprocess.keep_counts`` is off, until it has finished), and the kept cells' counts are in ``.raw``.
    ``runtime.keep_work`` keeps it."""
    if (not config.runtime.keep_work and store.stage_done("preprocess", hashes["preprocess"])
            and not _pca_reads_input(store, config, hashes) and store.has(KEYS.input)):
        store.delete(KEYS.input)
        log.info("removed %s (the input's copy; preprocess has finished)", KEYS.input)


def _check_reconstruction_models(store: RunStore, config: RunConfig, stages: list[str], hashes: dict) -> None:
    """Redo what made the saved models that a stage to be (re)done computes its reconstruction from.

    ``iterate`` and ``impute`` read the feature autoencoder's reconstruction as ``decoder(embedding)``
    (:mod:`scgnn_scale.reconstruction`), so changing a clustering or imputation option costs no
    feature stage while ``models/feature_ae.pt`` is there (or ``work/recon``, kept by
    ``runtime.keep_work``); without it the feature stage is redone. ``impute.input`` 'final' needs
    the last iteration's model (or ``work/recon_final``); without it the iteration is redone.
    """
    todo = [s for s in stages if not store.stage_done(s, hashes[s])]
    if ("impute" in todo and config.impute.input == "final" and "iterate" not in todo
            and not store.has(KEYS.final_recon) and store.has(ITERATED.feature_embedding)
            and not store.model_paths(ITERATE_MODELS)):
        log.info("the last iteration's feature model is missing (impute.input final reads its reconstruction): "
                 "redoing the iteration")
        store.forget_stages(["iterate", "impute"])
        todo = [s for s in stages if not store.stage_done(s, hashes[s])]
    needs_first = "iterate" in todo or ("impute" in todo and config.impute.input in ("recon", "final"))
    if (needs_first and store.stage_done("feature", hashes["feature"]) and not store.has(KEYS.recon)
            and not store.model_path(FEATURE_MODEL).is_file()):
        log.info("the feature autoencoder's model is missing (iterate and impute read its reconstruction): "
                 "redoing from the feature stage")
        store.forget_stages(list(STAGE_NAMES[STAGE_NAMES.index("feature"):]))


def _redo_damaged(store: RunStore) -> None:
    """Check what the finished stages keep (a ``stat`` per file, a checksum where a file changed) and
    mark damaged results for redoing: the earliest stage owning a damaged file and every stage after it;
    a damaged published copy is published again; a damaged label column from ``evaluate --labels`` is
    removed."""
    finished = set(store.manifest.get("stages", {}))
    damaged, _ = store.check_integrity(owners=finished | {"publish", "labels"})
    store.integrity.accept_rechecked()
    if not damaged:
        return
    for d in damaged[:10]:
        log.warning("damaged: %s", d.line())
    if len(damaged) > 10:
        log.warning("damaged: %d more files ('scgnn-scale verify' lists them)", len(damaged) - 10)
    owners = [d.owner for d in damaged if d.owner in STAGES]
    if owners:
        first = min(owners, key=STAGE_NAMES.index)
        log.warning("redoing %s and the stages after it", ", ".join(STAGE_NAMES[STAGE_NAMES.index(first):]))
        store.forget_stages(list(STAGE_NAMES[STAGE_NAMES.index(first):]))
    published = dict(store.manifest.get("published", {}))
    for d in damaged:
        if d.owner == "publish":
            for key in [k for k in published if d.array == k or d.array.startswith(k + "/")]:
                del published[key]  # publish() writes it again from its source
        elif d.owner == "labels":
            column = "/".join(d.array.split("/")[:2])
            log.warning("removed the damaged label column %s; run 'scgnn-scale evaluate --labels' again", column)
            store.delete(column)
    if published != store.manifest.get("published", {}):
        store.record_published(published)


def _remove_intermediates(store: RunStore) -> None:
    """Remove the cells x genes reconstructions an earlier run with ``runtime.keep_work`` stored, once the last
    stage has finished (disk, not memory)."""
    removed, size = [], 0
    for key in INTERMEDIATE_RECONS:
        if store.has(key):
            path = as_path(store.path_of(key))
            listed = listing(path)  # an object store: one listing, not two requests an object
            size += (sum(st.st_size for st in listed.values()) if listed is not None
                     else sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
            store.delete(key)
            removed.append(key)
    if removed:
        log.info("removed %s (%.2f GB on disk); runtime.keep_work keeps them", ", ".join(removed), size / 1e9)


def _short(info: dict, max_items: int = 12) -> str:
    """A stage's scalar results as ``; name value`` pairs for its log line (the rest is in manifest.json)."""
    items = [(k, v) for k, v in info.items() if isinstance(v, int | float | str) and not isinstance(v, bool)]
    text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items[:max_items])
    more = f", ... ({len(items) - max_items} more in manifest.json)" if len(items) > max_items else ""
    return f": {text}{more}" if text else ""


def read_run(run_dir: str | Path, *, lazy: bool = True):
    """The run's results as an AnnData; large arrays (X, layers) are Dask arrays when ``lazy``."""
    import anndata
    import dask.array as da
    import zarr

    store = RunStore.open(run_dir)
    if not store.has(KEYS.x):
        raise InputError(f"{run_dir}: the run has not finished preprocessing yet; nothing to read")
    if not lazy:
        return anndata.read_zarr(str(store.adata_path))
    root = zarr.open_group(str(store.adata_path), mode="r", zarr_format=3)
    X = da.from_zarr(root["X"])
    layers = {k: da.from_zarr(root["layers"][k]) for k in root["layers"].array_keys()}
    obs = store.read_elem(KEYS.obs)
    var = store.read_elem(KEYS.var)
    obsm = {k: store.read_elem(f"obsm/{k}") for k in root["obsm"].keys()}
    obsp = {k: store.read_elem(f"obsp/{k}") for k in root["obsp"].keys()}
    varm = {k: store.read_elem(f"varm/{k}") for k in root["varm"].keys()}
    uns = store.read_elem("uns")
    return anndata.AnnData(X=X, obs=obs, var=var, layers=layers, obsm=obsm, obsp=obsp, varm=varm, uns=uns,
                           raw=store.read_raw(lazy=True))
