"""Sample-quality metrics on feature sets, shared by toy.py (2-D points) and evaluate.py (features).

Improved precision and recall (Kynkaanniemi et al. 2019) and density / coverage (Naeem et al. 2020)
compare two point sets through k-nearest-neighbour balls: precision is the fraction of generated
points inside some real point's ball, recall the fraction of real points inside some generated
point's ball. Inputs are (N, D) arrays of points or network features. We compute the radii and the
comparisons from one deterministic distance function: scikit-learn's NearestNeighbors finds the same
neighbours, but mixing its distances with another routine's breaks the exact ties of identical sets.
"""
import numpy as np


def _distances(a: np.ndarray, b: np.ndarray, rows: int = 512):
    """Euclidean distances from a to b, `rows` rows of a at a time (memory-bounded). Deterministic:
    equal inputs give bit-equal outputs, so identical sets produce exact ties."""
    bb = (b ** 2).sum(1)
    for i in range(0, len(a), rows):
        c = a[i:i + rows]
        yield np.sqrt(np.maximum((c ** 2).sum(1)[:, None] + bb[None, :] - 2 * c @ b.T, 0.0))


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict:
    """Precision, recall, density and coverage of `fake` against `real` with k-NN radii."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)

    def radii(a):  # distance to the k-th nearest neighbour (the point itself is the 0-th)
        return np.concatenate([np.partition(d, k, axis=1)[:, k] for d in _distances(a, a)])

    r_real, r_fake = radii(real), radii(fake)
    in_real, n_in_real = [], []                        # per fake point: inside any / how many real balls
    in_fake = np.zeros(len(real), bool)                # per real point: inside any fake ball
    nearest_fake = np.full(len(real), np.inf)          # per real point: distance to nearest fake point
    start = 0
    for d in _distances(fake, real):                   # (chunk of fake, N_real)
        inside = d < r_real[None, :]
        in_real.append(inside.any(1))
        n_in_real.append(inside.sum(1))
        in_fake |= (d < r_fake[start:start + len(d), None]).any(0)
        nearest_fake = np.minimum(nearest_fake, d.min(0))
        start += len(d)
    return {"precision": float(np.concatenate(in_real).mean()), "recall": float(in_fake.mean()),
            "density": float(np.concatenate(n_in_real).mean() / k),
            "coverage": float((nearest_fake < r_real).mean())}
