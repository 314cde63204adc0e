"""autoencoder.py: when s(x) = R h(W^T x + b) + c is conservative, its exact L_QC, and the --quick pipeline.

References: the autograd Jacobian (qcsbm.jacobian), qcsbm.asymmetry, and the fact that the four Rademacher
probes of R^2 give Hutchinson's estimator without any sampling error."""
import csv
import itertools

import pytest
import torch

import autoencoder as ae
import qcsbm


def make(D, H, seed, R=None, beta=None):
    """A float64 model with random W, b, c (and R unless given)."""
    m = ae.AutoencoderScore(D, H, torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():
        if R is not None:
            m.R.copy_(R(m.W))
        if beta is not None:
            m.beta.fill_(beta)
        m.beta.add_(0.5 * torch.rand(H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return m


def points(D, n=256, seed=0):
    return (torch.rand(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1) * 5


def diag(H, seed):
    return torch.diag(torch.rand(H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4 - 2)


def sym(H, seed):
    A = torch.randn(H, H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return A + A.T


@pytest.mark.parametrize("D,H", [(2, 2), (3, 5)])
def test_untied_but_per_unit_parallel_weights_are_conservative(D, H):
    """R = W Lambda (Lambda diagonal, R != W): J = W Lambda diag(h') W^T is symmetric at every x."""
    m = make(D, H, seed=1, R=lambda W: W @ diag(H, 2))
    assert (m.R - m.W).norm() > 0.5                                     # genuinely untied
    R, W = m.R.detach(), m.W.detach()
    assert torch.allclose(R @ W.T, W @ R.T, atol=1e-12)
    asym, nasym = qcsbm.asymmetry(m, points(D))
    assert asym.abs().max() < 1e-12 and nasym.abs().max() < 1e-12
    untied = make(D, H, seed=1)                                         # a random R instead
    asym, nasym = qcsbm.asymmetry(untied, points(D))
    assert asym.mean() > 1e-3 and nasym.mean() > 1e-3


def test_symmetric_R_W_T_is_not_enough_with_a_nonlinear_h():
    """R = W S with S symmetric but not diagonal: R W^T = W S W^T is symmetric, yet J = W S diag(h') W^T is
    not, because S does not commute with diag(h'(a)). With a linear h (beta = 0: h(a) = a / 2) it is."""
    m = make(2, 2, seed=3, R=lambda W: W @ sym(2, 4))
    R, W = m.R.detach(), m.W.detach()
    assert torch.allclose(R @ W.T, W @ R.T, atol=1e-12)
    assert qcsbm.asymmetry(m, points(2))[1].mean() > 1e-3
    with torch.no_grad():
        m.beta.zero_()
    assert qcsbm.asymmetry(m, points(2))[0].abs().max() < 1e-12


@pytest.mark.parametrize("D,H", [(2, 2), (4, 3)])
def test_closed_form_jacobian_matches_autograd(D, H):
    m, x = make(D, H, seed=5), points(D)
    assert torch.allclose(m.jacobian(x), qcsbm.jacobian(m, x), atol=1e-12)


def test_exact_lqc_equals_hutchinson_over_all_four_rademacher_probes():
    """In R^2 the four probes {+-1}^2 average v v^T to I exactly, so Hutchinson has no sampling error."""
    m, x = make(2, 2, seed=6), points(2)
    v = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=2)), dtype=torch.float64)   # (4, 2)
    v = v[:, None, :].expand(4, x.shape[0], 2)                                               # (4, B, 2)
    exact = ae.exact_lqc(m.jacobian(x))
    assert exact.mean() > 1e-3
    assert torch.allclose(qcsbm.qc_loss(m, x, v), exact, rtol=1e-10, atol=1e-12)
    assert torch.allclose(qcsbm.asymmetry(m, x)[0], exact, rtol=1e-10, atol=1e-12)
    one = qcsbm.qc_loss(m, x, v[:1])                                    # a single probe is only unbiased
    assert not torch.allclose(one, exact, rtol=1e-3)


def test_exact_lqc_gradient_matches_hutchinson_gradient():
    """The training signal too: d/dtheta of the exact L_QC equals that of the four-probe estimate."""
    m, x = make(2, 2, seed=7), points(2, n=64)
    v = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=2)), dtype=torch.float64)
    g1 = torch.autograd.grad(ae.exact_lqc(m.jacobian(x)).mean(), [m.R, m.W, m.b, m.beta])
    g2 = torch.autograd.grad(qcsbm.qc_loss(m, x, v[:, None].expand(4, 64, 2)).mean(), [m.R, m.W, m.b, m.beta])
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def read(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_quick_run_writes_csv_and_png_and_learns_conservativeness(tmp_path):
    out = tmp_path / "ae"
    res = ae.main(["--quick", f"--out_dir={out}"])
    rows = read(out / "autoencoder.csv")
    assert list(rows[0]) == ["step", "lqc", "asym_weights", "weight_gap"]
    assert [int(r["step"]) for r in rows] == list(range(0, 301, 50))
    lqc = [float(r["lqc"]) for r in rows]
    assert all(b < a for a, b in zip(lqc, lqc[1:])) and lqc[-1] < 0.8 * lqc[0]
    assert float(rows[-1]["asym_weights"]) < float(rows[0]["asym_weights"])
    assert float(rows[-1]["weight_gap"]) > 0.1                        # R and W stay apart
    assert (out / "autoencoder.png").stat().st_size > 10_000 and (out / "model.pt").exists()
    assert res["rows"][-1]["lqc"] == pytest.approx(lqc[-1])


def test_hutchinson_variant_in_16_dimensions(tmp_path):
    res = ae.main(["--preset=wide", "--quick", "--steps=100", f"--out_dir={tmp_path}"])
    first, last = res["rows"][0], res["rows"][-1]
    assert last["asym_weights"] < 0.5 * first["asym_weights"]
    assert last["weight_gap"] > 0.5 * first["weight_gap"]


def test_data_variant_reports_asym_nasym(tmp_path):
    pytest.importorskip("toy")
    res = ae.main(["--preset=checkerboard", "--quick", "--steps=100", f"--out_dir={tmp_path}"])
    assert list(read(tmp_path / "autoencoder.csv")[0]) == ["step", "lqc", "asym_weights", "weight_gap", "dsm"]
    assert 0 <= res["nasym"] < 0.1 and res["asym"] >= 0
    assert res["dsm"] < res["rows"][0]["dsm"]                          # it does fit the data


@pytest.mark.parametrize("argv,needle", [(["--lrr=1"], "valid keys: .*--preset"), (["--preset=big"], "paper"),
                                         (["--estimator=mc"], "hutchinson"), (["quick"], "--key=value"),
                                         (["--data=circles"], "checkerboard|toy.py"), (["--steps=x"], "int")])
def test_bad_input_is_a_clear_error(argv, needle):
    with pytest.raises(ValueError, match=needle):
        ae.parse(argv)
