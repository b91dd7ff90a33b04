"""Publishing: the latest pass's embeddings, graph and clusters under the keys a user reads.

The feature, graph, gae and cluster stages write the first pass under ``work/first_pass``; iterate
writes its last pass under ``work/iterated``. After every stage the pipeline copies the latest
finished version of each result to its published key (``obsm/X_scgnn_feature``,
``obsp/scgnn_graph``, ``obsm/X_scgnn``, ``obs/scgnn_cluster``), and removes a published key whose
source stage is no longer finished. What was published from where is recorded in the manifest,
so a run killed between a stage's commit and its publication publishes on resume.
"""

from __future__ import annotations

import logging

from .keys import FIRST_PASS, ITERATED, PUBLISHED
from .store import RunStore

log = logging.getLogger("scgnn_scale")

#: the stage that writes each result of the first pass
FIRST_PASS_STAGES = ("feature", "graph", "gae", "cluster")


def sources(store: RunStore) -> dict[str, tuple[str, str]]:
    """``{published key: (source key, stage)}``: the latest finished version of each result."""
    stages = store.manifest.get("stages", {})
    out = {}
    for public, first, last, stage in zip(PUBLISHED, FIRST_PASS, ITERATED, FIRST_PASS_STAGES, strict=True):
        if "iterate" in stages and store.has(last):
            out[public] = (last, "iterate")
        elif stage in stages and store.has(first):
            out[public] = (first, stage)
    return out


def publish(store: RunStore) -> list[str]:
    """Bring every published key up to date with :func:`sources`; returns the keys rewritten."""
    stages = store.manifest.get("stages", {})
    record = dict(store.manifest.get("published", {}))
    wanted = sources(store)
    changed = []
    with store.staging("publish") as st:
        for public in PUBLISHED:
            if public not in wanted:
                if record.pop(public, None) is not None or store.has(public):
                    st.drop(public)  # its source stage is being redone: never show a stale result
                    changed.append(public)
                continue
            source, stage = wanted[public]
            tag = f"{source}@{stages[stage]['hash']}:{stages[stage].get('finished', '')}"
            if record.get(public) == tag and store.has(public):
                continue
            if public.startswith(("obsm/", "layers/")):
                st.copy_array(public, store.open_array(source))
            else:
                st.write_elem(public, store.read_elem(source))
            record[public] = tag
            changed.append(public)
    if changed:
        store.record_published(record)
        log.debug("published %s", ", ".join(changed))
    return changed
