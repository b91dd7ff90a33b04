"""Bit rounding of float32 values before they are compressed (Klöwer et al. 2021, Nat. Comput. Sci. 1:713).

A float32 carries 23 mantissa bits, about 7 significant digits. The imputed layer's values are an
autoencoder's output on the log1p scale, and the last of those digits are noise that a compressor
cannot shrink. Rounding each value to ``keep`` mantissa bits (to the nearest, ties to even, as IEEE
rounding does) sets the other bits to zero. The dtype stays float32, so every reader sees an ordinary
float32 array, and byte shuffle plus zstd then store those zero bits in almost nothing.

The error of a rounded value is at most 2^-(keep + 1) of its size: 7.6e-6 at 16 bits, and 4.9e-4 at 10
bits, float16's precision, which keeps float32's range. Zeros, infinities and NaNs are unchanged.
"""

from __future__ import annotations

import numpy as np

#: float32's mantissa bits: keeping all of them leaves every value as it is
FLOAT32_MANTISSA_BITS = 23


def round_mantissa(values: np.ndarray, keep: int) -> np.ndarray:
    """``values`` (float32) rounded to ``keep`` mantissa bits, nearest with ties to even; a new array.

    ``keep`` >= 23 returns an unchanged copy. A value whose rounding carries into the exponent moves to
    the next power of two, as IEEE rounding does; one past float32's largest becomes infinite.
    """
    values = np.asarray(values)
    if values.dtype != np.float32:
        raise TypeError(f"round_mantissa rounds float32 values, not {values.dtype}")
    if not 1 <= keep:
        raise ValueError(f"keep must be at least 1 mantissa bit, not {keep}")
    if keep >= FLOAT32_MANTISSA_BITS:
        return values.copy()
    drop = np.uint32(FLOAT32_MANTISSA_BITS - keep)
    bits = values.view(np.uint32)
    # add just under half of the dropped range, plus the kept part's lowest bit (ties go to the even one)
    half_minus_one = np.uint32((1 << (int(drop) - 1)) - 1)
    rounded = bits + half_minus_one + ((bits >> drop) & np.uint32(1))
    rounded &= np.uint32((0xFFFFFFFF << int(drop)) & 0xFFFFFFFF)
    out = rounded.view(np.float32)
    # NaN's payload could round to zero bits and read as infinity: NaNs and infinities stay as they were
    not_finite = ~np.isfinite(values)
    if not_finite.any():
        out[not_finite] = values[not_finite]
    return out
