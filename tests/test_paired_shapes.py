"""The paired families' data shapes for calibration (rh.calibration.PairedItems): every shape plants
exactly the drop it is asked for, and each has the structure it names."""

from __future__ import annotations

import numpy as np
import pytest

from rh.calibration import PAIRED_SHAPES, PairedItems


@pytest.mark.parametrize("shape", PAIRED_SHAPES)
@pytest.mark.parametrize("drop", [0.0, 0.2, 0.3])
def test_every_shape_plants_the_drop_it_is_asked_for(shape, drop):
    """The accuracy after a condition is the baseline's minus ``drop`` (200,000 items, within 5 SE).
    Catches a shape whose structure leaks into the effect: a fragility shared with the baseline's
    draw loses more of the items the baseline got right than planted (the first version of
    "shared-items" did, and the calibration then showed false refutes of 0.2 that were the
    generator's, not the rules')."""
    rng = np.random.default_rng(1)
    items = PairedItems(rng, 200_000, shape)
    base = items.base()
    after = items.after(base, drop)
    assert base.mean() == pytest.approx(items.base_acc, abs=0.005)
    assert base.mean() - after.mean() == pytest.approx(drop, abs=5 * np.sqrt(0.1 / 200_000) + 1e-3)


def test_each_shape_has_the_structure_it_names():
    rng = np.random.default_rng(2)
    n = 50_000
    het = PairedItems(rng, n, "heterogeneous")
    base = het.base()
    flipped = np.zeros(n, bool)
    for _ in range(30):
        flipped |= het.after(base, 0.2) != base
    assert 0.38 <= 1 - flipped.mean() <= 0.42  # 40% of the items never flip, in any condition

    shared = PairedItems(rng, n, "shared-items")
    base = shared.base()
    lost_a, lost_b = (shared.after(base, 0.2) < base), (shared.after(base, 0.2) < base)
    assert np.corrcoef(lost_a[base == 1], lost_b[base == 1])[0, 1] > 0.1  # an item one condition loses, others do too
    uniform = PairedItems(rng, n, "uniform")
    base = uniform.base()
    lost_a, lost_b = (uniform.after(base, 0.2) < base), (uniform.after(base, 0.2) < base)
    assert abs(np.corrcoef(lost_a[base == 1], lost_b[base == 1])[0, 1]) < 0.03

    ceiling = PairedItems(rng, n, "ceiling")
    assert ceiling.base().mean() > 0.96
    with pytest.raises(ValueError, match="more items than can flip"):  # a gain the 3% wrong items cannot give
        ceiling.after(ceiling.base(), -0.1)
    with pytest.raises(ValueError, match="paired shape"):
        PairedItems(rng, 10, "tidy")
