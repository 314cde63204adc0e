"""Quasi-Conservative Score-Based Models (Chao et al., ICML 2023) in one readable file.

A score model s(x, t) estimates grad_x log p_t(x). It is *conservative* when it is the gradient of a
scalar, i.e. when its Jacobian J = ds/dx is symmetric. Constrained models (C) are conservative by
construction but need an extra backward pass; unconstrained models (U) are flexible but not
conservative. QC models are U models trained with a regularizer L_QC that penalizes the asymmetry
of J, estimated cheaply with random projections (Hutchinson's trick).

Sections, in reading order (equation numbers are the paper's):
  1. SDEs: VE, VP, sub-VP (Song et al. 2021), marginals, drift, diffusion, prior.
  2. Score parameterizations U and C (Eq. 10).
  3. Denoising score matching (Eq. 2).
  4. Conservativeness: Jacobian traces shared by L_QC (Eq. 9) and Asym / NAsym (Eqs. 6-7).
  5. Training loss L_total = L_SM + lam * L_QC, one forward pass, one backward by the caller.
  6. Samplers: Langevin (Eq. 3), predictor-corrector, Euler-Maruyama (Eq. 4), probability flow ODE.
  7. Likelihood in bits/dim through the probability flow ODE.
  8. Networks: NCSN++ for images (score_sde's, exactly), a small MLP for 2-D points. EMA of parameters.

Glossary: x0 clean data, x_t = mean(x0, t) + std(t) * z noisy data, z ~ N(0, I), t in [eps, T],
f(x, std) the network (same shape as x), s the score, J = ds/dx, v a probe vector with E[v v^T] = I,
K = `slices` probes per sample, lam the weight of L_QC, D the data dimension.

Usage:
    sde = VESDE(sigma_min=0.01, sigma_max=50.0)
    f = NCSNpp(NCSNppConfig.tiny(image_size=32))
    total, dsm, qc = training_loss(f, x0, sde, param="u", lam=1e-4, slices=1)
    total.mean().backward()                                          # the one backward of the step
    x, nfe = pc_sampler(lambda x, t: score(f, x, t, sde, "u"), sde.prior_sample((16, 3, 32, 32)), sde, 1000)
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import integrate
from tqdm import tqdm

Generator = Optional[torch.Generator | Sequence[torch.Generator]]


def bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample scalar c of shape (B,) to (B, 1, ..., 1) so it broadcasts against x.

    This one helper lets 2-D points (B, D) and images (B, C, H, W) share every code path below."""
    return c.reshape(-1, *([1] * (x.dim() - 1)))


def randn_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """N(0, I) noise shaped like x. `generator` may be one torch.Generator or one per sample: with one
    per sample, each sample's noise depends only on its own seed, not on the batch it is in."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one per sample")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                        for g in generator])


def flat_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the batch: (B, ...) -> (B,)."""
    return x.flatten(1).sum(1)


def check_count(name: str, value, minimum: int = 1) -> int:
    """`value` if it is a whole number >= minimum, else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def check_batch(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}): every loss and estimate here "
                         f"is a mean over samples, so it would be NaN")
    return x


# ---- 1. SDEs ----
# The forward SDE dx = drift(x, t) dt + g(t) dw turns data into noise for t from 0 to T = 1. Its
# Gaussian perturbation kernel gives x_t = mean(t) * x0 + std(t) * z. Training and all samplers need
# only: marginal std and mean, drift and diffusion g, the prior at T, and the smallest time `eps`.
# (Song et al. write the drift f; here f is the network, as in the QCSBM paper's Eq. 10.)

class SDE:
    T = 1.0
    eps = 1e-5  # smallest time used in training and sampling; avoids std(0) problems

    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def marginal(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (shaped like x0) and std (B,) of p_t(x_t | x0)."""
        return bcast(self.mean_coeff(t), x0) * x0, self.std(t)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I), per sample."""
        D = z[0].numel()
        s = self.prior_std
        return -0.5 * D * math.log(2 * math.pi * s * s) - flat_sum(z ** 2) / (2 * s * s)

    def prior_sample(self, shape, generator: Generator = None, device=None, dtype=torch.float32):
        return self.prior_std * randn_like(torch.empty(shape, device=device, dtype=dtype), generator)

    def discretize(self, x: torch.Tensor, t: torch.Tensor, dt: float):
        """(shift, G) of one forward step of size dt ending at t: x_t = x_{t-dt} + shift + G z (Euler here)."""
        drift, g = self.drift_diffusion(x, t)
        return drift * dt, g * math.sqrt(dt)


class VESDE(SDE):
    """Variance exploding: std(t) = sigma_min (sigma_max / sigma_min)^t, no drift.

    We take the data at t = 0 to carry sigma_min noise already (as Song et al. do), so std(t) is
    exactly sigma(t) and the SDE dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw adds the rest."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.prior_std = sigma_max

    def std(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift_diffusion(self, x, t):
        g = self.std(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        return torch.zeros_like(x), bcast(g, x)

    def discretize(self, x, t, dt):
        # Exact variance increment sigma(t)^2 - sigma(t - dt)^2; the final step goes to sigma = 0.
        prev = torch.where(t - dt > 1e-8, self.std(t - dt), torch.zeros_like(t))
        return torch.zeros_like(x), bcast((self.std(t) ** 2 - prev ** 2).sqrt(), x)


class VPSDE(SDE):
    """Variance preserving: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw, beta linear in t."""
    prior_std = 1.0

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"{type(self).__name__} needs 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t):  # -1/2 * integral_0^t beta(s) ds
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def mean_coeff(self, t):
        return self.log_mean_coeff(t).exp()

    def std(self, t):
        return (-torch.expm1(2 * self.log_mean_coeff(t))).sqrt()

    def drift_diffusion(self, x, t):
        beta = bcast(self.beta(t), x)
        return -0.5 * beta * x, beta.sqrt()


class SubVPSDE(VPSDE):
    """sub-VP: VP drift, diffusion scaled by (1 - e^{-2 int beta}); std(t) = 1 - mean(t)^2."""

    def std(self, t):
        return -torch.expm1(2 * self.log_mean_coeff(t))

    def drift_diffusion(self, x, t):
        drift, _ = super().drift_diffusion(x, t)
        g2 = self.beta(t) * -torch.expm1(4 * self.log_mean_coeff(t))       # 1 - e^{-2 int beta}
        return drift, bcast(g2.sqrt(), x)


# ---- 2. Score parameterizations (Eq. 10) ----
# Both use the same network f(x, std) with the shape of x, hence the same parameter count:
#   U:  s_U = (x - f) / std                                   (any vector field)
#   C:  s_C = d/dx [ -||x - f||^2 / (2 std) ]                 (a gradient field: exactly conservative)
# QC is U trained with L_QC (section 5). Our networks compute f = x - h(x, std), so s_U = h / std is
# exactly NCSN++'s own output scaling, and s_C = -J_h^T h / std.

PARAMS = ("u", "c", "qc")


def score(f: Callable, x: torch.Tensor, t: torch.Tensor, sde: SDE, param: str) -> torch.Tensor:
    """Eq. 10: the score s(x, t) of network f under parameterization 'u', 'c' or 'qc' (= 'u')."""
    std = sde.std(t)
    if std.device.type == "cpu" and not (std > 0).all():   # (on a GPU this check would stall every step)
        raise ValueError(f"the score is undefined where std(t) = 0 (t = 0 under {type(sde).__name__}): "
                         f"use t >= sde.eps = {sde.eps}")
    match param:
        case "u" | "qc":
            return (x - f(x, std)) / bcast(std, x)
        case "c":
            # Keep the graph of the x-gradient whenever the caller may differentiate s again (training,
            # Jacobians); under torch.no_grad (sampling) the extra backward pass is all we pay.
            create_graph = torch.is_grad_enabled()
            with torch.enable_grad():
                x_ = x if x.requires_grad else x.detach().requires_grad_()
                energy = -flat_sum((x_ - f(x_, std)) ** 2) / (2 * std)
                (s,) = torch.autograd.grad(energy.sum(), x_, create_graph=create_graph)
            return s
    raise ValueError(f"unknown score parameterization {param!r}; valid choices: {PARAMS}")


# ---- 3. Denoising score matching (Eq. 2) ----
# The score of the perturbation kernel p(x_t | x0) is -(x_t - mean) / std^2 = -z / std, so regressing s
# on it is an unbiased proxy for explicit score matching. Weighting by std^2 makes every noise level
# contribute equally; weighting by g^2 gives a bound on the likelihood (Song et al. 2021).

WEIGHTINGS = ("sigma2", "likelihood")


def dsm_from_score(s: torch.Tensor, z: torch.Tensor, std: torch.Tensor, g: torch.Tensor,
                   weighting: str) -> torch.Tensor:
    """Eq. 2 per sample: w(t) * 0.5 * ||s + z / std||^2 with w = std^2 or g^2."""
    match weighting:
        case "sigma2":
            w = std ** 2
        case "likelihood":
            w = g ** 2
        case _:
            raise ValueError(f"unknown weighting {weighting!r}; valid choices: {WEIGHTINGS}")
    return w * 0.5 * flat_sum((s + z / bcast(std, z)) ** 2)


def perturb(x0: torch.Tensor, sde: SDE, t: torch.Tensor | None = None, generator: Generator = None):
    """Draw t ~ U(eps, T) (unless given) and z ~ N(0, I); return x_t = mean + std z, t, z, std and g(t)."""
    check_batch(x0, "x0")
    if t is None:
        t = sde.eps + (sde.T - sde.eps) * torch.rand(x0.shape[0], generator=_one(generator),
                                                   device=x0.device, dtype=x0.dtype)
    z = randn_like(x0, generator)
    mean, std = sde.marginal(x0, t)
    x_t = mean + bcast(std, x0) * z
    return x_t, t, z, std, sde.drift_diffusion(x_t, t)[1].flatten(1)[:, 0]


def dsm_loss(score_fn: Callable, x0: torch.Tensor, sde: SDE, weighting: str = "sigma2",
             t: torch.Tensor | None = None, generator: Generator = None) -> torch.Tensor:
    """Eq. 2: per-sample denoising score matching loss, t ~ U(eps, T) unless given. Never backward()."""
    x_t, t, z, std, g = perturb(x0, sde, t, generator)
    return dsm_from_score(score_fn(x_t, t), z, std, g, weighting)


def _one(generator: Generator):
    return generator if generator is None or isinstance(generator, torch.Generator) else generator[0]


# ---- 4. Conservativeness: Jacobian traces (Eqs. 5-9) ----
# s is conservative iff J = ds/dx is symmetric. With ||A||_F^2 = tr(A A^T),
#   0.5 ||J - J^T||_F^2 = 0.5 (tr(J J^T) - 2 tr(J J) + tr(J^T J)) = tr(J J^T) - tr(J J).
# Asym is its expectation (the factor 0.5 is the one the authors' published numbers use), NAsym divides
# by 2 tr(J J^T) = 2 ||J||_F^2, which puts it in [0, 1]. L_QC (Eq. 9) is Asym used as a loss.
# For images J is D x D with D = 3072, far too large to form. Hutchinson: for E[v v^T] = I,
#   tr(J J^T) = E ||J^T v||^2   and   tr(J J) = E v^T J J v = E (J^T v) . (J v) = E v . J^T (J^T v):
# with u = J^T v, two vector-Jacobian products (VJPs) per probe v give both; no Jacobian is formed.
# One function, `hutchinson_traces`, computes them for L_QC, for Asym / NAsym and inside the training
# loss; all K probes of a sample go through the one forward graph of s.

PROBES = ("rademacher", "gaussian")


def draw_probes(x: torch.Tensor, slices: int, dist: str = "rademacher",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """K = `slices` probe vectors per sample with E[v v^T] = I: (K, *x.shape)."""
    shape = (check_count("slices", slices), *x.shape)
    match dist:
        case "rademacher":
            return torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
        case "gaussian":
            return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    raise ValueError(f"unknown probe distribution {dist!r}; valid choices: {PROBES}")


def hutchinson_traces(s: torch.Tensor, x: torch.Tensor, v: torch.Tensor,
                      create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample estimates of (tr(J J^T), tr(J J)), J = ds/dx, averaged over the K probes v[k]:
    ||J^T v||^2 and (J^T v).(J v) = v . (J^T J^T v).

    `s` must have been computed from `x` (which requires grad) with its graph; v is (K, *x.shape). Per
    probe, two VJPs through that one forward graph, u = J^T v and r = J^T u, the second fed u itself
    (not a detached copy): no JVP is needed. With create_graph=True the estimates are ordinary
    differentiable tensors, and one backward() of any loss built from them gives the exact parameter
    gradient; that backward needs only second derivatives of the network's ops. (Why this form, and
    what else was measured: BENCHMARKS.md, "What the library computes".)"""
    if s.shape != x.shape:
        raise ValueError(f"the score function must return a tensor shaped like its input {tuple(x.shape)}, "
                         f"got {tuple(s.shape)}: J = ds/dx is only square then")
    if v.shape[1:] != x.shape:
        raise ValueError(f"probe vectors must be shaped (K, *x.shape) = (K, {', '.join(map(str, x.shape))}); "
                         f"got {tuple(v.shape)}")
    tr_JJt = tr_JJ = 0.0
    for vk in v:
        with input_grads_only():                 # (fast_conv: the VJPs need no weight gradients)
            (u,) = torch.autograd.grad(s, x, vk, create_graph=create_graph, retain_graph=True)  # J^T v
            (r,) = torch.autograd.grad(s, x, u, create_graph=create_graph, retain_graph=True)   # J^T J^T v
        tr_JJt, tr_JJ = tr_JJt + flat_sum(u * u), tr_JJ + flat_sum(vk * r)
    return tr_JJt / len(v), tr_JJ / len(v)


def qc_loss(score_fn: Callable, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eq. 9: per-sample Hutchinson estimate of L_QC, ||J^T v||^2 - (J^T v).(J v), J = d score_fn(x)/dx.

    v is shaped like x (one probe) or (K, *x.shape) (K probes, averaged; all K reuse one forward pass,
    so score_fn may close over per-sample inputs such as t). Differentiable: the caller's single
    backward() gives the exact parameter gradient of this estimator."""
    v = v.unsqueeze(0) if v.shape == x.shape else v
    x = check_batch(x).detach().requires_grad_()
    with torch.enable_grad():
        tr_JJt, tr_JJ = hutchinson_traces(score_fn(x), x, v)
    return tr_JJt - tr_JJ


def jacobian(score_fn: Callable, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """The exact per-sample Jacobian J[b, i, j] = d s_i / d x_j, (B, D, D), from D VJPs.

    Assumes samples do not interact inside score_fn (true for our networks: GroupNorm, no BatchNorm)."""
    with torch.enable_grad():
        x = check_batch(x).detach().requires_grad_()
        s = score_fn(x)
        if s.shape != x.shape:
            raise ValueError(f"the score function must return a tensor shaped like its input "
                             f"{tuple(x.shape)}, got {tuple(s.shape)}: J = ds/dx is only square then")
        s = s.flatten(1)                                                  # (B, D)
        rows = [torch.autograd.grad(s[:, i].sum(), x, retain_graph=True, create_graph=create_graph)[0]
                for i in range(s.shape[1])]
    return torch.stack([r.flatten(1) for r in rows], dim=1)              # (B, D, D)


def asymmetry(score_fn: Callable, x: torch.Tensor, slices: int | None = None, dist: str = "rademacher",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 6-7 per sample: Asym = tr(J J^T) - tr(J J) = 0.5 ||J - J^T||_F^2 and
    NAsym = ||J - J^T||_F^2 / (4 ||J||_F^2). Exact from the full Jacobian when slices is None;
    otherwise both traces are estimated from `slices` probes (NAsym as a ratio of the two estimates)."""
    if slices is None:
        J = jacobian(score_fn, x)
        tr_JJt = (J * J).sum((1, 2))
        tr_JJ = (J * J.transpose(1, 2)).sum((1, 2))
    else:
        v = draw_probes(check_batch(x), slices, dist, generator)
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            tr_JJt, tr_JJ = hutchinson_traces(score_fn(x), x, v, create_graph=False)
    asym = (tr_JJt - tr_JJ).detach()
    return asym, asym / (2 * tr_JJt.detach())


# ---- 5. The training loss ----
# L_total = L_SM + lam * std^2 * L_QC per sample (the authors weight L_QC by std^2 like the DSM term).
# DSM and L_QC share one forward pass of the network at x_t; the K probes of L_QC all go through it.
# With qc_fraction < 1, L_QC is estimated on a random part of the batch only (below). The caller does
# the one backward() of the step.

def training_loss(f: Callable, x0: torch.Tensor, sde: SDE, *, param: str = "u", lam: float = 0.0,
                  slices: int = 1, probe: str = "rademacher", weighting: str = "sigma2",
                  generator: torch.Generator | None = None, traces: Callable = None, qc_fraction: float = 1.0):
    """Per-sample (total, dsm, qc) with total = dsm + lam * std^2 * qc; qc is zeros when lam == 0.
    `traces` computes the two trace estimates, hutchinson_traces by default (bench.py passes its
    reference formulations of the same gradient).

    qc_fraction < 1: L_QC on a random subset of n = round(qc_fraction * B) samples (at least one), drawn
    without replacement. A sample is in it with probability n / B, so scaling the subset's qc by B / n
    (and giving the others 0) keeps every sample's qc an unbiased estimate of its L_QC, and qc.mean()
    one of the batch's. The network runs twice, on the subset with x requiring grad and on the rest
    without: only the subset's rows carry the x-graph that the VJPs (and the second-order backward)
    run through, so the L_QC work falls to the fraction. Exact, since samples do not interact in the
    network (GroupNorm, no BatchNorm); the DSM term stays on every row. qc_fraction = 1 is the full step."""
    if not lam >= 0:                                                      # also refuses NaN
        raise ValueError(f"lam must be a number >= 0, got {lam}")
    if not 0 < qc_fraction <= 1:
        raise ValueError(f"qc_fraction must be in (0, 1], got {qc_fraction}")
    check_count("slices", slices)
    if param not in PARAMS:
        raise ValueError(f"unknown score parameterization {param!r}; valid choices: {PARAMS}")
    x_t, t, z, std, g = perturb(x0, sde, generator=generator)
    B = x0.shape[0]
    n = B if lam == 0 or qc_fraction == 1 else max(1, round(qc_fraction * B))   # rows that get L_QC
    if n < B:                                         # put a random subset of n rows first
        perm = torch.randperm(B, generator=generator, device=x0.device)
        x_t, t, z, std, g = (a[perm] for a in (x_t, t, z, std, g))
    x_qc = x_t if n == B else x_t[:n]
    if lam > 0:
        x_qc = x_qc.detach().requires_grad_()
    s_qc = score(f, x_qc, t[:n], sde, param)                                           # (n, ...)
    s = s_qc if n == B else torch.cat([s_qc, score(f, x_t[n:], t[n:], sde, param)])   # (B, ...)
    dsm = dsm_from_score(s, z, std, g, weighting)
    if lam == 0:
        return dsm, dsm, torch.zeros_like(dsm)
    tr_JJt, tr_JJ = (traces or hutchinson_traces)(s_qc, x_qc, draw_probes(x_qc, slices, probe, generator))
    qc = tr_JJt - tr_JJ
    if n < B:                                         # unbiased per sample; back to the batch's order
        qc = torch.cat([qc * (B / n), qc.new_zeros(B - n)])
        inverse = perm.argsort()
        qc, dsm, std = qc[inverse], dsm[inverse], std[inverse]
    return dsm + lam * std ** 2 * qc, dsm, qc


# ---- 6. Samplers ----
# One signature for all: sampler(score_fn, x, sde, steps, generator=None, callback=None, **options)
# -> (x, nfe), with score_fn(x, t) and t a (B,) tensor. `callback(i, t, x)` sees every intermediate
# state (to record trajectories). Noise comes from `generator` (one, or one per sample).
# `progress=True` shows a progress bar (steps, or network evaluations for the ODE solvers).

def _bar(iterable=None, desc: str = "", progress: bool = False) -> tqdm:
    """The samplers' optional progress bar (progress=True). Where stderr is not a terminal (a log file), it
    updates once every 30 s, so that a log gets a few lines, not thousands of redraws."""
    quiet_log = {} if sys.stderr.isatty() else dict(mininterval=30, maxinterval=30)
    return tqdm(iterable, desc=desc, disable=not progress, **quiet_log)


def _times(sde: SDE, steps: int, x: torch.Tensor) -> torch.Tensor:
    check_count("steps", steps)
    return torch.linspace(sde.T, sde.eps, steps, device=x.device, dtype=torch.float64).to(x.dtype)


@torch.no_grad()
def langevin(score_fn, x, sde, steps, generator=None, callback=None, step_size=1e-3, noise=True, t=None,
             progress=False):
    """Eq. 3, Langevin dynamics at one noise level: x <- x + a s(x) + sqrt(2 a) z.

    `step_size` is a float or a function of the step index; noise=False gives plain gradient ascent on
    log p (the noise-free trajectories of Fig. 1). The score is queried at time t (default sde.eps)."""
    vec_t = torch.full((x.shape[0],), sde.eps if t is None else t, device=x.device, dtype=x.dtype)
    for i in _bar(range(steps), "Langevin", progress):
        a = step_size(i) if callable(step_size) else step_size
        x = x + a * score_fn(x, vec_t)
        if noise:
            x = x + math.sqrt(2 * a) * randn_like(x, generator)
        if callback is not None:
            callback(i, vec_t, x)
    return x, steps


@torch.no_grad()
def pc_sampler(score_fn, x, sde, steps, generator=None, callback=None, snr=0.16, corrector_steps=1,
               progress=False):
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1-2): at each of `steps` times, Langevin
    corrector steps with signal-to-noise ratio `snr`, then a reverse-diffusion predictor step.

    Corrector step size: Song et al. set a = 2 (snr ||z|| / ||s||)^2 from norms averaged over the batch,
    which makes a sample depend on its batch, and per-sample norms blow up near zeros of the score
    (badly so in 2-D). We use the ratio's typical value instead: E||z||^2 = D and E||s||^2 ~ D / std^2,
    so a = 2 (snr std(t))^2 for every sample. The last predictor step returns its mean (noise-free)."""
    ts, nfe = _times(sde, steps, x), 0
    for i, t in enumerate(_bar(ts, "PC sampler", progress)):
        vec_t = t.expand(x.shape[0])
        for _ in range(corrector_steps):
            # Corrector: Langevin at the current noise level (times alpha_t = 1 - beta_t for VP).
            a = 2 * (snr * sde.std(t)) ** 2
            if isinstance(sde, VPSDE):
                a = a * (1 - sde.beta(t) / steps)
            x = x + a * score_fn(x, vec_t) + (2 * a).sqrt() * randn_like(x, generator)
            nfe += 1
        # Predictor: reverse the forward step x_t = x_{t-dt} + shift + G z.
        dt = float(t - ts[i + 1]) if i + 1 < steps else float(t)
        shift, G = sde.discretize(x, vec_t, dt)
        x_mean = x - shift + G ** 2 * score_fn(x, vec_t)
        x = x_mean + G * randn_like(x, generator)
        nfe += 1
        if callback is not None:
            callback(i, vec_t, x_mean)
    return x_mean, nfe


@torch.no_grad()
def euler_maruyama(score_fn, x, sde, steps, generator=None, callback=None, progress=False):
    """Eq. 4 integrated backwards with Euler-Maruyama: x <- x - (drift - g^2 s) dt + g sqrt(dt) z.
    The last step returns its mean (noise-free)."""
    ts = torch.linspace(sde.T, sde.eps, check_count("steps", steps) + 1, device=x.device, dtype=torch.float64).to(x.dtype)
    for i in _bar(range(steps), "Euler-Maruyama", progress):
        vec_t, dt = ts[i].expand(x.shape[0]), float(ts[i] - ts[i + 1])
        drift, g = sde.drift_diffusion(x, vec_t)
        x_mean = x - (drift - g ** 2 * score_fn(x, vec_t)) * dt
        x = x_mean + g * math.sqrt(dt) * randn_like(x, generator)
        if callback is not None:
            callback(i, vec_t, x_mean)
    return x_mean, steps


def ode_drift(score_fn, x, t, sde):
    """The probability flow ODE dx/dt = f(x, t) - g(t)^2 s(x, t) / 2: same marginals as the SDE."""
    drift, g = sde.drift_diffusion(x, t)
    return drift - 0.5 * g ** 2 * score_fn(x, t)


@torch.no_grad()
def ode_sampler(score_fn, x, sde, steps, generator=None, callback=None, rtol=1e-5, atol=1e-5, progress=False):
    """Probability flow ODE from T to eps with scipy's adaptive RK45; nfe = its number of evaluations.
    `steps` is the number of evenly spaced times handed to callback (the solver picks its own steps).
    Deterministic, so `generator` is unused."""
    shape, device, dtype = x.shape, x.device, x.dtype
    bar = _bar(desc="ODE sampler (evaluations)", progress=progress)

    def rhs(t, y):
        bar.update()
        xt = torch.from_numpy(y).to(device, dtype).view(shape)
        vec_t = torch.full((shape[0],), t, device=device, dtype=dtype)
        return ode_drift(score_fn, xt, vec_t, sde).flatten().double().cpu().numpy()

    t_eval = np.linspace(sde.T, sde.eps, max(steps, 2))
    sol = integrate.solve_ivp(rhs, (sde.T, sde.eps), x.flatten().double().cpu().numpy(),
                              rtol=rtol, atol=atol, method="RK45", t_eval=t_eval)
    bar.close()
    if callback is not None:
        for i, t in enumerate(sol.t):
            callback(i, torch.full((shape[0],), t, dtype=dtype),
                     torch.from_numpy(sol.y[:, i]).to(device, dtype).view(shape))
    return torch.from_numpy(sol.y[:, -1]).to(device, dtype).view(shape), sol.nfev


SAMPLERS = {"pc": pc_sampler, "em": euler_maruyama, "ode": ode_sampler, "langevin": langevin}


# ---- 7. Likelihood ----
# Along the probability flow ODE, d log p_t(x_t) / dt = -div f~(x_t, t) (instantaneous change of
# variables), so log p_eps(x) = log p_T(x_T) + int_eps^T div f~ dt. The divergence is estimated with
# the Skilling-Hutchinson trick, div f~ = E_e[e^T (d f~/dx) e], one fixed probe e for the whole solve.
#
# Discrete data: pixel values k / (n - 1), k in {0..n-1}, become x = (k + u) / n, u ~ U(0, 1)
# (uniform dequantization). A bin has width 1/n per dimension, so P(k) >= E_u[p(x)] (1/n)^D by
# Jensen, and bits/dim = -log2 P(k) / D <= -E_u[log p(x)] / (D ln 2) + log2(n): the offset log2(n).

@torch.no_grad()
def bits_per_dim(score_fn: Callable, x: torch.Tensor, sde: SDE, rtol: float = 1e-5, atol: float = 1e-5,
                 n_bins: int | None = 256, probe: str = "rademacher",
                 generator: torch.Generator | None = None, progress: bool = False) -> tuple[torch.Tensor, int]:
    """Per-sample negative log likelihood in bits/dim and the NFE of the ODE solve.

    x holds discrete data in [0, 1] with n_bins levels (dequantized here, offset log2(n_bins) added);
    n_bins=None treats x as continuous data (no dequantization, no offset)."""
    shape, device, dtype = x.shape, x.device, x.dtype
    B, D = shape[0], x[0].numel()
    if n_bins is not None:
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        x = (x * (n_bins - 1) + u) / n_bins
    e = draw_probes(x, 1, probe, generator)[0]
    bar = _bar(desc="likelihood ODE (evaluations)", progress=progress)

    def rhs(t, y):
        bar.update()
        xt = torch.from_numpy(y[:-B]).to(device, dtype).view(shape)
        vec_t = torch.full((B,), t, device=device, dtype=dtype)
        with torch.enable_grad():
            xt.requires_grad_()
            drift = ode_drift(score_fn, xt, vec_t, sde)
            (grad,) = torch.autograd.grad(flat_sum(drift * e).sum(), xt)
        div = flat_sum(grad * e)
        return torch.cat([drift.detach().flatten(), div]).double().cpu().numpy()

    y0 = np.concatenate([x.flatten().double().cpu().numpy(), np.zeros(B)])
    sol = integrate.solve_ivp(rhs, (sde.eps, sde.T), y0, rtol=rtol, atol=atol, method="RK45")
    bar.close()
    y = torch.from_numpy(sol.y[:, -1])
    logp = sde.prior_logp(y[:-B].view(shape)) + y[-B:]                   # log p_eps(x), float64
    bpd = -logp / (D * math.log(2)) + (math.log2(n_bins) if n_bins is not None else 0.0)
    return bpd.to(dtype), sol.nfev


# ---- 8. Networks ----
# NCSN++ (Song et al. 2021) exactly as score_sde builds it for the paper's configuration (continuous VE,
# `configs/ve/cifar10_ncsnpp_deep_continuous.py`): a U-Net of BigGAN-style residual blocks conditioned on
# log std through Gaussian Fourier features, FIR [1,3,3,1] resampling, self-attention at chosen
# resolutions, skip connections rescaled by 1/sqrt(2), and a "residual" progressive input that feeds a
# downsampled copy of the image to every resolution. Its published checkpoints load into this class
# (image_io.py maps every tensor); tests/test_score_sde.py checks the scores against files
# made with score_sde's own code. Every op is a plain PyTorch op or one of the hand-differentiated ops
# (silu, FIR) at the end of this section, so derivatives of every order exist (tested to third order).

@dataclass
class NCSNppConfig:
    image_size: int = 32            # input height = width
    channels: int = 3               # image channels
    nf: int = 128                   # base width (paper: 128)
    ch_mult: tuple = (1, 2, 2, 2)   # width multiplier per resolution (paper: 1,2,2,2)
    num_res_blocks: int = 8         # residual blocks per resolution (paper, deep model: 8)
    attn_resolutions: tuple = (16,)  # resolutions with self-attention (paper: 16)
    dropout: float = 0.1            # (paper: 0.1)
    fourier_scale: float = 16.0     # std of the Fourier feature frequencies (paper: 16)
    centered: bool = False          # data in [-1, 1]; False (paper): data in [0, 1], mapped to 2x - 1 inside
    init_scale: float = 0.0         # init scale of each branch's last layer (score_sde: 0, i.e. 1e-10)
    fast_conv: bool = False         # convolutions as _Conv: second-order work on convolution_backward's kernels
                                    # (for GPUs; no faster on the CPU; same parameters, same values)
    fast_norm: bool = False         # GroupNorm and attention's softmax as a few plain tensor ops (norm_composite,
                                    # softmax_composite): their derivatives of every order are then large
                                    # contiguous ops, not PyTorch's fused kernels' second-order formulas (for GPUs)

    @classmethod
    def tiny(cls, image_size: int = 32, channels: int = 3) -> "NCSNppConfig":
        """A ~50k-parameter model for CPU tests that keeps every kind of block. Its last layers start at
        full scale (init_scale=1), so that a freshly built model has a Jacobian worth testing."""
        return cls(image_size=image_size, channels=channels, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(image_size // 2,), dropout=0.0, init_scale=1.0)


def ddpm_init_(w: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDPM's initialization, which score_sde uses: uniform with variance scale / fan_avg, where fan_avg
    = (fan_in + fan_out) / 2 counts the kernel's receptive field. scale = 0 stands for 1e-10: the last
    layer of each residual branch starts almost at zero, so every block starts near the identity."""
    fan_avg = (w.shape[0] + w.shape[1]) / 2 * w[0, 0].numel()
    bound = math.sqrt(3 * (scale or 1e-10) / fan_avg)
    with torch.no_grad():
        return w.uniform_(-bound, bound)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same names) that runs as _Conv when `fast` (NCSNppConfig.fast_conv)."""
    fast = False

    def forward(self, x):
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.fast)


def conv2d(x, w, b=None, stride=(1, 1), padding=(0, 0), fast: bool = False) -> torch.Tensor:
    if not fast:
        return F.conv2d(x, w, b, stride, padding)
    if torch.is_autocast_enabled(x.device.type):      # cast as autocast casts F.conv2d, once, outside _Conv
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w, b = (a if a is None else a.to(dtype) for a in (x, w, b))
    with torch.autocast(x.device.type, enabled=False):
        return _Conv.apply(x, w, b, stride, padding)


def conv(c_in: int, c_out: int, kernel: int = 3, scale: float = 1.0, **kwargs) -> Conv2d:
    """A convolution ('same' padding unless given) with DDPM initialization and zero bias."""
    layer = Conv2d(c_in, c_out, kernel, **({"padding": kernel // 2} | kwargs))
    ddpm_init_(layer.weight, scale), nn.init.zeros_(layer.bias)
    return layer


def dense(c_in: int, c_out: int) -> nn.Linear:
    layer = nn.Linear(c_in, c_out)
    ddpm_init_(layer.weight), nn.init.zeros_(layer.bias)
    return layer


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same names) that runs as norm_composite when `fast_norm`."""
    fast_norm = False

    def forward(self, x):
        if not self.fast_norm:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return norm_composite(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm(ch: int) -> GroupNorm:
    return GroupNorm(min(32, ch // 4), ch, eps=1e-6)


class ResBlock(nn.Module):
    """BigGAN-style residual block: GN, Swish, (resample), conv, + time, GN, Swish, dropout, conv; the
    shortcut is resampled too and gets a 1x1 convolution whenever the width changes or it resamples."""

    def __init__(self, c_in, c_out, temb_dim, dropout, init_scale=0.0, resample: str | None = None):
        super().__init__()
        self.norm0, self.conv0 = group_norm(c_in), conv(c_in, c_out)
        self.temb = dense(temb_dim, c_out)
        self.norm1, self.conv1 = group_norm(c_out), conv(c_out, c_out, scale=init_scale)
        self.dropout = nn.Dropout(dropout)
        self.resample = FIR(resample) if resample else None
        self.skip = conv(c_in, c_out, 1) if c_in != c_out or resample else None

    def forward(self, x, temb):
        h = silu(self.norm0(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv0(h) + self.temb(silu(temb))[:, :, None, None]
        h = self.conv1(self.dropout(silu(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) / math.sqrt(2)


class NIN(nn.Module):
    """A linear map over channels at every pixel (a 1x1 convolution), its weight stored as score_sde
    stores it: W of shape (c_in, c_out), then b."""

    fast = False

    def __init__(self, c_in, c_out, scale=0.1):
        super().__init__()
        self.W = nn.Parameter(ddpm_init_(torch.empty(c_in, c_out), scale))
        self.b = nn.Parameter(torch.zeros(c_out))

    def forward(self, x):
        return conv2d(x, self.W.t()[:, :, None, None], self.b, fast=self.fast)


class Attention(nn.Module):
    """Self-attention over all pixels: softmax(q^T k / sqrt(C)) v, residual, rescaled by 1/sqrt(2)."""
    fast = fast_norm = False

    def __init__(self, ch, init_scale=0.0):
        super().__init__()
        self.norm, self.q, self.k, self.v = group_norm(ch), NIN(ch, ch), NIN(ch, ch), NIN(ch, ch)
        self.out = NIN(ch, ch, scale=init_scale)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = (self.q, self.k, self.v)                                    # one convolution for all three
        qkv = conv2d(self.norm(x), torch.cat([m.W for m in qkv], 1).t()[:, :, None, None],
                     torch.cat([m.b for m in qkv]), fast=self.fast)
        q, k, v = qkv.reshape(B, 3, C, H * W).unbind(1)                    # (B, C, HW) each
        # w[b, i, j] = softmax_j(q_i . k_j / sqrt(C)), h_i = sum_j w_ij v_j, as two bmm's, so that w and
        # all its gradients share one row-major layout (einsum made the softmax's second derivatives
        # mix two layouts of (HW, HW) tensors).
        logits = torch.bmm(q.transpose(1, 2), k) / math.sqrt(C)
        w = softmax_composite(logits) if self.fast_norm else torch.softmax(logits, dim=-1)    # (B, HW, HW)
        h = torch.bmm(w, v.transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)
        return (x + self.out(h)) / math.sqrt(2)


class PyramidDown(nn.Module):
    """The residual progressive input, one level down: FIR-blur the previous level with padding 2
    (size + 1), then a 3x3 convolution with stride 2 and no padding (size / 2), to the new width."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.blur, self.conv = FIR("blur"), conv(c_in, c_out, stride=2, padding=0)

    def forward(self, x):
        return self.conv(self.blur(x))


class NCSNpp(nn.Module):
    """NCSN++ U-Net f(x, std) = x - h(x, log std): score_sde's network output is h, and its score
    (scale_by_sigma) is h / std, exactly s_U of section 2."""

    def __init__(self, cfg: NCSNppConfig):
        super().__init__()
        self.cfg = cfg
        nf, C, n_lev = cfg.nf, cfg.channels, len(cfg.ch_mult)
        temb_dim = 4 * nf
        self.register_buffer("freqs", torch.randn(nf) * cfg.fourier_scale)   # fixed Fourier frequencies
        self.temb = nn.Sequential(dense(2 * nf, temb_dim), nn.SiLU(), dense(temb_dim, temb_dim))
        block = lambda ci, co, resample=None: ResBlock(ci, co, temb_dim, cfg.dropout, cfg.init_scale, resample)
        attention = lambda ch: Attention(ch, cfg.init_scale)
        self.conv_in = conv(C, nf)
        # Down: per level, residual blocks (each followed by attention at an attention resolution),
        # then a downsampling block and the progressive input's next level. The lists hold the modules
        # in the order they run, which is also the order of score_sde's `all_modules`.
        self.down, skips, ch, res, pyr_ch = nn.ModuleList(), [nf], nf, cfg.image_size, C
        for lev, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(ch, nf * mult))
                ch = nf * mult
                if res in cfg.attn_resolutions:
                    self.down.append(attention(ch))
                skips.append(ch)
            if lev < n_lev - 1:
                self.down.extend([block(ch, ch, "down"), PyramidDown(pyr_ch, ch)])
                pyr_ch = ch
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([block(ch, ch), attention(ch), block(ch, ch)])
        # Up: per level, one more residual block than down (each takes a skip connection), then one
        # attention block at an attention resolution, then an upsampling block.
        self.up = nn.ModuleList()
        for lev, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), nf * mult))
                ch = nf * mult
            if res in cfg.attn_resolutions:
                self.up.append(attention(ch))
            if lev > 0:
                self.up.append(block(ch, ch, "up"))
                res *= 2
        self.norm_out, self.conv_out = group_norm(ch), conv(ch, C, scale=cfg.init_scale)
        for m in self.modules():
            if isinstance(m, (Conv2d, NIN, Attention)):
                m.fast = cfg.fast_conv
            if isinstance(m, (GroupNorm, Attention)):
                m.fast_norm = cfg.fast_norm

    def forward(self, x, std):
        if x.dim() != 4 or x.shape[1:] != (self.cfg.channels, self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"NCSN++ built for (B, {self.cfg.channels}, {self.cfg.image_size}, "
                             f"{self.cfg.image_size}) inputs, got {tuple(x.shape)}")
        proj = torch.log(std)[:, None] * self.freqs[None, :] * 2 * math.pi        # (B, nf)
        temb = self.temb(torch.cat([proj.sin(), proj.cos()], dim=1))               # (B, 4 nf)
        h = pyr = x if self.cfg.centered else 2 * x - 1
        h = self.conv_in(h)
        hs = [h]
        for m in self.down:
            if isinstance(m, ResBlock):
                h = m(h, temb)
                hs.append(h)
            elif isinstance(m, Attention):
                h = hs[-1] = m(h)
            else:                                       # PyramidDown, right after a downsampling block
                h = pyr = hs[-1] = (m(pyr) + h) / math.sqrt(2)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for m in self.up:
            if isinstance(m, Attention):
                h = m(h)
            elif m.resample is not None:
                h = m(h, temb)
            else:
                h = m(torch.cat([h, hs.pop()], dim=1), temb)
        h = self.conv_out(silu(self.norm_out(h)))
        return x - h


# Hand-differentiated ops. Autograd could differentiate both, but its higher-order rules are slow or
# memory-hungry in a QC step, whose backward differentiates the network twice (BENCHMARKS.md has the
# measurements). Each rule is exact: tests/test_core_network.py compares to third order.

class _SiLU(torch.autograd.Function):
    """silu(x) = x sigmoid(x), whose backward is _SiLUBackward: PyTorch's fused kernel for
    grad * silu'(x), with its own derivatives written out, so each VJP graph of a QC step keeps one
    tensor per layer (the incoming grad) instead of the several of autograd's second-order rule."""

    @staticmethod
    def forward(x):
        return F.silu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        return _SiLUBackward.apply(grad, ctx.saved_tensors[0])

    @staticmethod
    def jvp(ctx, tangent):
        return _SiLUBackward.apply(tangent, ctx.saved_tensors[0])


class _SiLUBackward(torch.autograd.Function):
    """grad * silu'(x), silu'(x) = s (1 + x (1 - s)), s = sigmoid(x). It is linear in grad (so its
    derivative there is itself) and its derivative in x is grad * silu''(x), silu''(x) = s (1 - s)
    (2 + x (1 - 2 s)), written in differentiable ops so that higher orders exist too."""

    @staticmethod
    def forward(grad, x):
        return torch.ops.aten.silu_backward(grad, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def second_derivative(x):
        s = torch.sigmoid(x)
        if torch.is_grad_enabled():                              # differentiable (third order)
            return s * (1 - s) * (2 + x * (1 - 2 * s))
        return (s * -2).add_(1).mul_(x).add_(2).mul_(s).mul_(1 - s)  # same, fewer temporaries

    @staticmethod
    def backward(ctx, gg):
        grad, x = ctx.saved_tensors
        return _SiLUBackward.apply(gg, x), gg * grad * _SiLUBackward.second_derivative(x)

    @staticmethod
    def jvp(ctx, grad_tangent, x_tangent):
        grad, x = ctx.saved_tensors
        return _SiLUBackward.apply(grad_tangent, x) + grad * _SiLUBackward.second_derivative(x) * x_tangent


silu = _SiLU.apply


class _Conv(torch.autograd.Function):
    """conv2d(x, w, b) whose derivatives of every order are convolutions and convolution_backward calls: the
    kernels of a U step's backward (on a GPU, cuDNN's dedicated data- and weight-gradient kernels). Autograd's
    own double backward of conv2d computes its weight-gradient terms as forward convolutions whose kernel is a
    whole activation map, a shape cuDNN serves slowly. Autograd does not tell a custom function which input
    gradients are wanted, so inside `input_grads_only()` (hutchinson_traces' VJPs, taken w.r.t. x) the
    backward skips the weight's."""
    input_grads_only = False

    @staticmethod
    def forward(x, w, b, stride, padding):
        return F.conv2d(x, w, b, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, ctx.stride, ctx.padding = inputs
        ctx.save_for_backward(x, w)
        ctx.bias = b is not None

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w, need_b = (need_w, need_b) if not _Conv.input_grads_only else (False, False)
        gx, gw = _ConvGrad.apply(gy, x, w, ctx.stride, ctx.padding, need_x, need_w)
        return gx, gw, gy.sum((0, 2, 3)) if ctx.bias and need_b else None, None, None


class _ConvGrad(torch.autograd.Function):
    """(gx, gw): the input and weight gradients of conv2d(x, w) at output gradient gy (None where not
    needed), by one convolution_backward. gx is linear in gy and in w, gw in gy and in x, so for cotangents
    (ggx, ggw): d/dgy = conv(ggx, w) + conv(x, ggw), d/dw = the weight gradient of conv(ggx, w) at gy, and
    d/dx = the input gradient of conv(x, ggw) at gy; each again a _Conv or _ConvGrad, to every order."""

    @staticmethod
    def forward(gy, x, w, stride, padding, need_x, need_w):
        gx, gw, _ = torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, (1, 1), False, (0, 0),
                                                        1, (need_x, need_w, False))
        return gx, gw

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, x, w, ctx.stride, ctx.padding, _, _ = inputs
        ctx.save_for_backward(gy, x, w)

    @staticmethod
    def backward(ctx, ggx, ggw):
        gy, x, w = ctx.saved_tensors
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        conv = lambda a, k: _Conv.apply(a, k, None, ctx.stride, ctx.padding)
        g_gy = g_x = g_w = None
        if need_gy:
            terms = ([conv(ggx, w)] if ggx is not None else []) + ([conv(x, ggw)] if ggw is not None else [])
            g_gy = sum(terms[1:], terms[0]) if terms else None
        if need_x and ggw is not None:
            g_x = _ConvGrad.apply(gy, x, ggw, ctx.stride, ctx.padding, True, False)[0]
        if need_w and ggx is not None:
            g_w = _ConvGrad.apply(gy, ggx, w, ctx.stride, ctx.padding, False, True)[1]
        return g_gy, g_x, g_w, None, None, None, None


def norm_composite(x, groups: int, weight, bias, eps: float) -> torch.Tensor:
    """F.group_norm written as plain tensor ops (NCSNppConfig.fast_norm): normalize each sample's group of
    channels over (channels of the group, pixels), then scale and shift per channel. The same function, so
    the same derivatives; autograd differentiates these few large ops to any order instead of the fused
    kernel's backward formulas. Under CUDA autocast a half-precision input runs in float32, as autocast runs
    F.group_norm there (on the CPU, autocast runs both in the input's dtype)."""
    if x.is_cuda and torch.is_autocast_enabled("cuda") and x.dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", enabled=False):
            return norm_composite(x.float(), groups, weight.float(), bias.float(), eps)
    g = x.reshape(len(x), groups, x.shape[1] // groups, -1)               # (B, groups, channels per group, HW)
    var, mean = torch.var_mean(g, dim=(2, 3), keepdim=True, correction=0)
    # y = (g - mean) rstd w + b = g coef + (b - mean coef), with one small (B, groups, channels per group, 1)
    # coefficient: autograd keeps fewer full-size tensors than for (g - mean) * rstd * w + b.
    coef = torch.rsqrt(var + eps) * weight.reshape(groups, -1, 1)
    return torch.addcmul(bias.reshape(groups, -1, 1) - mean * coef, g, coef).reshape(x.shape)


def softmax_composite(s: torch.Tensor) -> torch.Tensor:
    """torch.softmax(s, -1) written as plain tensor ops (NCSNppConfig.fast_norm). Subtracting the row
    maximum leaves the function unchanged, so treating it as a constant (detach) is exact for derivatives of
    every order. Under CUDA autocast a half-precision input runs in float32, as autocast runs softmax there."""
    if s.is_cuda and torch.is_autocast_enabled("cuda") and s.dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", enabled=False):
            return softmax_composite(s.float())
    e = (s - s.detach().amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


@contextlib.contextmanager
def input_grads_only():
    """Inside, _Conv's backward computes input gradients only (for VJPs w.r.t. the network's input)."""
    old, _Conv.input_grads_only = _Conv.input_grads_only, True
    try:
        yield
    finally:
        _Conv.input_grads_only = old


class _FIRConv(torch.autograd.Function):
    """Depthwise convolution with a fixed 4x4 kernel k (given stride and zero padding). It is linear,
    so its backward is its adjoint (_FIRConvT, a transposed convolution) and the adjoint's backward is
    this again: derivatives of every order, forward mode too, are single convolutions. (PyTorch's own
    double backward of a depthwise convolution loops over the channels.)"""

    @staticmethod
    def forward(x, k, stride, padding):
        return F.conv2d(x, k.to(x.dtype).expand(x.shape[1], 1, 4, 4), stride=stride, padding=padding,
                        groups=x.shape[1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.k, ctx.stride, ctx.padding = inputs
        ctx.size = x.shape[-2:]

    @staticmethod
    def backward(ctx, grad):
        return _FIRConvT.apply(grad, ctx.k, ctx.stride, ctx.padding, ctx.size), None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, *_):
        return _FIRConv.apply(x_tangent, ctx.k, ctx.stride, ctx.padding)


class _FIRConvT(torch.autograd.Function):
    """The adjoint of _FIRConv: a transposed convolution back to `size` (odd sizes: one more row/column)."""

    @staticmethod
    def forward(y, k, stride, padding, size):
        extra = [n - ((m - 1) * stride - 2 * padding + 4) for n, m in zip(size, y.shape[-2:])]
        return F.conv_transpose2d(y, k.to(y.dtype).expand(y.shape[1], 1, 4, 4), stride=stride,
                                  padding=padding, output_padding=extra, groups=y.shape[1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.k, ctx.stride, ctx.padding, ctx.size = inputs

    @staticmethod
    def backward(ctx, grad):
        return _FIRConv.apply(grad, ctx.k, ctx.stride, ctx.padding), None, None, None, None

    @staticmethod
    def jvp(ctx, y_tangent, *_):
        return _FIRConvT.apply(y_tangent, ctx.k, ctx.stride, ctx.padding, ctx.size)


class FIR(nn.Module):
    """The fixed separable filter [1,3,3,1] (x) [1,3,3,1] / 64 (StyleGAN2's, as score_sde uses it):
    'down' blurs and keeps every other pixel (size / 2), 'up' inserts zeros and blurs with gain 4
    (size * 2; the adjoint of 'down' up to that gain), 'blur' keeps stride 1 with padding 2 (size + 1)."""

    def __init__(self, mode: str):
        super().__init__()
        if mode not in ("down", "up", "blur"):
            raise ValueError(f"unknown FIR mode {mode!r}; valid choices: 'down', 'up', 'blur'")
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = torch.outer(k, k) / 64.0
        self.mode = mode
        self.register_buffer("k", k * 4.0 if mode == "up" else k, persistent=False)

    def forward(self, x):
        H, W = x.shape[-2:]
        match self.mode:
            case "down":
                return _FIRConv.apply(x, self.k, 2, 1)                        # (B, C, H/2, W/2)
            case "up":
                return _FIRConvT.apply(x, self.k, 2, 1, (2 * H, 2 * W))       # (B, C, 2H, 2W)
        return _FIRConv.apply(x, self.k, 1, 2)                                # (B, C, H+1, W+1)


class MLP(nn.Module):
    """The 2-D score network: 2-64-128-256 Swish MLP, log std entering each layer through a small
    embedding branch; f(x, std) = x - h(x, log std) as for NCSN++."""

    def __init__(self, dim: int = 2, widths: Sequence[int] = (64, 128, 256), emb: int = 32):
        super().__init__()
        self.emb = nn.Sequential(nn.Linear(1, emb), nn.SiLU(), nn.Linear(emb, emb))
        ws = [dim, *widths]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(ws[:-1], ws[1:]))
        self.conds = nn.ModuleList(nn.Linear(emb, b) for b in ws[1:])
        self.out = nn.Linear(ws[-1], dim)

    def forward(self, x, std):
        e = self.emb(torch.log(std)[:, None])
        h = x
        for layer, cond in zip(self.layers, self.conds):
            h = F.silu(layer(h) + cond(e))
        return x - self.out(h)


class EMA:
    """Exponential moving average of the parameters, p_ema <- d p_ema + (1 - d) p, with score_sde's
    warm-up d = min(decay, (1 + n) / (10 + n)) at the n-th update (the first averages forget the
    initialization quickly); buffers are copied."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay, self.num_updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state):
        """Restores the averages and the update count; the decay stays the one this EMA was built with."""
        self.num_updates = state["num_updates"]
        self.model.load_state_dict(state["model"], strict=True)
