"""L_QC, its gradient, Hutchinson unbiasedness and Asym/NAsym, against brute-force ground truth."""
import itertools

import pytest
import torch

import qcsbm



@pytest.fixture(autouse=True)
def float64():
    """Gradients are compared in float64; restore the default for other test files."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def brute_force_qc(score_fn, x, v):
    """||J^T v||^2 - (J^T v).(J v) with J formed explicitly per sample, differentiable in theta."""
    out = []
    for b, (xb, vb) in enumerate(zip(x, v)):
        # Row b of the batch as a function of its own input (keeps each sample's own t).
        row = lambda y: score_fn(torch.cat([x[:b], y[None], x[b + 1:]]))[b].flatten()
        J = torch.autograd.functional.jacobian(row, xb, create_graph=True).reshape(xb.numel(), xb.numel())
        vb = vb.flatten()
        JTv, Jv = J.T @ vb, J @ vb
        out.append(JTv @ JTv - JTv @ Jv)
    return torch.stack(out)


def grads(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True)       # output biases do not enter J
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(gs, params)])


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def mlp_and_data(param="u"):
    torch.manual_seed(0)
    f, sde = qcsbm.MLP(dim=3, widths=(16, 16)), qcsbm.VESDE(0.1, 3.0)
    x, t = torch.randn(5, 3), torch.rand(5) * 0.9 + 0.05
    return f, sde, x, t, lambda y: qcsbm.score(f, y, t, sde, param)


def ncsnpp_and_data():
    torch.manual_seed(0)
    f, sde = qcsbm.NCSNpp(qcsbm.NCSNppConfig.tiny(image_size=8, channels=1)), qcsbm.VESDE()
    x, t = torch.rand(2, 1, 8, 8), torch.rand(2) * 0.9 + 0.05
    return f, sde, x, t, lambda y: qcsbm.score(f, y, t, sde, "u")


@pytest.mark.parametrize("make", [mlp_and_data, ncsnpp_and_data], ids=["mlp", "ncsnpp"])
def test_qc_loss_parameter_gradient_matches_brute_force(make):
    f, sde, x, t, score_fn = make()
    params = list(f.parameters())
    v = qcsbm.draw_probes(x, 1, "gaussian", torch.Generator().manual_seed(1))[0]
    ours = qcsbm.qc_loss(score_fn, x, v)
    ref = brute_force_qc(score_fn, x, v)
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-9)
    assert rel_err(grads(ours.sum(), params), grads(ref.sum(), params)) < 1e-6


@pytest.mark.parametrize("qc_fraction", [1.0, 0.4])
def test_gradient_inside_dsm_plus_lam_qc_matches_brute_force(qc_fraction):
    """The training loss's one backward equals the brute-force gradient of dsm + lam std^2 qc; with
    qc_fraction < 1, of the estimator it defines: L_QC on a random subset of rows, scaled by B / n."""
    f, sde, x0, _, _ = mlp_and_data()
    params, lam, K, B = list(f.parameters()), 0.3, 2, 5
    total, dsm, qc = qcsbm.training_loss(f, x0, sde, param="u", lam=lam, slices=K, probe="rademacher",
                                         generator=torch.Generator().manual_seed(3), qc_fraction=qc_fraction)
    ours = grads(total.mean(), params)
    # Replay the same random draws (same generator, same order) and build the reference explicitly.
    g = torch.Generator().manual_seed(3)
    t = sde.eps + (sde.T - sde.eps) * torch.rand(B, generator=g)
    z = torch.randn(x0.shape, generator=g)
    std = sde.std(t)
    x_t = x0 + std[:, None] * z
    rows = torch.randperm(B, generator=g)[:2] if qc_fraction < 1 else torch.arange(B)  # 0.4 * 5 = 2 rows
    v = qcsbm.draw_probes(x0[rows], K, "rademacher", g)
    score_fn = lambda y: qcsbm.score(f, y, t, sde, "u")
    ref_dsm = 0.5 * std ** 2 * ((score_fn(x_t) + z / std[:, None]) ** 2).sum(1)
    score_rows = lambda y: qcsbm.score(f, y, t[rows], sde, "u")
    ref_qc = torch.zeros(B).index_put((rows,), torch.stack([brute_force_qc(score_rows, x_t[rows], v[k])
                                                            for k in range(K)]).mean(0) * B / len(rows))
    assert torch.allclose(dsm, ref_dsm) and torch.allclose(qc, ref_qc)
    assert (qc != 0).sum() == len(rows)
    ref = grads((ref_dsm + lam * std ** 2 * ref_qc).mean(), params)
    assert rel_err(ours, ref) < 1e-6


def test_qc_fraction_is_unbiased_over_every_subset():
    """A rotation field s = c_i R x (R = [[0, 1], [-1, 0]] on two coordinates) has L_QC = 4 c_i^2 for
    every Rademacher probe, so each subset's estimate is known in closed form. c_i is read from a third,
    noise-free coordinate (the row's label), so it follows the row through the random permutation. Over
    all C(4, 2) subsets (drawn with equal probability), qc.mean() averages to the batch's L_QC."""
    B, c = 4, torch.tensor([0.5, 1.0, 2.0, 3.0])
    x0 = torch.cat([torch.randn(B, 2), torch.arange(B, dtype=torch.float64)[:, None]], 1)
    sde = qcsbm.VESDE(sigma_min=1e-6, sigma_max=1e-5)                    # the label survives the noise

    def f(x, std):                                                       # s_U = (x - f) / std = c R x
        rot = torch.stack([x[:, 1], -x[:, 0], torch.zeros_like(x[:, 0])], 1)
        return x - (std * c[x[:, 2].round().long()])[:, None] * rot

    full = qcsbm.training_loss(f, x0, sde, lam=1.0, generator=torch.Generator().manual_seed(0))[2]
    assert torch.allclose(full, 4 * c ** 2)
    seen = {}
    for seed in range(200):
        qc = qcsbm.training_loss(f, x0, sde, lam=1.0, qc_fraction=0.5, generator=torch.Generator().manual_seed(seed))[2]
        rows = tuple(qc.nonzero().flatten().tolist())
        expect = torch.zeros(B).index_put((torch.tensor(rows),), 4 * c[list(rows)] ** 2 * B / 2)
        assert len(rows) == 2 and torch.allclose(qc, expect), (rows, qc)
        seen[rows] = qc.mean()
    assert len(seen) == 6                                                # every subset came up
    assert torch.allclose(torch.stack(list(seen.values())).mean(), full.mean())
    assert not torch.allclose(torch.stack(list(seen.values())), full.mean().expand(6))  # a real average


def test_c_parameterization_trains_through_qc_loss():
    """C is conservative, so L_QC and its gradient vanish; the DSM gradient still flows."""
    f, sde, x0, t, score_fn = mlp_and_data("c")
    v = qcsbm.draw_probes(x0, 1, "gaussian")[0]
    qc = qcsbm.qc_loss(score_fn, x0, v)
    assert qc.abs().max() < 1e-10
    total, dsm, _ = qcsbm.training_loss(f, x0, sde, param="c")
    assert grads(total.mean(), list(f.parameters())).norm() > 0


def test_hutchinson_exact_in_2d_with_all_rademacher_probes():
    f, sde, x, t, _ = mlp_and_data()
    f2 = qcsbm.MLP(dim=2, widths=(16,))
    x = torch.randn(4, 2)
    score_fn = lambda y: qcsbm.score(f2, y, t[:4], sde, "u")
    probes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=2)))       # all four
    est = torch.stack([qcsbm.qc_loss(score_fn, x, p.expand_as(x)) for p in probes]).mean(0)
    J = qcsbm.jacobian(score_fn, x)
    exact = (J * J).sum((1, 2)) - (J * J.transpose(1, 2)).sum((1, 2))
    assert torch.allclose(est, exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_in_8d(dist):
    torch.manual_seed(0)
    A = torch.randn(8, 8)
    score_fn = lambda y: torch.tanh(y @ A.T) * 2.0 + y @ A             # a non-linear, non-conservative field
    x = torch.randn(1, 8)
    J = qcsbm.jacobian(score_fn, x)[0]
    exact = (J * J).sum() - (J * J.T).sum()
    n = 4000
    v = qcsbm.draw_probes(x, n, dist, torch.Generator().manual_seed(5))           # (n, 1, 8)
    samples = qcsbm.qc_loss(score_fn, x.expand(n, 8), v[:, 0])                     # one probe each
    mean, se = samples.mean(), samples.std() / n ** 0.5
    assert abs(mean - exact) < 4 * se


def test_asymmetry_linear_field_closed_form():
    torch.manual_seed(1)
    A = torch.randn(4, 4)
    x = torch.randn(6, 4)
    asym, nasym = qcsbm.asymmetry(lambda y: y @ A.T, x)                 # J = A everywhere
    ref_asym = 0.5 * ((A - A.T) ** 2).sum()
    ref_nasym = ((A - A.T) ** 2).sum() / (4 * (A ** 2).sum())
    assert torch.allclose(asym, ref_asym.expand(6)) and torch.allclose(nasym, ref_nasym.expand(6))
    est, nest = qcsbm.asymmetry(lambda y: y @ A.T, x[:1].expand(20000, 4), slices=1,
                                generator=torch.Generator().manual_seed(0))
    assert abs(est.mean() - ref_asym) < 4 * est.std() / 20000 ** 0.5
    est_k, nest_k = qcsbm.asymmetry(lambda y: y @ A.T, x, slices=4000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(nest_k, ref_nasym.expand(6), rtol=0.1)


def test_asymmetry_zero_for_gradient_fields():
    f, sde, x, t, score_c = mlp_and_data("c")
    asym, nasym = qcsbm.asymmetry(score_c, x)
    _, _, _, _, score_u = mlp_and_data("u")
    tr = qcsbm.jacobian(score_c, x).pow(2).sum((1, 2))
    assert (asym.abs() / tr).max() < 1e-12 and nasym.abs().max() < 1e-12
    energy_grad = lambda y: torch.cos(y).sum(1, keepdim=True) * y + 0.0 * y    # not a gradient field...
    grad_field = lambda y: -y * torch.exp(-(y ** 2).sum(1, keepdim=True))     # ...this one is
    a, _ = qcsbm.asymmetry(grad_field, x)
    assert a.abs().max() < 1e-12
    assert qcsbm.asymmetry(energy_grad, x)[0].min() > 1e-6
    assert qcsbm.asymmetry(score_u, x)[0].min() > 1e-6                   # U is not conservative


def test_bad_input_names_the_problem():
    f, sde, x, t, score_fn = mlp_and_data()
    with pytest.raises(ValueError, match="lam"):
        qcsbm.training_loss(f, x, sde, param="u", lam=-1.0)
    with pytest.raises(ValueError, match="slices"):
        qcsbm.training_loss(f, x, sde, param="u", lam=1.0, slices=0)
    with pytest.raises(ValueError, match="slices"):
        qcsbm.draw_probes(x, 0)
    with pytest.raises(ValueError, match="valid choices"):
        qcsbm.training_loss(f, x, sde, param="energy")
    with pytest.raises(ValueError, match="valid choices"):
        qcsbm.score(f, x, t, sde, "energy")
    with pytest.raises(ValueError, match="valid choices"):
        qcsbm.draw_probes(x, 1, "uniform")
    with pytest.raises(ValueError, match="probe vectors must be shaped \\(K, \\*x.shape\\)"):
        qcsbm.qc_loss(score_fn, x, torch.ones(5, 2))
    with pytest.raises(ValueError, match="weighting"):
        qcsbm.dsm_loss(lambda y, tt: y, x, sde, weighting="g2")


def test_probe_estimators_accept_score_functions_closing_over_per_sample_t():
    """K probes reuse one forward pass, so score_fn(x) may hold a (B,) t; the K-probe mean converges."""
    f, sde, x, t, score_fn = mlp_and_data()                          # score_fn closes over t of shape (5,)
    exact, nexact = qcsbm.asymmetry(score_fn, x)
    est, nest = qcsbm.asymmetry(score_fn, x, slices=3000, dist="gaussian", generator=torch.Generator().manual_seed(2))
    assert torch.allclose(est, exact, rtol=0.15) and torch.allclose(nest, nexact, rtol=0.15)
    v = qcsbm.draw_probes(x, 4, generator=torch.Generator().manual_seed(3))
    per_probe = torch.stack([brute_force_qc(score_fn, x, vk) for vk in v]).mean(0)
    assert torch.allclose(qcsbm.qc_loss(score_fn, x, v), per_probe)


def _bad_library_calls():
    f, sde, x, t, score_fn = mlp_and_data()
    vp = qcsbm.VPSDE()
    return {
        "lam=nan": (lambda: qcsbm.training_loss(f, x, sde, lam=float("nan")), "lam must be a number >= 0, got nan"),
        "slices=2.5": (lambda: qcsbm.training_loss(f, x, sde, lam=1.0, slices=2.5), "slices must be a whole number"),
        "probes=2.5": (lambda: qcsbm.draw_probes(x, 2.5), "slices must be a whole number"),
        "em steps=0": (lambda: qcsbm.euler_maruyama(lambda y, tt: y, x, sde, 0), "steps must be a whole number"),
        "pc steps=0": (lambda: qcsbm.pc_sampler(lambda y, tt: y, x, sde, 0), "steps must be a whole number"),
        "asym shape": (lambda: qcsbm.asymmetry(lambda y: y[:, :1], x), "shaped like its input"),
        "asym shape probes": (lambda: qcsbm.asymmetry(lambda y: y.sum(1, keepdim=True), x, slices=2),
                              "shaped like its input"),
        "VP at t=0": (lambda: qcsbm.score(f, x, torch.zeros(5), vp, "u"), "undefined where std\\(t\\) = 0"),
        "qc_fraction=0": (lambda: qcsbm.training_loss(f, x, sde, lam=1.0, qc_fraction=0.0), "qc_fraction must be in"),
        "qc_fraction=nan": (lambda: qcsbm.training_loss(f, x, sde, lam=1.0, qc_fraction=float("nan")),
                            "qc_fraction must be in"),
        "empty batch": (lambda: qcsbm.training_loss(f, x[:0], sde, lam=1.0), "x0 is an empty batch"),
        "empty asym": (lambda: qcsbm.asymmetry(score_fn, x[:0]), "x is an empty batch"),
    }


@pytest.mark.parametrize("case", list(_bad_library_calls()))
def test_library_refuses_values_that_would_give_nan_zero_or_hang(case):
    """Each of these gave NaN, a silent 0 or an UnboundLocalError before; now a ValueError naming it."""
    call, words = _bad_library_calls()[case]
    with pytest.raises(ValueError, match=words):
        call()
