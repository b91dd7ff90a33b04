"""The fixed split of the gold-labelled data sets of ../shared/data into two halves.

A default chosen by measurement is chosen on one half and reported on the other (and the other way
round), so that no reported number comes from the sets it was tuned on. Sets drawn from the same
source stay in the same half (the two mouse bladder files hold the same cells; zeisel_subset is drawn
from the Zeisel data that zeisel15 holds whole), so nothing tuned on one half has seen the other.
"""

from __future__ import annotations

#: vendor clustering, not gold labels (shared/data/README.md): never used to choose or report quality
NOT_GOLD = frozenset({"10x_pbmc4k_top2000"})

HALF_A = ("klein_subset", "goolam", "pollen", "mouse_bladder_2100", "mouse_bladder_top2000")
HALF_B = ("zeisel_subset", "zeisel15", "baron_pancreas_toy", "worm_neuron")


def other_half(name: str) -> tuple[str, ...]:
    """The half a default chosen on ``name``'s half is reported on."""
    if name in HALF_A:
        return HALF_B
    if name in HALF_B:
        return HALF_A
    raise KeyError(f"{name} is not a gold set of the split")
