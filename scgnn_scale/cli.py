"""``scgnn-scale``: argument parsing and error display; every command calls the library."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
from typing import Any

from .config import config_fields
from .errors import ENVIRONMENT_ERRNOS, InputError

# short flags for the options people set most; every option also has --SECTION-OPTION
_ALIASES = {
    "--label-key": ("ingest", "label_key"),
    "--orientation": ("ingest", "orientation"),
    "--seed": ("runtime", "seed"),
    "--device": ("runtime", "device"),
    "--gpus": ("runtime", "gpus"),
    "--scheduler": ("runtime", "scheduler"),
    "--n-workers": ("runtime", "n_workers"),
    "--memory-limit": ("runtime", "memory_limit"),
}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    aliased = {v: k for k, v in _ALIASES.items()}
    groups: dict[str, Any] = {}
    for section, f in config_fields():
        if section not in groups:
            groups[section] = p.add_argument_group(f"[{section}] options (also settable in the --config TOML)")
        flags = [f"--{section}-{f.name.replace('_', '-')}"]
        if (section, f.name) in aliased:
            flags.insert(0, aliased[(section, f.name)])
        help_text = f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%")
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(choices) + "}" if choices else type(f.default).__name__.upper()
        groups[section].add_argument(*flags, dest=f"cfg__{section}__{f.name}", default=None,
                                     metavar=metavar, help=help_text)


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if key.startswith("cfg__") and value is not None:
            _, section, name = key.split("__")
            out.setdefault(section, {})[name] = value
    return out


def _add_verbosity_flags(p: argparse.ArgumentParser, suppress: bool = True) -> None:
    """``--log-level`` and ``-v``, accepted before or after the command."""
    default = argparse.SUPPRESS if suppress else None
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=default,
                   help="messages printed on stderr (default: info); RUN_DIR/run.log always gets info and above")
    p.add_argument("-v", "--verbose", action="store_const", const="debug", dest="log_level", default=default,
                   help="print debug messages too (same as --log-level debug)")


def _wide_help(prog: str) -> argparse.HelpFormatter:
    """Up to 120 columns: the run command explains about a hundred options."""
    return argparse.HelpFormatter(prog, max_help_position=36, width=min(shutil.get_terminal_size((120, 24)).columns, 120))


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """INPUT, --out and every option of ``run`` (shared by ``run`` and ``slurm``)."""
    from .pipeline import STAGE_NAMES

    p.add_argument("input", help="input: .h5ad, AnnData .zarr, 10x directory (matrix.mtx[.gz]), 10x .h5, "
                                 ".csv/.tsv[.gz]; local path or fsspec URL")
    p.add_argument("--out", required=True, help="run directory (created; resumed if it holds this run): a path or an "
                   "fsspec URL such as s3://bucket/prefix, gs://..., az://...")
    p.add_argument("--config", help="TOML file with [section] tables of the options below")
    p.add_argument("--until", choices=STAGE_NAMES, help="stop after this stage")
    p.add_argument("--overwrite", action="store_true",
                   help="allow --out to hold a run of another input or config (reuses what still matches)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--keep-work", action="store_true",
                   help="store the cells x genes reconstructions that iterate and impute read, and keep them "
                        "when the run ends (4 bytes per cell and gene each; without it they are computed from "
                        "the saved models as read), and keep work/input, the input's copy that is otherwise "
                        "removed once preprocess has finished; same as --runtime-keep-work true")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    _add_verbosity_flags(p)
    _add_config_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scgnn-scale",
        description="scGNN (single-cell graph neural network) clustering and imputation, out-of-core, "
                    "for single-cell RNA-seq from a few hundred to millions of cells.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              scgnn-scale simulate --cells 3000 --genes 2000 --types 6 example.h5ad
              scgnn-scale run example.h5ad --out demo_run --label-key label
              scgnn-scale slurm example.h5ad --out demo_run --label-key label --jobs 4 --queue batch
              scgnn-scale evaluate demo_run --label-key label
              scgnn-scale export demo_run --format csv --to demo_csv
              scgnn-scale verify demo_run
              scgnn-scale inspect demo_run
              scgnn-scale report demo_run
            Run 'scgnn-scale COMMAND --help' for the options of each command."""),
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"scgnn-scale {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    _add_verbosity_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run the scGNN pipeline on an input into a run directory",
                       usage="%(prog)s INPUT --out RUN_DIR [--label-key COLUMN] [--config TOML] [options]",
                       formatter_class=_wide_help,
                       description="Run scGNN: ingest, preprocess, LTMG, feature AE, cell graph, graph AE, "
                                   "clusters, iterations with cluster AEs, imputation. Finished stages are "
                                   "skipped, so rerunning the same command resumes a killed run.")
    _add_run_args(p)

    p = sub.add_parser("slurm", help="'run' with its Dask work in SLURM jobs (needs scgnn-scale[slurm])",
                       usage="%(prog)s INPUT --out RUN_DIR [--jobs N] [--cores C] [--memory SIZE] "
                             "[--walltime T] [--queue PARTITION] [run options]",
                       formatter_class=_wide_help,
                       description="The same run as 'scgnn-scale run', with a Dask scheduler in this process "
                                   "and its workers in SLURM batch jobs (dask-jobqueue's SLURMCluster, one "
                                   "worker per job, started with this Python). The preprocessing passes, LTMG "
                                   "fits and cluster autoencoders run in the jobs; the feature and graph "
                                   "autoencoders in this process. The jobs are cancelled when the run ends. "
                                   "RUN_DIR and INPUT must be on a filesystem the compute nodes see under the "
                                   "same path.")
    g = p.add_argument_group("SLURM worker jobs")
    g.add_argument("--jobs", type=int, default=2, help="worker jobs to submit (default 2)")
    g.add_argument("--cores", type=int, default=1, help="cores (Dask worker threads) per job (default 1)")
    g.add_argument("--memory", default="4GiB", help="memory per job, its Dask worker's limit (default 4GiB)")
    g.add_argument("--walltime", default="01:00:00", help="time limit per job (default 01:00:00)")
    g.add_argument("--queue", "--partition", dest="queue", metavar="PARTITION",
                   help="partition of the jobs (default: the cluster's default partition)")
    g.add_argument("--account", help="account charged for the jobs (sbatch -A)")
    g.add_argument("--job-extra", action="append", default=[], metavar="DIRECTIVE",
                   help="another #SBATCH directive for the jobs, e.g. --job-extra=--constraint=skylake "
                        "(repeatable)")
    g.add_argument("--interface", metavar="IFACE",
                   help="network interface of the scheduler and workers, e.g. ib0, or lo on a single node "
                        "(default: Dask's choice)")
    g.add_argument("--log-directory", metavar="DIR",
                   help="where the jobs write their output (default: RUN_DIR.slurm-logs beside RUN_DIR)")
    g.add_argument("--worker-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="wait this long for the workers: then go on with those that joined, or fail if none "
                        "did (default 300)")
    _add_run_args(p)

    p = sub.add_parser("simulate", help="write a synthetic atlas with planted cell types (the built-in example)",
                       description="Simulate negative-binomial counts with dropout and planted cell types, "
                                   "written block by block (any size in bounded memory). Labels in obs['label'].")
    p.add_argument("out", help="output AnnData store: .zarr directory or .h5ad file")
    p.add_argument("--cells", type=int, default=3000, help="number of cells (default 3000)")
    p.add_argument("--genes", type=int, default=2000, help="number of genes (default 2000)")
    p.add_argument("--types", type=int, default=6, help="number of planted cell types (default 6)")
    p.add_argument("--dropout", type=float, default=0.3,
                   help="chance that a non-zero count is zeroed where its expected count is near 0; it falls as "
                        "1 / (1 + expected count) (default 0.3)")
    p.add_argument("--dropout-model", choices=("expression", "uniform"), default="expression",
                   help="'expression': dropout falls with the expected count, as in real data (default); "
                        "'uniform': every non-zero is zeroed with the same chance, the atlases drawn "
                        "before commit 1232111 (a gene at hundreds of counts then reads 0 in 30%% of each type)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--block-rows", type=int, default=16384, help="cells simulated per block (default 16384)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes drawing blocks in parallel (default: one per CPU core from 64 tiles of about 2M "
                        "values on, i.e. 65,536 cells at 2,000 genes, else 1); the atlas does not depend on it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    _add_verbosity_flags(p)

    p = sub.add_parser("evaluate", help="ARI, NMI and silhouette of a run's clusters against reference labels",
                       description="Score a run's clusters against reference labels: an obs column of the run "
                                   "(--label-key) or a CSV/TSV file of cell names and labels (--labels), which is "
                                   "then kept as an obs column of the run. Writes RUN_DIR/metrics.json.")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--label-key", default="label",
                   help="obs column with the reference labels; with --labels, the file's column to use and the "
                        "name it gets in obs (default: label; a file without that column gives its second column)")
    p.add_argument("--labels", metavar="FILE",
                   help="CSV/TSV file: first column cell names (as in the run's obs_names), then the labels")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    _add_verbosity_flags(p)

    p = sub.add_parser("evaluate-imputation",
                       help="the paper's dropout protocol: zero a fraction of non-zeros, impute, score them")
    p.add_argument("input", help="input counts (any format 'run' reads)")
    p.add_argument("--out", required=True, help="directory for the masked inputs, runs and the JSON report")
    p.add_argument("--rate", type=float, default=0.1, help="fraction of non-zero entries set to zero (default 0.1)")
    p.add_argument("--repeats", type=int, default=3, help="independent maskings (default 3)")
    p.add_argument("--config", help="TOML config for the runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the first masking (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    _add_verbosity_flags(p)

    p = sub.add_parser("verify", help="check every file a run keeps against its checksum",
                       description="Check what a run keeps (arrays, models) against the sizes and CRC-32C "
                                   "checksums recorded when each stage finished. Prints one line per damaged file "
                                   "(array, chunk, problem, the stage that made it) and exits 1 when any is "
                                   "damaged; rerunning the run's command redoes those stages.")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--quick", action="store_true",
                   help="check sizes, and checksums only of files whose modification time changed (the check "
                        "'run', 'export' and 'evaluate' make); default: read and checksum every file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    _add_verbosity_flags(p)

    p = sub.add_parser("export", help="export a run as h5ad or as the published scGNN's CSV files")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--format", choices=("h5ad", "csv"), default="h5ad", help="output format (default h5ad)")
    p.add_argument("--to", required=True, help="output file (.h5ad) or directory (csv)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    _add_verbosity_flags(p)

    from .report import PROJECTIONS, REPORT_CELLS, TSNE_CELLS

    p = sub.add_parser("report", help="draw a run's report: RUN_DIR/report/index.html (figures, times, config)",
                       description="Draw the run report again: one self-contained HTML page (no network needed) with "
                                   "a 2-D view of the graph embedding coloured by cluster and by label, the loss "
                                   "curves, the iterations, the LTMG components per gene, each stage's time and "
                                   "peak memory, and the config. 'scgnn-scale run' writes it when it ends; this "
                                   "redraws it, e.g. for a run that stopped early or with other options.")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--to", metavar="PATH",
                   help="HTML file to write (a directory gets index.html inside; default RUN_DIR/report/index.html)")
    p.add_argument("--max-cells", type=int, default=REPORT_CELLS,
                   help=f"cells drawn in the scatter, a seeded random subsample; all that is read of any cells x d "
                        f"array (default {REPORT_CELLS:,})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing file at --to (the run's own report/index.html is always redrawn)")
    p.add_argument("--projection", choices=PROJECTIONS, default="pca",
                   help=f"2-D view of the embedding: 'pca' (first two principal components, instant) or 'tsne' "
                        f"(t-SNE of at most {TSNE_CELLS:,} of those cells: about a minute on two cores) (default pca)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    _add_verbosity_flags(p)

    p = sub.add_parser("inspect", help="print the state of a run: stages done, their times, what is left",
                       description="Print the state of a run directory from its manifest (no array is read): "
                                   "the input, whether a run holds the directory's lock now, each stage in order "
                                   "(done, stale, partial or to do) with its time, peak memory and main result, "
                                   "and what is left to do.")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    _add_verbosity_flags(p)
    return parser


def _run_config(args: argparse.Namespace):
    from .config import load_config

    overrides = _overrides(args)
    if args.keep_work:
        overrides.setdefault("runtime", {})["keep_work"] = True
    return load_config(args.config, overrides)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from .pipeline import run

        config = _run_config(args)
        from .data_parallel import launched_by_torchrun

        if launched_by_torchrun() and int(os.environ.get("RANK", "0")) != 0:
            from .data_parallel import serve_torchrun_rank

            return serve_torchrun_rank(config.runtime.device)  # rank 0 runs the pipeline, the others train with it
        run(args.input, args.out, config=config, until=args.until, overwrite=args.overwrite, quiet=args.quiet)
        return 0  # the run logs its summary
    if args.command == "slurm":
        from .slurm import SlurmOptions, run_on_slurm

        options = SlurmOptions(jobs=args.jobs, cores=args.cores, memory=args.memory, walltime=args.walltime,
                               queue=args.queue, account=args.account, job_extra=tuple(args.job_extra),
                               interface=args.interface, log_directory=args.log_directory,
                               worker_timeout=args.worker_timeout)
        run_on_slurm(args.input, args.out, config=_run_config(args), options=options, until=args.until,
                     overwrite=args.overwrite, quiet=args.quiet)
        return 0
    if args.command == "simulate":
        from .simulate import simulate_atlas

        path = simulate_atlas(args.out, n_cells=args.cells, n_genes=args.genes, n_types=args.types,
                              dropout=args.dropout, dropout_model=args.dropout_model, seed=args.seed,
                              block_rows=args.block_rows,
                              overwrite=args.overwrite, workers=args.workers, progress=not args.quiet)
        print(f"wrote {path}")
        return 0
    if args.command == "evaluate":
        from .evaluate import evaluate_run

        metrics = evaluate_run(args.run_dir, label_key=args.label_key, labels_file=args.labels)
        for k, v in metrics.items():
            print(f"{k}\t{v}")
        return 0
    if args.command == "evaluate-imputation":
        from .config import load_config
        from .dropout import evaluate_imputation

        report = evaluate_imputation(args.input, args.out, rate=args.rate, repeats=args.repeats,
                                     config=load_config(args.config), seed=args.seed, quiet=args.quiet)
        import json

        print(json.dumps(report, indent=1))
        return 0
    if args.command == "verify":
        from .verify import format_report, verify_run

        report = verify_run(args.run_dir, full=not args.quick, progress=not args.quiet)
        print(format_report(report))
        return 1 if report["damaged"] else 0
    if args.command == "export":
        from .export import export_run

        path = export_run(args.run_dir, args.to, fmt=args.format, overwrite=args.overwrite)
        print(f"wrote {path}")
        return 0
    if args.command == "report":
        from .report import write_report

        if args.max_cells < 1:
            raise InputError(f"--max-cells {args.max_cells}: must be at least 1")
        path = write_report(args.run_dir, args.to, max_cells=args.max_cells, projection=args.projection,
                            overwrite=args.overwrite)
        print(f"wrote {path}")
        return 0
    if args.command == "inspect":
        from .run_state import describe_run, format_run_state

        print(format_run_state(describe_run(args.run_dir)))
        return 0
    raise AssertionError(args.command)


#: OS errors that the machine causes (full disk, permissions, read-only or missing quota), shown as one line
_ENVIRONMENT_ERRORS = ENVIRONMENT_ERRNOS


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from .logs import set_verbosity
    from .paths import redact

    set_verbosity(getattr(args, "log_level", None) or "info")
    try:
        return _dispatch(args)
    except InputError as exc:
        if args.debug:
            raise
        print(redact(f"scgnn-scale: error: {exc}"), file=sys.stderr)
        return 2
    except ValueError as exc:
        # zarr's crc32c codec: a chunk changed after it was written, with its file's time put back
        if args.debug or "checksum do not match" not in str(exc):
            raise
        where = getattr(args, "out", None) or getattr(args, "run_dir", None) or "the run"
        print(f"scgnn-scale: error: {where}: a chunk failed its checksum while it was read; 'scgnn-scale verify "
              f"{where}' names it, and the same command then redoes the stage that made it", file=sys.stderr)
        return 2
    except OSError as exc:
        if args.debug or exc.errno not in _ENVIRONMENT_ERRORS:
            raise
        # the disk or the permissions, not a bug: finished stages are committed, the rerun resumes
        where = exc.filename or getattr(args, "out", None) or getattr(args, "to", None) or "scgnn-scale"
        print(redact(f"scgnn-scale: error: {where}: {exc.strerror or exc}; finished stages are kept, rerun the same "
              "command once this is fixed"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scgnn-scale: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
