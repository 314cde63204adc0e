"""metrics.prdc: precision, recall, density and coverage against their definitions, computed here by
brute force from all pairwise distances, and on the sets whose answers are known exactly."""
import numpy as np
import pytest
from scipy.spatial.distance import cdist

import metrics


def brute_force(real, fake, k):
    """The definitions, spelled out: k-NN radii, then ball memberships."""
    d_rr, d_ff, d_fr = cdist(real, real), cdist(fake, fake), cdist(fake, real)
    r_real = np.sort(d_rr, 1)[:, k]                       # column 0 is the point itself
    r_fake = np.sort(d_ff, 1)[:, k]
    inside = d_fr < r_real[None, :]                       # fake j inside real i's ball
    return {"precision": inside.any(1).mean(),            # fakes inside some real ball
            "recall": (d_fr < r_fake[:, None]).any(0).mean(),  # reals inside some fake ball
            "density": inside.sum(1).mean() / k,
            "coverage": (d_fr.min(0) < r_real).mean()}    # reals whose nearest fake is inside their ball


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_the_definitions(k):
    rng = np.random.default_rng(k)
    real, fake = rng.normal(size=(400, 6)), rng.normal(0.3, 1.2, size=(300, 6))   # no ties
    ours, ref = metrics.prdc(real, fake, k), brute_force(real, fake, k)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1        # a case that can fail


def test_prdc_identical_far_apart_and_half_overlapping_sets():
    a = np.random.default_rng(0).normal(size=(1200, 5))    # > 512 rows: several distance chunks
    # Identical sets: every point is in its own ball and in those of its k - 1 nearer neighbours; the
    # k-th neighbour sits exactly on the edge and is out (strict <), so density is exactly 1.
    assert metrics.prdc(a, a.copy(), k=3) == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}
    assert metrics.prdc(a, a + 100.0, k=3) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    half = metrics.prdc(a, np.concatenate([a[:600], a[:600] + 100.0]), k=3)
    assert half["precision"] == 0.5
