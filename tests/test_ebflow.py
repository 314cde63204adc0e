"""ebflow.py: the hand-written score against autograd, the exact likelihood against a grid integral, sampling,
the sliced score-matching loss, the blurred score, --quick end to end, bad input."""
import csv
import math

import numpy as np
import pytest
import torch

import ebflow
import toy


def random_flow(layers=3, dim=2, seed=0):
    """A float64 flow whose elementwise functions have visible steps (not the near-linear initialization)."""
    torch.manual_seed(seed)
    flow = ebflow.EBFlow(dim, layers, bumps=4).double()
    with torch.no_grad():
        for sig in flow.sig:
            sig.a.normal_(0.0, 0.5)
            sig.b.normal_(0.5, 0.5)
            sig.r.normal_(0.0, 0.3)
        flow.W[0].mul_(1 / 0.3 / 2)                      # data scale ~2: the grid below holds all the mass
    return flow


def test_score_is_minus_autograd_of_energy():
    flow = random_flow(dim=3)
    x = torch.randn(64, 3, dtype=torch.float64, requires_grad=True)
    energy, s = flow.energy_and_score(x)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    torch.testing.assert_close(s, -grad, rtol=1e-12, atol=1e-12)
    # ... and its Jacobian is symmetric (a gradient field): Asym is round-off
    J = torch.autograd.functional.jacobian(lambda y: flow.score(y[None])[0], x[0].detach())
    torch.testing.assert_close(J, J.T, rtol=1e-12, atol=1e-12)


def test_sigma_derivatives_and_inverse():
    sig = random_flow().sig[0]
    h = torch.linspace(-5, 5, 101, dtype=torch.float64)[:, None].repeat(1, 2).requires_grad_()
    y, d1, d2 = sig(h)
    (g1,) = torch.autograd.grad(y.sum(), h, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), h)
    torch.testing.assert_close(d1, g1)
    torch.testing.assert_close(d2, g2)
    assert (d1 > 0).all()
    torch.testing.assert_close(sig.inverse(y.detach()), h.detach(), rtol=1e-10, atol=1e-10)


def test_exact_likelihood_matches_grid_integral():
    """exp(-E) integrated on a fine grid gives Z = (2 pi)^(D/2) / prod |det W_l|; p = exp(-E - log Z) integrates to 1."""
    flow = random_flow()
    pts, cell = ebflow.grid(12.0, 800)
    with torch.no_grad():
        energy = torch.cat([flow.energy_and_score(p)[0] for p in pts.split(65536)])
        log_p = torch.cat([flow.log_prob(p) for p in pts.split(65536)])
    log_z_grid = torch.logsumexp(-energy, 0) + math.log(cell)
    assert abs(float(log_z_grid - flow.log_z().detach())) < 1e-4
    assert abs(float(log_p.exp().sum() * cell) - 1) < 1e-4
    assert float(log_p.exp()[(pts.abs() > 11).any(1)].sum() * cell) < 1e-6       # nothing left near the border


def test_samples_follow_the_density():
    """Mean log p over exact samples estimates -entropy, which the grid also gives as sum p log p."""
    flow = random_flow()
    pts, cell = ebflow.grid(12.0, 600)
    with torch.no_grad():
        log_p = flow.log_prob(pts)
        x = flow.sample(20000, torch.Generator().manual_seed(0))
        lp = flow.log_prob(x)
    neg_entropy = float((log_p.exp() * log_p).sum() * cell)
    assert abs(float(lp.mean()) - neg_entropy) < 4 * float(lp.std()) / math.sqrt(len(lp))


def test_ssm_loss_estimates_exact_score_matching():
    """E_v[v^T J v] = tr J for Rademacher v: the SSM loss averages to tr(ds/dx) + 0.5 ||s||^2 (Hyvarinen)."""
    flow = random_flow()
    x = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda y: flow.score(y[None])[0], x[0])
    exact = float(torch.trace(J) + 0.5 * flow.score(x).detach().pow(2).sum())
    torch.manual_seed(0)
    loss = ebflow.loss_fn(flow, x.repeat(4000, 1), "ssm").detach()
    assert abs(float(loss.mean()) - exact) < 4 * float(loss.std()) / math.sqrt(len(loss)) + 1e-12


def test_blurred_score_with_uniform_weights_is_the_oracle():
    rng = np.random.default_rng(0)
    ref = torch.from_numpy(toy.checkerboard(300, rng)).double()
    x = torch.randn(40, 2, dtype=torch.float64) * 3
    log_w = torch.full((len(ref),), -math.log(len(ref)), dtype=torch.float64)
    for std in (0.3, 2.0):
        torch.testing.assert_close(ebflow.blurred_score(x, ref, log_w, std, chunk=7), toy.oracle_score(x, ref, std))


def test_quick_end_to_end(tmp_path):
    toy_csv = tmp_path / "toy.csv"                   # toy.py's rows appear in the table when their file is given
    toy.write_csv(str(toy_csv), [dict(dataset="checkerboard", model=m, seed=0, nll=4.0, nfe=100, score_error=0.1,
                                      asym=0.0, nasym=0.0, precision=0.9, recall=0.9, train_seconds=1.0)
                                 for m in ("C", "U", "QC")])
    ebflow.main(["--quick", f"--out_dir={tmp_path}", "--datasets=checkerboard", f"--toy_csv={toy_csv}", "--widths=4,8"])
    rows = list(csv.DictReader(open(tmp_path / "density.csv")))
    assert [r["model"] for r in rows] == ["EBFlow"] and rows[0]["dataset"] == "checkerboard"
    r = {k: float(v) for k, v in rows[0].items() if k not in ("dataset", "model")}
    assert math.isfinite(r["nll"]) and r["score_error"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert abs(r["asym"]) < 1e-10 and abs(r["nasym"]) < 1e-10                     # exactly conservative
    assert 0.9 < r["grid_mass"] < 1.0001
    table = (tmp_path / "density_table.md").read_text()
    assert all(f"| checkerboard | {m} |" in table for m in ("C", "U", "QC", "EBFlow"))
    speed = list(csv.DictReader(open(tmp_path / "speed.csv")))
    assert {(int(s["D"]), s["objective"]) for s in speed} == {(D, o) for D in (4, 8) for o in ("dsm", "ssm", "ml")}
    assert all(float(s["seconds"]) > 0 for s in speed)
    for name in ("ebflow_density.png", "ebflow_speed.png", "speed_table.md"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("argv, words", [
    (["--objective=nce"], ["nce", "dsm", "ssm", "ml"]),
    (["--datasets=swissroll"], ["swissroll", "checkerboard"]),
    (["--widths=3"], ["widths", "even"]),
    (["--layers=0"], ["layers", "positive"]),
])
def test_bad_input_names_valid_choices(argv, words, tmp_path):
    with pytest.raises(ValueError) as e:
        ebflow.main(argv + [f"--out_dir={tmp_path}"])
    assert all(w in str(e.value) for w in words), str(e.value)
