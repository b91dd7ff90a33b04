"""Bit rounding: IEEE round-to-nearest-even at fewer mantissa bits, checked against float16 and by its bound."""

import numpy as np
import pytest

from scgnn_scale.bit_rounding import round_mantissa


def test_ten_bits_round_as_the_cast_to_float16_does(rng):
    x = (rng.standard_normal(200_000) * np.exp(rng.uniform(-8, 10, 200_000))).astype(np.float32)
    normal = (np.abs(x) >= 2.0**-14) & (np.abs(x) < 65504)  # float16's normal range: same rounding rule
    assert np.array_equal(round_mantissa(x, 10)[normal], x[normal].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("keep", [1, 4, 10, 12, 16, 22])
def test_error_is_at_most_half_a_unit_of_the_last_kept_bit(rng, keep):
    x = (rng.standard_normal(100_000) * 10).astype(np.float32)
    r = round_mantissa(x, keep)
    assert np.all(np.abs(r.astype(np.float64) - x) <= np.abs(x.astype(np.float64)) * 2.0 ** -(keep + 1))
    assert not np.any(r.view(np.uint32) & np.uint32(2 ** (23 - keep) - 1))  # the dropped bits are zero
    assert np.array_equal(np.sign(r), np.sign(x))


def test_ties_go_to_the_even_neighbour():
    # with one mantissa bit the neighbours are 1.0, 1.5, 2.0: 1.25 and 1.75 are ties
    got = round_mantissa(np.array([1.25, 1.75, -1.25, 1.2500001], np.float32), 1)
    assert got.tolist() == [1.0, 2.0, -1.0, 1.5]


def test_zeros_infinities_and_nans_stay_and_the_input_is_not_changed():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.0e-45, 1.0], np.float32)
    before = x.copy()
    r = round_mantissa(x, 3)
    assert r[0] == 0 and np.signbit(r[1]) and r[2] == np.inf and r[3] == -np.inf and np.isnan(r[4])
    assert np.array_equal(x.view(np.uint32), before.view(np.uint32))
    assert np.array_equal(round_mantissa(x, 23).view(np.uint32), x.view(np.uint32))


def test_only_float32_and_at_least_one_bit():
    with pytest.raises(TypeError):
        round_mantissa(np.ones(3), 10)
    with pytest.raises(ValueError):
        round_mantissa(np.ones(3, np.float32), 0)
