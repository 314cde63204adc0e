"""SDEs, DSM, samplers and the likelihood against closed-form Gaussians and exact mixture scores."""
import math
import time

import pytest
import torch

import qcsbm


def mixture_score(x, t, sde, means, stds, weights):
    """Exact score of sum_k w_k N(mu_k, (s_k^2 + std(t)^2) I) (the VE-perturbed mixture)."""
    var = stds[None, :] ** 2 + sde.std(t)[:, None] ** 2                       # (B, K)
    diff = x[:, None, :] - means[None]                                         # (B, K, D)
    logp = torch.log(weights)[None] - 0.5 * (diff ** 2).sum(-1) / var - x.shape[1] / 2 * torch.log(var)
    r = torch.softmax(logp, dim=1)                                             # responsibilities
    return -(r[..., None] * diff / var[..., None]).sum(1)


MEANS = torch.tensor([[-2.0, -1.0], [2.0, 1.0]])
STDS = torch.tensor([0.3, 0.3])
WEIGHTS = torch.tensor([0.3, 0.7])


def mixture_moments():
    mean = (WEIGHTS[:, None] * MEANS).sum(0)
    second = sum(w * (torch.outer(m, m) + s ** 2 * torch.eye(2)) for w, m, s in zip(WEIGHTS, MEANS, STDS))
    return mean, second - torch.outer(mean, mean)


@pytest.mark.parametrize("sde", [qcsbm.VESDE(0.01, 5.0), qcsbm.VPSDE(0.1, 20.0), qcsbm.SubVPSDE(0.1, 20.0)],
                         ids=["ve", "vp", "subvp"])
def test_marginals_match_simulated_forward_sde(sde):
    g = torch.Generator().manual_seed(0)
    n, steps, x0 = 20000, 500, 1.5
    x = torch.full((n, 1), x0, dtype=torch.float64)
    if isinstance(sde, qcsbm.VESDE):                      # data carries sigma_min noise at t = 0
        x = x + sde.sigma_min * torch.randn(x.shape, generator=g, dtype=torch.float64)
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((n,), i * dt, dtype=torch.float64)
        drift, diff = sde.drift_diffusion(x, t)
        x = x + drift * dt + diff * math.sqrt(dt) * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if i + 1 in (steps // 2, steps):
            tt = torch.tensor([(i + 1) * dt], dtype=torch.float64)
            mean, std = sde.marginal(torch.tensor([[x0]], dtype=torch.float64), tt)
            assert abs(x.mean() - mean.item()) < 0.03 * max(1.0, std.item())
            assert abs(x.std() / std.item() - 1) < 0.03


def test_dsm_at_exact_score_of_gaussian_data_equals_closed_form():
    """x0 ~ N(0, s0^2 I_D); at fixed t the exact score is -x / v, v = s0^2 + std^2, and
    E ||s(x_t) + z / std||^2 = D s0^2 / (std^2 v), so sigma^2-weighted DSM = D s0^2 / (2 v)."""
    g = torch.Generator().manual_seed(0)
    sde, D, s0, n = qcsbm.VESDE(0.01, 50.0), 4, 0.7, 200000
    x0 = s0 * torch.randn(n, D, generator=g, dtype=torch.float64)
    t = torch.full((n,), 0.3, dtype=torch.float64)
    std = sde.std(t[:1]).item()
    v = s0 ** 2 + std ** 2
    exact = lambda x, tt: -x / v
    for weighting, w in [("sigma2", std ** 2), ("likelihood", sde.drift_diffusion(x0[:1], t[:1])[1].item() ** 2)]:
        loss = qcsbm.dsm_loss(exact, x0, sde, weighting=weighting, t=t, generator=g)
        closed = 0.5 * w * D * s0 ** 2 / (std ** 2 * v)
        assert abs(loss.mean() - closed) < 4 * loss.std() / n ** 0.5


@pytest.mark.parametrize("name", ["pc", "em", "ode"])
def test_samplers_reproduce_mixture_moments(name):
    sde = qcsbm.VESDE(0.01, 20.0)       # sigma_max >> the data extent, so the prior matches p_T
    score_fn = lambda x, t: mixture_score(x, t, sde, MEANS.double(), STDS.double(), WEIGHTS.double())
    g = torch.Generator().manual_seed(1)
    n = 2000
    x = sde.prior_sample((n, 2), generator=g, dtype=torch.float64)
    seen = []
    steps = {"pc": 500, "em": 500, "ode": 20}[name]
    kwargs = {"rtol": 1e-4, "atol": 1e-4} if name == "ode" else {}
    out, nfe = qcsbm.SAMPLERS[name](score_fn, x, sde, steps, generator=g,
                                    callback=lambda i, t, xi: seen.append(i), **kwargs)
    mean, cov = mixture_moments()
    assert (out.mean(0) - mean.double()).abs().max() < 0.12
    assert (torch.cov(out.T) - cov.double()).abs().max() < 0.2
    assert len(seen) == steps and nfe >= steps
    if name == "ode":  # a deterministic map: the weights of the two modes must come out right too
        assert abs((out[:, 0] > 0).double().mean() - 0.7) < 0.04


def test_langevin_noise_free_ascends_log_density():
    score_fn = lambda x, t: -x / 0.5
    x0 = torch.full((3, 2), 2.0)
    x, n = qcsbm.langevin(score_fn, x0, qcsbm.VESDE(), 50, step_size=lambda i: 0.05, noise=False)
    assert n == 50 and torch.allclose(x, x0 * 0.9 ** 50)


def test_bits_per_dim_of_gaussian_matches_closed_form():
    """Gaussian data with its exact score: ODE likelihood vs the closed-form density at eps."""
    sde, D, s0 = qcsbm.VESDE(0.01, 20.0), 4, 1.0
    g = torch.Generator().manual_seed(0)
    x = s0 * torch.randn(8, D, generator=g, dtype=torch.float64)
    score_fn = lambda y, t: -y / (s0 ** 2 + sde.std(t)[:, None] ** 2)
    bpd, nfe = qcsbm.bits_per_dim(score_fn, x, sde, n_bins=None, generator=g)
    var = s0 ** 2 + sde.std(torch.tensor(sde.eps)).item() ** 2
    logp = -0.5 * D * math.log(2 * math.pi * var) - (x ** 2).sum(1) / (2 * var)
    closed = -logp / (D * math.log(2))
    assert ((bpd - closed).abs() / closed.abs()).max() < 0.01
    assert nfe > 10
    # Discrete data: dequantization adds log2(n_bins) and stays finite.
    xd = torch.randint(0, 256, (2, 1, 2, 2), generator=g).double() / 255
    bpd_d, _ = qcsbm.bits_per_dim(lambda y, t: -(y - 0.5) / (0.1 + sde.std(t)[:, None, None, None] ** 2),
                                  xd, sde, rtol=1e-4, atol=1e-4, generator=g)
    assert torch.isfinite(bpd_d).all()


def test_per_sample_generators_make_samples_batch_independent():
    sde = qcsbm.VESDE(0.01, 10.0)
    score_fn = lambda x, t: mixture_score(x, t, sde, MEANS, STDS, WEIGHTS)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    x_all = sde.prior_sample((4, 2), generator=gens(range(4)))
    out_all, _ = qcsbm.pc_sampler(score_fn, x_all, sde, 20, generator=gens(range(10, 14)))
    x_two = sde.prior_sample((2, 2), generator=gens(range(2, 4)))
    out_two, _ = qcsbm.pc_sampler(score_fn, x_two, sde, 20, generator=gens(range(12, 14)))
    assert torch.allclose(out_all[2:], out_two, atol=1e-5)


def test_sampler_progress_in_a_log_is_a_few_lines_not_every_step(capsys):
    """progress=True where stderr is not a terminal (here: pytest's capture): a start and an end state,
    not one redraw per step."""
    sde = qcsbm.VESDE(0.01, 5.0)
    def slow_score(x, t):                    # 1.2 s in all: a plain bar would redraw ~12 times
        time.sleep(0.002)
        return -x
    qcsbm.pc_sampler(slow_score, sde.prior_sample((4, 2)), sde, 300, progress=True)
    err = capsys.readouterr().err
    assert "PC sampler" in err and "300/300" in err and err.count("PC sampler") <= 3
