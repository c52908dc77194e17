"""The keyed bijection that orders an epoch's rows without an O(n) array."""

import numpy as np
import pytest

from astra_ds.training.permutation import KeyedPermutation


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_every_position_maps_to_a_distinct_row(n):
    rows = KeyedPermutation(n, key=5)[np.arange(n)]
    assert sorted(rows.tolist()) == list(range(n))


def test_the_key_chooses_the_order_and_the_same_key_gives_it_again():
    n, positions = 10_000, np.arange(10_000)
    first, again, other = (KeyedPermutation(n, key)[positions] for key in (1, 1, 2))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert KeyedPermutation(n, 1)[17] == first[17] and KeyedPermutation(n, 1)[[3, 17]].tolist() == first[[3, 17]].tolist()
    # a shuffle, not a rotation: neighbours land far apart, and the first rows of 200 keys are spread over [0, n)
    assert np.median(np.abs(np.diff(first))) > n / 10
    starts = np.array([KeyedPermutation(n, key)[0] for key in range(200)])
    assert len(set(starts.tolist())) > 190 and 0.4 < starts.mean() / n < 0.6


def test_a_position_outside_the_range_is_an_error():
    with pytest.raises(IndexError):
        KeyedPermutation(10, 0)[10]
