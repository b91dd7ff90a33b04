"""One typed run configuration: a frozen dataclass per stage, all in :class:`RunConfig`.

Defaults are the paper's (docs/METHOD.md). The CLI and a TOML file only fill this in
(:func:`load_config`); the resolved config is written into the run store (``uns/scgnn/config``).
Every field carries a ``help`` text that ``scgnn-scale run --help`` prints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import InputError


def _f(default: Any, help: str, choices: tuple | None = None, *, result: bool = True, why: str = "") -> Any:
    """An option with its ``--help`` text and, in ``why``, the measurement behind its default (kept here
    for the next engineer, not printed by --help). ``result=False`` marks metadata that changes no
    stage's output (a label column, a temporary directory): left out of the hashes that decide which
    stages to redo."""
    meta = {"help": help, "result": result, "why": why}
    if choices:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class StoreConfig:
    chunk_rows: int = _f(2048, "rows (cells) per chunk of every cells x genes array in the store")
    chunk_genes: int = _f(256, "genes per chunk of every cells x genes array (gene blocks for LTMG)")
    compression_level: int = _f(1, "zstd level (Blosc, byte shuffle) of the store's arrays",
                                why="1 encodes a 2048 x 256 chunk of a float reconstruction 4.3x faster than 3 (6.8 "
                                "vs 29 ms) at the same size, X 2.3x faster at +3% size (bench/bench_codec.py)")
    work_codec: str = _f("lz4", "codec of the intermediate arrays under work/ (removed when the run ends): 'lz4' "
                         "(faster, 1.3x larger) or 'zstd' (compression_level, as the other arrays)", ("lz4", "zstd"),
                         why="a float reconstruction's chunk encodes 2.7x and decodes 6x faster with lz4 level 5 "
                         "than zstd level 1, 1.3x larger (bench/bench_codec.py)")


@dataclass(frozen=True)
class IngestConfig:
    orientation: str = _f(
        "auto",
        "CSV/TSV layout: 'genes-x-cells' (the original scGNN's CSV), 'cells-x-genes', or 'auto' (decided "
        "from the row and column names: barcodes or cell<n> are cells, Ensembl ids, gene<n> or MT- genes "
        "are genes; genes x cells, with a warning, when they tell nothing). h5ad/10x/zarr are cells x genes",
        ("auto", "genes-x-cells", "cells-x-genes"),
    )
    label_key: str = _f("", "obs column of the input with reference labels (e.g. 'label'): carried into the run "
                        "and scored against the clusters (ARI/NMI); never required, and adding it redoes no stage",
                        result=False)
    block_rows: int = _f(8192, "cells read from the input per block")
    tmp_dir: str = _f("", "directory for the temporary files of inputs that are re-sorted by cell while read "
                      "(CSV/TSV, 10x mtx, CSC h5ad; 12 bytes per non-zero); empty: the system temp directory",
                      result=False)


@dataclass(frozen=True)
class PreprocessConfig:
    min_cell_fraction: float = _f(0.01, "keep genes non-zero in at least this fraction of cells")
    min_gene_fraction: float = _f(0.01, "keep cells non-zero in at least this fraction of the kept genes")
    n_top_genes: int = _f(2000, "number of most variable genes kept")
    variance_on: str = _f("raw", "rank genes by the variance of 'raw' values (published code) or 'log' values",
                          ("raw", "log"))
    normalize_total: float = _f(0.0, "library-size normalise each cell to this total before log (0: off, the paper's default)")
    keep_counts: bool = _f(True, "keep the counts of every input gene for the kept cells as the AnnData's .raw "
                           "(sparse, for differential expression after the run); off saves their disk")


@dataclass(frozen=True)
class LTMGConfig:
    enabled: bool = _f(True, "compute LTMG states (off: the feature AE uses plain MSE, alpha term dropped)")
    max_cells: int = _f(20000, "fit each gene on a random sample of at most this many cells; every cell is labelled",
                        why="at 100k simulated cells, samples of 10k/20k/50k gave the states of the all-cell fit on "
                        "99.36/99.43/99.34% of entries (bench/bench_ltmg.py --sweep)")
    block_genes: int = _f(256, "genes per Dask task (rounded up to whole gene chunks of X)")
    k_min: int = _f(2, "smallest number of mixture components tried")
    k_max: int = _f(5, "largest number of mixture components tried")
    max_iter: int = _f(500, "EM iterations per K at most (the published code: 100)",
                       why="on counts EM often needs 100-400 iterations to converge, and sample and full fits agree "
                       "better once converged")
    tol: float = _f(1e-5, "EM stops when the mean log-likelihood changes less than this")
    min_sd: float = _f(1e-4, "floor of every component's sd on the log scale (the published code jitters "
                       "log values by N(0, 1e-4) instead)")
    state_numbering: str = _f("published", "'published': state = 0-based column of the winning sorted "
                              "component (a censored gene's lowest component shares 0 with zeros), as the "
                              "published R code; 'one-based': fitted components are 1..K",
                              ("published", "one-based"))


@dataclass(frozen=True)
class FeatureConfig:
    hidden: int = _f(512, "first hidden layer of the feature autoencoder")
    latent: int = _f(128, "embedding size of the feature autoencoder")
    lr: float = _f(1e-3, "Adam learning rate")
    gamma: float = _f(0.1, "weight of the plain squared error")
    alpha: float = _f(0.9, "weight of the LTMG-weighted squared error")
    l1: float = _f(1.0, "weight of the L1 penalty on the network weights")
    batch_size: int = _f(512, "cells per minibatch of every dense autoencoder (feature, cluster, imputation)",
                         why="512 against 1,024 over 5 seeds on the half of the gold sets defaults are chosen on: "
                         "Leiden-averaged ARI 0.6829 against 0.6822, own-seed mean 0.715 against 0.706, at half the "
                         "CPU per step; 256 fell to 0.680 and 0.674 (klein_subset 0.69 against 0.84) "
                         "(bench/RESULTS.md, 'Half the minibatch')")
    min_steps: int = _f(200, "optimiser steps at least (the original: 500 full-batch epochs = 500 steps; 500 "
                        "restores it)",
                        why="with the graph searched beside the PCA, 200 against 500 over 5 seeds: HALF_A (chosen "
                        "on) 0.747 against 0.741, HALF_B (reported) 0.620 against 0.617, at half the feature "
                        "autoencoder's CPU (bench/RESULTS.md, 'The feature autoencoder at 200 steps')")
    max_epochs: int = _f(10, "passes over the data when that takes more than min_steps: the schedule is "
                         "max(min_steps, min(max_epochs x batches per epoch, max_steps)) optimiser steps")
    max_steps: int = _f(2000, "cap on the epoch rule's steps (0: none); reached from about 102k cells on "
                        "(at the default batch of 512)",
                        why="2,000 steps = about 1M cells seen (1M cells: 1 pass, not 10); what decides how far Adam "
                        "gets is the number of steps, and a larger atlas of the same cell types is not a harder "
                        "problem")
    iter_steps: int = _f(200, "optimiser steps of the continued feature AE in each later iteration")
    plateau_tol: float = _f(0.0, "stop the feature autoencoder (and its continuation in each iteration) once the "
                            "mean loss of 50 steps falls by less than this fraction of the previous 50's: the step "
                            "schedule becomes a cap (0: always the full schedule)",
                            why="0.01 stopped at 250-300 of 500 steps and lowered the first pass's ARI on the two sets "
                            "measured (README, 'Small and medium sets')")
    memory_budget_mb: int = _f(512, "X (and its LTMG states) is served from memory when it fits this budget (about "
                               "50k cells at 2,000 genes), streamed from the store otherwise")
    buffer_blocks: int = _f(4, "row blocks (chunks of cells) mixed in the loader's shuffle buffer")
    prefetch_blocks: int = _f(2, "row blocks read ahead on a background thread while the model trains")
    checkpoint_minutes: float = _f(10.0, "save the model and optimiser this often during training, so a killed run resumes (0: never)")
    torch_threads: int = _f(0, "torch threads when training on CPU (0: all cores but one, which is left to the "
                            "loader's reads and decoding; oversubscribed torch threads slow training several-fold)")
    precision: str = _f("auto", "arithmetic of the autoencoders' training steps (feature, its continuation, the "
                        "cluster and imputation AEs): 'float32'; 'bfloat16' (torch autocast: matrix products in "
                        "bfloat16, weights, optimiser and loss in float32; outputs are always computed in float32); "
                        "'auto': bfloat16 on a CPU that has it in hardware (AVX512-BF16 or AMX), float32 elsewhere "
                        "(CUDA included)",
                        ("auto", "float32", "bfloat16"),
                        why="with the graph beside the PCA (3d80d3b) and the consensus of Leiden runs (a2d764c), "
                        "bfloat16 tied float32's mean ARI over 5 seeds on the half of the gold sets defaults are "
                        "chosen on (0.7468 against 0.7468) with every set's seed SD at most 0.03 (goolam 0.0004 "
                        "against 0.033), imputed as well as float32 on both halves, and took 0.6x the CPU of a "
                        "float32 step on a CPU with "
                        "AVX512-BF16 (bench/RESULTS.md, 'bfloat16 again, on today's default'); 'float32' restores the "
                        "arithmetic of the published code; on a CPU without bfloat16 in hardware it is emulated and "
                        "slower, so 'auto' keeps float32 there")


@dataclass(frozen=True)
class PCAConfig:
    n_comps: int = _f(50, "the cell graph is searched in the feature embedding and this many principal components "
                      "of the library-normalised counts side by side, each part centred and scaled to a mean "
                      "squared norm of 1 per cell (0: off, the published graph of the feature embedding alone)",
                      why="the cell graph of [feature embedding | PCA] clustered better than the feature embedding "
                          "alone (bench/RESULTS.md, 'The feature embedding beside a PCA of normalised counts')")
    n_top_genes: int = _f(2000, "genes of the PCA: the most variable of all input genes by normalised dispersion "
                          "(Seurat's rule, as scanpy's default highly_variable_genes), after normalising")
    target_sum: float = _f(0.0, "counts per cell after library-size normalisation (0: the median library size, as "
                           "scanpy's normalize_total), then log1p")
    max_cells: int = _f(100000, "cells sampled (the run's seed) to fit the components; every cell is projected")


@dataclass(frozen=True)
class GraphConfig:
    k: int = _f(10, "neighbours per cell")
    method: str = _f("auto", "KNN search: 'auto' ('blocks' when the embedding is larger than memory_budget_mb, "
                     "else exact below 20,000 cells, torch on a GPU, else pynndescent), 'exact', 'pynndescent', "
                     "'torch' (blocked brute force, GPU when present), 'blocks' (k-means parts of about "
                     "2 x block_cells cells searched one at a time from a scratch file beside the stage's outputs, "
                     "at most about 2 x N x (4 d + 8) bytes of disk; the embedding is never held whole)", ("auto", "exact", "pynndescent", "torch", "blocks"))
    prune: str = _f("std", "edge pruning: 'std' (drop edges beyond mean + 1 std of the cell's k distances), "
                    "'isolation_forest', or 'none'", ("std", "isolation_forest", "none"))
    exact_max_cells: int = _f(20000, "'auto' uses exact search up to this many cells")
    nnd_neighbors: int = _f(30, "pynndescent: degree of the NN-descent graph (> k; 30 gave recall@10 0.98 on "
                            "100k 128-d blobs, k+1 gave 0.69)")
    nnd_trees: int = _f(0, "pynndescent: random-projection trees of the initialisation (0: its default)")
    nnd_iters: int = _f(0, "pynndescent: NN-descent iterations at most (0: its default)")
    n_jobs: int = _f(0, "pynndescent: numba threads (0: min(8, cores)); fixed so memory does not grow with the host")
    recall_sample: int = _f(256, "pynndescent: cells whose exact neighbours are found to report recall@k (0: off)")
    torch_query_block: int = _f(4096, "torch brute force: query rows per block")
    memory_budget_mb: int = _f(1024, "'auto' searches with 'blocks' when the embedding (N x d x 4 bytes) is larger "
                               "than this")
    block_cells: int = _f(250000, "blocks: k-means with ceil(N / block_cells) centroids (fewer than 3: one part of "
                          "all cells); a part holds its cells (split above 2 x block_cells) and at most about "
                          "block_cells cells near its boundary whose second-nearest centroid it is")
    partition_sample: int = _f(200000, "blocks: cells sampled to fit the k-means partition")


@dataclass(frozen=True)
class GAEConfig:
    hidden: int = _f(32, "first GCN layer size")
    latent: int = _f(16, "graph embedding size")
    lr: float = _f(0.01, "Adam learning rate (0.01 in the published code)")
    epochs: int = _f(200, "passes over the target nodes")
    neg_ratio: float = _f(1.0, "sampled non-edges per edge in the BCE loss")
    batch_size: int = _f(4096, "target nodes per minibatch in neighbour-sampling mode")
    fanouts: str = _f("10,10", "neighbours sampled per hop (comma separated, one per GCN layer)")
    full_graph_max_nodes: int = _f(50000, "train on the full graph (no sampling) up to this many cells")
    memory_budget_mb: int = _f(1024, "minibatch mode: the node features and their propagation A~E (N x 128 float32 "
                               "each) are held in memory up to this size (about 2M cells), above it in scratch files "
                               "in TMPDIR (N x 128 x 4 bytes twice, then N x 32 x 4) that each step reads its rows from")
    mode: str = _f("auto", "'auto' (full graph up to full_graph_max_nodes, else minibatch), 'full' or 'minibatch'",
                   ("auto", "full", "minibatch"))
    final_relu: bool = _f(False, "ReLU on the graph embedding (the paper's formula); off: linear output, as the "
                          "published code's GCNModelAE",
                          why="LouvainK mean ARI over 5 gold-set runs 0.43 linear vs 0.40 ReLU; Leiden on its KNN "
                          "graph 0.52 vs 0.41")
    standardize: bool = _f(True, "z-score each column of the 128-d embedding before the GCN",
                           why="raw AE embeddings reach scales of 10-100 that kill the first ReLU (the published "
                           "code fed a 0/1 binarised embedding)")
    epoch_cells: int = _f(16384, "minibatch mode: target cells per epoch (min with N), so the work of 'epochs' "
                          "is bounded at any N")
    sample_first_layer: bool = _f(False, "minibatch mode: also sample the first layer's neighbours (classic "
                                  "2-hop sampling); off: the first layer's aggregation is exact, computed once")
    plateau_tol: float = _f(0.005, "stop once the mean loss of plateau_window epochs falls by less than this "
                            "fraction of the previous window's: 'epochs' becomes a cap (0: always 'epochs', as "
                            "before 2026-12-06)", why="README, 'Small and medium sets'")
    plateau_window: int = _f(10, "epochs per window of the plateau rule")
    torch_threads: int = _f(0, "torch threads of the GAE on CPU (0: all cores but one, as the autoencoders; its "
                            "sparse products gain nothing from a second thread on a busy machine)")


@dataclass(frozen=True)
class ClusterConfig:
    method: str = _f("leiden", "'louvaink' (paper: Louvain count x factor, KMeans on the embedding), "
                     "'leiden' or 'louvain' directly on the graph", ("louvaink", "leiden", "louvain"))
    resolution: float = _f(0.3, "resolution of Leiden/Louvain (higher: more clusters)",
                           why="on the pruned graph, mean ARI over 7 gold sets with PCA-50 input: "
                           "0.585/0.611/0.556/0.471 at 0.2/0.3/0.5/1.0")
    small_factor: float = _f(0.8, "LouvainK: factor below 2000 cells")
    large_factor: float = _f(0.5, "LouvainK: factor from 2000 cells on")
    max_clusters: int = _f(30, "at most this many clusters")
    min_cluster_size: int = _f(5, "clusters smaller than this are merged into the nearest one")
    graph: str = _f("pruned", "graph of 'leiden'/'louvain': 'pruned' (the pruned cell graph obsp/scgnn_graph) or "
                    "'embedding' (a KNN graph of the 16-d GAE embedding); LouvainK counts on 'pruned' as the paper",
                    ("pruned", "embedding"))
    embedding_k: int = _f(15, "neighbours of the KNN graph of the GAE embedding (cluster.graph 'embedding')")
    n_iterations: int = _f(-1, "Leiden iterations (-1: until no improvement)")
    restarts: int = _f(10, "'leiden'/'louvain' in the first pass: run this many times (seeds seed..seed+R-1) and "
                       "take their consensus (edges weighted by how often their ends are together, those under "
                       "consensus_threshold dropped, again until the runs agree; Lancichinetti & Fortunato 2012); "
                       "1: one run (the published single run); up to restarts_max_cells cells, and not applied with "
                       "cluster.partition 'parts'",
                       why="on the graph of the feature embedding alone (pca.n_comps 0) 10 restarts lowered HALF_A's "
                       "mean first-pass ARI 0.707 -> 0.677; on the graph beside the PCA they raised it 0.706 -> 0.741 "
                       "over 5 seeds (0.719 -> 0.740 over 5 x 10 Leiden seeds) and brought the SD over 5 seeds to "
                       "at most 0.007 on every HALF_A set; README, 'Clusters that hold from seed to seed'")
    restarts_max_cells: int = _f(50000, "cluster.restarts apply up to this many cells; beyond, one run (each "
                                 "restart is a Leiden run on the whole graph, and the consensus takes up to "
                                 "consensus_rounds rounds of them: about a minute per run at 1M cells on two cores)")
    consensus_threshold: float = _f(0.5, "cluster.restarts > 1: drop the edges whose ends fewer than this fraction "
                                    "of the runs put together")
    consensus_rounds: int = _f(5, "cluster.restarts > 1: rounds of the consensus at most (1: no consensus graph, the "
                               "run that agrees most with the majority of the runs on the graph's edges)")
    kmeans_max_cells: int = _f(50000, "LouvainK: full KMeans up to this many cells, MiniBatchKMeans beyond")
    partition: str = _f("auto", "where Louvain/Leiden see the pruned graph: 'whole' (all of it in igraph, about 85 "
                        "bytes per edge); 'parts' (micro-communities in k-means parts of about part_cells cells, then "
                        "Louvain/Leiden on their aggregate graph: memory flat in N); 'auto' ('parts' when 'whole' "
                        "would take more than memory_budget_mb)", ("auto", "whole", "parts"))
    memory_budget_mb: int = _f(2048, "cluster.partition 'auto': igraph's memory for the whole graph at most this "
                               "(about 25M edges: 3.6M cells at the cell graph's mean degree of 14)")
    part_cells: int = _f(250_000, "cluster.partition 'parts': cells per part (one part's edges are in igraph at a time)")
    micro_resolution: float = _f(10.0, "cluster.partition 'parts': resolution of the micro-communities (the whole "
                                 "graph's modularity, restricted to each part; higher: smaller)")
    gpu: bool = _f(False, "use cuGraph's Louvain/Leiden when a CUDA device and cugraph are present (off by default: "
                    "that path has not run on a GPU here yet; igraph/leidenalg is the tested one)")


@dataclass(frozen=True)
class IterateConfig:
    max_iterations: int = _f(0, "iterations of cluster AEs, feature AE, graph, GAE and clusters at most after the "
                             "first pass (0: none, the first pass's clusters are the result; the paper: 10)",
                             why="on the gold sets of bench/gold_split.py the iterations did not raise the mean ARI "
                             "and took 36-77% of a run's CPU (README, 'Method notes'); "
                             "--iterate-max-iterations 10 restores the published iterative process")
    ari_stop: float = _f(0.99, "stop when the ARI between consecutive clusterings exceeds this")
    graph_lambda: float = _f(0.5, "lambda of the graph change criterion")
    graph_tol: float = _f(0.01, "stop when mean|A'_t - A'_t-1| < graph_tol * mean|L0|")
    graph_reference: str = _f("laplacian", "L0 of the graph criterion: 'laplacian' (I - D^-1/2 A0 D^-1/2, the published "
                              "code) or 'adjacency' (D^-1/2 A0 D^-1/2, the paper's text)", ("laplacian", "adjacency"))
    cluster_steps: int = _f(200, "optimiser steps of each cluster autoencoder at least (the original: 200 "
                            "full-batch epochs)")
    cluster_max_epochs: int = _f(1, "passes over a cluster's cells when that takes more than cluster_steps: each "
                                 "cluster AE runs max(cluster_steps, cluster_max_epochs x its batches per epoch) steps")
    cluster_plateau_tol: float = _f(0.0, "stop each cluster autoencoder once the mean loss of 50 steps falls by "
                                    "less than this fraction of the previous 50's: its step count becomes a cap (0: "
                                    "always the full count)", why="its effect on the clusters is not measured apart "
                                    "from the feature autoencoder's (README, 'Small and medium sets')")
    cluster_gamma: float = _f(1.0, "weight of the squared error of the cluster AEs (the published 'noregu' loss: 1.0)")
    cluster_init: str = _f("feature", "start each cluster AE from the current feature AE's weights (as the "
                           "published code) or 'fresh'", ("feature", "fresh"))
    cluster_executor: str = _f("auto", "where cluster AEs train: 'dask' (one task per cluster), 'local' (one after "
                               "another in this process), 'auto' (local on a GPU, dask otherwise)",
                               ("auto", "dask", "local"))
    cluster_memory_budget_mb: int = _f(512, "a cluster's rows are served from memory when they fit this, streamed otherwise")
    scatter_buffer_mb: int = _f(256, "memory for the rows buffered while laying clusters out and putting them back")
    feature_ltmg: bool = _f(True, "keep the LTMG term in the continued feature AE (the published code drops it "
                            "in iterations unless --EMreguTag)")
    cluster_count: str = _f("first", "number of clusters in the iterations: 'first' (the first pass's count is "
                            "kept) or 'free' (the rule decides again each iteration, as the published code)",
                            ("first", "free"),
                            why="freely the count grows as iterations shrink within-cluster variation "
                            "(README, 'Number of clusters in the iterations')")


@dataclass(frozen=True)
class ImputeConfig:
    gamma1: float = _f(0.3, "weight of the graph regulariser (per-cell degree weight)")
    gamma2: float = _f(0.1, "weight of the cell-type regulariser (per-cell cluster-size weight)")
    l1: float = _f(1.0, "weight of the L1 penalty on the network weights")
    zero_weight: str = _f("expected", "how the imputation AE weighs zeros: 'expected' (trained on X; an observed "
                          "zero weighs gamma times its chance under a Poisson of its cluster's mean of that gene, so "
                          "a dropout of a well-expressed gene barely counts; no graph or cell-type regulariser) or "
                          "'published' (trained on impute.input, every zero of LTMG state 0 weighs gamma, with the "
                          "graph and cell-type regularisers of the paper's Eq. 9-11)", ("expected", "published"),
                          why="on HALF_A (the dropout protocol, 3 maskings) median L1 and RMSE lower on average, "
                          "goolam at 30% 0.243 / 0.497 against 0.530 / 1.401, no row worse by more than 0.02 "
                          "(klein_subset's RMSE 0.016); reported on HALF_B: baron_pancreas_toy at 30% 0.340 against "
                          "0.629 (bench/RESULTS.md, 'Zeros weighted by their chance')")
    init: str = _f("fresh", "where the imputation AE starts: 'fresh' (new weights from the run's seed, the published "
                   "code) or 'feature' (the first pass's feature autoencoder's trained weights and optimiser, which "
                   "already reconstruct X, so fewer steps may do)", ("fresh", "feature"),
                   why="'feature' with 50 steps took a quarter of the CPU and was better on klein_subset, but on "
                   "goolam at 30% it kept the dropouts the feature AE had learned (median L1 0.456 against 0.243) "
                   "and on mouse_bladder_2100 it was 0.008-0.015 worse (bench/RESULTS.md, 'Three ways to less CPU or "
                   "less spread', item 3)")
    steps: int = _f(200, "optimiser steps at least (the published code: EM_epochs = 200 full-batch epochs)")
    max_epochs: int = _f(10, "passes over the data once that exceeds 'steps' (as feature.max_epochs); the "
                         "network size, batch size, learning rate and loader are the feature autoencoder's")
    max_steps: int = _f(2000, "cap on the epoch rule's steps (as feature.max_steps; 0: none)")
    use_ltmg: bool = _f(True, "add the LTMG-weighted error (alpha term of the feature AE) when layers/ltmg exists")
    input: str = _f("recon", "what the imputation AE reconstructs: 'recon' (the feature AE's first "
                    "reconstruction, the published code's reconOri), 'final' (the last iteration's) or 'X' (the "
                    "preprocessed matrix with its dropout zeros)", ("recon", "final", "X"),
                    why="trained on X the AE learns the dropout zeros back and loses to kNN smoothing on every "
                    "count set (bench/RESULTS.md)")
    dtype: str = _f("float32", "dtype of layers/imputed: 'float32', or 'float16' (half the disk; the values are "
                    "log1p-scale expression, where float16 keeps 3 significant digits: a relative error of at "
                    "most 2^-11)", ("float32", "float16"))
    mantissa_bits: int = _f(14, "mantissa bits of layers/imputed kept: each value rounded to the nearest with this "
                            "many (bit rounding; the dtype stays as --impute-dtype says), so the compressor stores "
                            "the rest in almost nothing; the error is at most 2^-(bits+1) of the value (3.1e-5 at "
                            "14). 23 keeps every bit of float32; float16 keeps 10 at most",
                            why="the fewest bits whose largest error is under a tenth of what another seed changes "
                            "in 99% of the entries, on HALF_A (klein_subset, mouse_bladder_2100); the layer takes "
                            "0.66-0.69 of its unrounded bytes (bench/bench_mantissa_bits.py, bench/RESULTS.md)")


@dataclass(frozen=True)
class RuntimeConfig:
    seed: int = _f(0, "seed of every random choice; the same seed on the same machine gives the same clusters")
    device: str = _f("auto", "torch device: 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    gpus: int = _f(1, "processes that train the autoencoders data-parallel (DistributedDataParallel), one per GPU "
                      "(cuda:0 .. cuda:N-1); with --device cpu, N CPU processes over gloo. Launched by torchrun, "
                      "torchrun's ranks are used instead")
    scheduler: str = _f("", "Dask scheduler address (tcp://host:8786); empty: an embedded LocalCluster")
    n_workers: int = _f(0, "workers of the embedded LocalCluster (0: one per core)")
    worker_timeout: float = _f(120.0, "seconds a run waits while its --scheduler has no worker before it stops "
                                      "with an error (finished stages are kept)")
    dashboard: str = _f("", "address of the embedded cluster's Dask dashboard, e.g. '127.0.0.1:8787' (needs bokeh); "
                        "empty: none (its other HTTP endpoints listen on loopback only)")
    worker_processes: bool = _f(False, "embedded Dask workers as processes (pay off on many cores: the LTMG fits "
                                "hold the GIL) instead of threads; a calling script needs an "
                                "`if __name__ == '__main__'` guard")
    memory_limit: str = _f("", "memory for the whole run, e.g. '4GiB': caps what the loaders hold instead of "
                            "streaming and the Dask workers' memory (empty: the configured budgets and Dask's default)")
    keep_work: bool = _f(False, "store the feature autoencoder's cells x genes reconstructions (work/recon, "
                         "work/recon_final; 4 bytes per cell and gene each, and one more per iteration while it "
                         "runs) and keep them when the run ends; without it iterate and impute compute them from "
                         "the saved models and 128-d embeddings as they read them, nothing cells x genes is "
                         "stored under work/, and work/input (the input's copy, read only by preprocess) is "
                         "removed once preprocess has finished")


SECTIONS: dict[str, type] = {
    "store": StoreConfig,
    "ingest": IngestConfig,
    "preprocess": PreprocessConfig,
    "ltmg": LTMGConfig,
    "feature": FeatureConfig,
    "pca": PCAConfig,
    "graph": GraphConfig,
    "gae": GAEConfig,
    "cluster": ClusterConfig,
    "iterate": IterateConfig,
    "impute": ImputeConfig,
    "runtime": RuntimeConfig,
}


@dataclass(frozen=True)
class RunConfig:
    store: StoreConfig = field(default_factory=StoreConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    ltmg: LTMGConfig = field(default_factory=LTMGConfig)
    feature: FeatureConfig = field(default_factory=FeatureConfig)
    pca: PCAConfig = field(default_factory=PCAConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    gae: GAEConfig = field(default_factory=GAEConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    impute: ImputeConfig = field(default_factory=ImputeConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """A short hash of the options of the named sections that shape results (metadata left out)."""
        payload = json.dumps({n: result_options(getattr(self, n)) for n in names}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def result_options(section) -> dict[str, Any]:
    """The options of one config section that change what a stage computes (``result=True``)."""
    return {f.name: getattr(section, f.name) for f in fields(section) if f.metadata.get("result", True)}


def changed_options(old: dict[str, dict[str, Any]], new: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(section.option, old value, new value)`` for each option that differs from a stored config."""
    out = []
    for section, values in new.to_dict().items():
        before = old.get(section, {})
        for name, value in values.items():
            if name in before and before[name] != value:
                out.append((f"{section}.{name}", before[name], value))
            elif name not in before:
                out.append((f"{section}.{name}", None, value))
    return out


#: the largest integer an option may hold (what numpy's int64 indices and sizes hold)
_INT_LIMIT = 2**63 - 1


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b"


def _coerce(section: str, name: str, value: Any, kind: type) -> Any:
    """``value`` (a flag's text, a TOML value or a Python value) as the option's type, or an InputError.

    A TOML ``true`` is no number, a list or table is no text, and a number must be finite: nothing is
    converted silently into a value the option was not given."""
    where = f"{section}.{name}"
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not (_is_bool(value) or (isinstance(value, int | float) and value in (0, 1))):
                raise TypeError(value)
            return bool(value)
        if kind is str:
            if isinstance(value, os.PathLike):
                return os.fspath(value)
            if not isinstance(value, str):
                raise TypeError(value)
            return value
        if _is_bool(value):
            raise TypeError(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        result = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"config option {where}: {value!r} is not a valid {kind.__name__}") from None
    if kind is float and not math.isfinite(result):
        raise InputError(f"config option {where}: {value!r} is not a finite number")
    if kind is int and abs(result) > _INT_LIMIT:
        raise InputError(f"config option {where}: {value!r} is too large (at most {_INT_LIMIT})")
    return result


def config_fields():
    """Yield (section, field) for every option, in order (used by --help and --set)."""
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            yield section, f


#: the range of each numeric option: (lowest, highest, whether the lowest is allowed); every option not named
#: here takes any value. Checked when a config is built, so a bad value stops a run before any work.
_AT_LEAST_1 = (1, None, True)
_AT_LEAST_0 = (0, None, True)
_POSITIVE = (0, None, False)
_FRACTION = (0, 1, True)
BOUNDS: dict[str, tuple] = {
    "store.chunk_rows": _AT_LEAST_1, "store.chunk_genes": _AT_LEAST_1, "store.compression_level": (0, 9, True),
    "ingest.block_rows": _AT_LEAST_1,
    "preprocess.min_cell_fraction": _FRACTION, "preprocess.min_gene_fraction": _FRACTION,
    "preprocess.n_top_genes": _AT_LEAST_1, "preprocess.normalize_total": _AT_LEAST_0,
    "ltmg.max_cells": _AT_LEAST_1, "ltmg.block_genes": _AT_LEAST_1, "ltmg.k_min": _AT_LEAST_1,
    "ltmg.k_max": _AT_LEAST_1, "ltmg.max_iter": _AT_LEAST_1, "ltmg.tol": _AT_LEAST_0, "ltmg.min_sd": _POSITIVE,
    "feature.hidden": _AT_LEAST_1, "feature.latent": _AT_LEAST_1, "feature.lr": _POSITIVE,
    "feature.gamma": _AT_LEAST_0, "feature.alpha": _AT_LEAST_0, "feature.l1": _AT_LEAST_0,
    "feature.batch_size": _AT_LEAST_1, "feature.min_steps": _AT_LEAST_0, "feature.max_epochs": _AT_LEAST_0,
    "feature.max_steps": _AT_LEAST_0, "feature.iter_steps": _AT_LEAST_0, "feature.memory_budget_mb": _AT_LEAST_0,
    "feature.buffer_blocks": _AT_LEAST_1, "feature.prefetch_blocks": _AT_LEAST_0,
    "feature.checkpoint_minutes": _AT_LEAST_0, "feature.torch_threads": _AT_LEAST_0, "feature.plateau_tol": _FRACTION,
    "graph.k": _AT_LEAST_1, "graph.exact_max_cells": _AT_LEAST_0, "graph.nnd_neighbors": _AT_LEAST_1,
    "graph.nnd_trees": _AT_LEAST_0, "graph.nnd_iters": _AT_LEAST_0, "graph.n_jobs": _AT_LEAST_0,
    "graph.recall_sample": _AT_LEAST_0, "graph.torch_query_block": _AT_LEAST_1,
    "graph.memory_budget_mb": _AT_LEAST_0, "graph.block_cells": _AT_LEAST_1, "graph.partition_sample": _AT_LEAST_1,
    "gae.hidden": _AT_LEAST_1, "gae.latent": _AT_LEAST_1, "gae.lr": _POSITIVE, "gae.epochs": _AT_LEAST_0,
    "gae.neg_ratio": _POSITIVE, "gae.batch_size": _AT_LEAST_1, "gae.full_graph_max_nodes": _AT_LEAST_0, "gae.memory_budget_mb": _AT_LEAST_0,
    "gae.epoch_cells": _AT_LEAST_1, "gae.plateau_tol": _FRACTION, "gae.plateau_window": _AT_LEAST_1,
    "gae.torch_threads": _AT_LEAST_0,
    "cluster.resolution": _POSITIVE, "cluster.small_factor": _POSITIVE, "cluster.large_factor": _POSITIVE,
    "cluster.max_clusters": _AT_LEAST_1, "cluster.min_cluster_size": _AT_LEAST_1, "cluster.embedding_k": _AT_LEAST_1,
    "cluster.kmeans_max_cells": _AT_LEAST_1, "cluster.memory_budget_mb": _AT_LEAST_0,
    "cluster.part_cells": _AT_LEAST_1, "cluster.micro_resolution": _POSITIVE, "cluster.restarts": (1, 255, True),
    "cluster.consensus_threshold": _FRACTION, "cluster.consensus_rounds": _AT_LEAST_1,
    "iterate.max_iterations": _AT_LEAST_0, "iterate.graph_lambda": _FRACTION, "iterate.graph_tol": _AT_LEAST_0,
    "iterate.cluster_steps": _AT_LEAST_0, "iterate.cluster_max_epochs": _AT_LEAST_0,
    "iterate.cluster_gamma": _AT_LEAST_0, "iterate.cluster_plateau_tol": _FRACTION, "iterate.cluster_memory_budget_mb": _AT_LEAST_0,
    "iterate.scatter_buffer_mb": _POSITIVE,
    "impute.gamma1": _AT_LEAST_0, "impute.gamma2": _AT_LEAST_0, "impute.l1": _AT_LEAST_0, "impute.steps": _AT_LEAST_0,
    "impute.max_epochs": _AT_LEAST_0, "impute.max_steps": _AT_LEAST_0, "impute.mantissa_bits": (1, 23, True),
    "runtime.seed": _AT_LEAST_0, "runtime.n_workers": _AT_LEAST_0, "runtime.gpus": _AT_LEAST_1,
    "runtime.worker_timeout": (1.0, None, True),
}


def _check_bounds(option: str, value: Any) -> None:
    if option not in BOUNDS:
        return
    low, high, low_allowed = BOUNDS[option]
    if (value < low if low_allowed else value <= low) or (high is not None and value > high):
        wanted = (f"at least {low}" if low_allowed else f"above {low}") + (f" and at most {high}" if high else "")
        raise InputError(f"config option {option}: {value!r} is out of range (must be {wanted})")


def parse_fanouts(text: str) -> list[int]:
    """``gae.fanouts``: ``"10,10"`` -> ``[10, 10]`` (one fan-out per GCN layer, from the targets outward; -1: all)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"config option gae.fanouts {text!r}: expected comma-separated integers such as "
                         "'10,10'") from None
    if len(values) != 2 or any(v == 0 or v < -1 for v in values):
        raise InputError(f"config option gae.fanouts {text!r}: expected two positive fan-outs (or -1 for all), "
                         "e.g. '10,10'")
    return values


#: the address schemes of Dask's comm backends (distributed.comm.registry)
_DASK_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx", "inproc")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]@]+):(?P<port>\d{1,5})")
_LISTEN = re.compile(r"(?:(?P<host>[^\s:,/]*):)?(?P<port>\d{1,5})")


def _check_scheduler(address: str) -> None:
    """``runtime.scheduler``: empty, or a Dask address such as ``tcp://10.0.0.5:8786`` (checked before work;
    whether it answers is known when the first stage connects)."""
    if not address:
        return
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    if scheme not in _DASK_SCHEMES:
        raise InputError(f"config option runtime.scheduler {address!r}: unknown address scheme {scheme!r} (one of "
                         f"{', '.join(_DASK_SCHEMES)}, e.g. tcp://10.0.0.5:8786)")
    if scheme == "inproc":
        return
    match = _HOST_PORT.fullmatch(rest)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise InputError(f"config option runtime.scheduler {address!r}: not a scheduler address (HOST:PORT, e.g. "
                         "tcp://10.0.0.5:8786)")


def _check_dashboard(address: str) -> None:
    """``runtime.dashboard``: empty, or where the dashboard listens (``HOST:PORT``, ``:PORT`` or ``PORT``)."""
    for part in address.split(",") if address else ():
        match = _LISTEN.fullmatch(part.strip())
        if match is None or int(match["port"]) > 65535:
            raise InputError(f"config option runtime.dashboard {address!r}: not an address to listen on (HOST:PORT, "
                             "e.g. 127.0.0.1:8787)")


def _check_directory(option: str, path: str) -> None:
    """A directory option: no NUL byte (no file system takes one; Python's calls fail with a message that
    would name the input, not the option)."""
    if "\x00" in path:
        raise InputError(f"config option {option} {path!r}: a path cannot hold a NUL byte")


def build_config(overrides: dict[str, dict[str, Any]] | None = None, base: RunConfig | None = None) -> RunConfig:
    """Apply ``{section: {option: value}}`` on top of ``base`` (the defaults), checking names, types, choices."""
    base = base or RunConfig()
    sections = {}
    for section, cls in SECTIONS.items():
        current = getattr(base, section)
        values = dict((overrides or {}).get(section, {}))
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise InputError(f"unknown config option(s) in [{section}]: {', '.join(sorted(unknown))}")
        changes = {}
        for name, value in values.items():
            f = known[name]
            kind = type(f.default)
            value = _coerce(section, name, value, kind)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise InputError(f"config option {section}.{name}: {value!r} is not one of {', '.join(choices)}")
            _check_bounds(f"{section}.{name}", value)
            changes[name] = value
        sections[section] = dataclasses.replace(current, **changes)
    unknown_sections = set(overrides or {}) - set(SECTIONS)
    if unknown_sections:
        raise InputError(f"unknown config section(s): {', '.join(sorted(unknown_sections))}")
    parse_fanouts(sections["gae"].fanouts)
    _check_scheduler(sections["runtime"].scheduler)
    _check_dashboard(sections["runtime"].dashboard)
    _check_directory("ingest.tmp_dir", sections["ingest"].tmp_dir)
    ltmg = sections["ltmg"]
    if ltmg.k_max < ltmg.k_min:
        raise InputError(f"config options ltmg.k_min {ltmg.k_min} and ltmg.k_max {ltmg.k_max}: k_max must be at "
                         "least k_min")
    return RunConfig(**sections)


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """Defaults, then a TOML file (``[section] option = value``), then ``overrides`` (CLI flags)."""
    cfg = RunConfig()
    if path:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not a valid TOML file ({exc})") from None
        bad = [k for k, v in data.items() if not isinstance(v, dict)]
        if bad:
            raise InputError(f"{path}: options must sit in [section] tables; found top-level {', '.join(bad)}")
        cfg = build_config(data, cfg)
    return build_config(overrides or {}, cfg)


def config_from_dict(data: dict[str, dict[str, Any]]) -> RunConfig:
    """Rebuild a config stored in a run (``RunConfig.to_dict`` output)."""
    return build_config(data)
