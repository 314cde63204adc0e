"""The 2-D suite: Figure 1 (a Gaussian whose score is perturbed) and Section 3.2 (C / U / QC on toy data).

    python toy.py                                  # both experiments and the lam sweep (~12 min on 2 cores)
    python toy.py --experiment=density --datasets=checkerboard --seeds=1
    python toy.py --preset=paper                   # the authors' settings (sigma_max = 3, 4000 iterations)
    python toy.py --experiment=speed               # ms per training iteration, one CPU thread
    python toy.py --experiment=table               # rewrite the markdown tables from a finished run's CSVs
    python toy.py --quick                          # everything, tiny, in seconds (the tests run this)

Experiment 1 (gaussian): the exact score of N(0, 0.1^2 I) plus a rotational (non-conservative) or radial
(conservative) perturbation with the same explicit score-matching error eps; noise-free Langevin steps.
Experiment 2 (density): C, U and QC score models on checkerboard, 8 Gaussians, 2 spirals and two moons,
scored by NLL, score error against the exact oracle score, Asym / NAsym, precision / recall.
Experiment 3 (lambda): QC's weight lam swept on one data set: conservativeness against likelihood.
Every experiment writes CSVs, PNGs and (density) samples to --out_dir, and prints where they are.
"""
import csv
import functools
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass

import matplotlib
import matplotlib.ticker
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import qcsbm
from cli import progress
from metrics import prdc


@dataclass
class Config:
    experiment: str = "all"          # all | gaussian | density | lambda | speed | table (rewrite the tables from the CSVs)
    datasets: str = "checkerboard,8gaussians,2spirals,moons"   # paper: the first three
    seeds: int = 3                   # training seeds per (data set, model); the table shows mean +/- std
    preset: str = "default"          # default | paper (the authors' settings, see PRESETS)
    quick: bool = False              # tiny settings for the tests (well under a minute)
    out_dir: str = ""                # PNGs, CSVs, samples, tables.md; '' = runs/toy, or runs/toy_<what differs>
    workers: int = 2                 # parallel single-threaded training processes (one per core)
    # VE SDE (paper: sigma 0.1 -> 3)
    sigma_min: float = 0.05
    sigma_max: float = 0.0           # 0 = auto: the largest distance between two data points (Song & Ermon 2020)
    # Training: Adam, fresh data every step (paper: batch 5000, 4000 iterations, lr 7.5e-4 constant)
    batch_size: int = 500
    steps: int = 1600
    lr: float = 1e-2
    schedule: str = "cosine"         # cosine (decay to 1% of lr) | constant
    lam: float = 0.1                 # weight of L_QC for the QC model (paper: 0.1, exact 2x2 Jacobian)
    # Lambda sweep
    lams: str = "0,0.01,0.1,1,10"
    lambda_dataset: str = "checkerboard"
    lambda_seeds: int = 1
    # Evaluation
    n_eval: int = 2000               # held-out points: NLL, score error, Asym and the precision/recall reference
    n_samples: int = 2000            # ODE-sampler samples per model
    n_ref: int = 20000               # clean reference sample that defines the oracle score
    levels: str = "0.1,0.3,0.5,0.7"  # SDE times t at which score error and Asym / NAsym are averaged
    rtol: float = 1e-4               # RK45 tolerance (rtol = atol) for NLL and sampling (paper: 1e-5)
    k: int = 3                       # nearest neighbours for precision / recall


PRESETS = {
    "default": {},
    "paper": dict(datasets="checkerboard,8gaussians,2spirals", sigma_min=0.1, sigma_max=3.0, batch_size=5000,
                  steps=4000, lr=7.5e-4, schedule="constant", rtol=1e-5),
}
QUICK = dict(seeds=1, batch_size=256, steps=25, lams="0,1", n_eval=200, n_samples=200, n_ref=2000,
             levels="0.3,0.6", rtol=1e-3)
EXPERIMENTS = ("all", "gaussian", "density", "lambda", "speed", "table")
MODELS = ("c", "u", "qc")


def parse(argv) -> Config:
    """--key=value for every Config field (--quick alone means --quick=true); preset, then quick, then flags.
    Without --out_dir, a run with other settings than the default run writes to a folder named after them."""
    cfg = cli.parse(Config, argv, PRESETS, "default", QUICK)
    cfg.out_dir = cfg.out_dir or cli.run_dir("runs/toy", cfg, PRESETS, "default", QUICK, skip=("experiment", "workers"))
    check(cfg)
    return cfg


def check(cfg: Config):
    """Every bad setting is an error naming the valid choices, raised before any work starts."""
    if cfg.experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {cfg.experiment!r}; valid choices: {', '.join(EXPERIMENTS)}")
    for name in names(cfg.datasets) + [cfg.lambda_dataset]:
        if name not in DATASETS:
            raise ValueError(f"unknown data set {name!r}; valid choices: {', '.join(DATASETS)}")
    for key in ("batch_size", "steps", "seeds", "workers", "lambda_seeds", "n_eval", "n_samples", "n_ref", "k"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"--{key} must be a positive integer, got {getattr(cfg, key)}")
    for key in ("lams", "levels"):
        try:
            [float(v) for v in names(getattr(cfg, key))]
        except ValueError:
            raise ValueError(f"--{key} takes comma-separated numbers, got {getattr(cfg, key)!r}") from None
    if bad := [v for v in names(cfg.lams) if not (0 <= float(v) < float("inf"))]:
        raise ValueError(f"--lams={cfg.lams!r} makes no sense: lams takes finite weights >= 0 of L_QC, got {bad}")
    if not names(cfg.lams):
        raise ValueError("--lams is empty: lams takes comma-separated weights >= 0, e.g. 0,0.1,1")
    if bad := [v for v in names(cfg.levels) if not (0 < float(v) <= 1)]:
        raise ValueError(f"--levels={cfg.levels!r} makes no sense: levels takes SDE times t in (0, 1] (at t = 0 "
                         f"the score is undefined), got {bad}")
    if not names(cfg.levels):
        raise ValueError("--levels is empty: levels takes comma-separated SDE times in (0, 1], e.g. 0.1,0.5")
    for key, ok, allowed in [("rtol", 0 < cfg.rtol < float("inf"), "a finite tolerance > 0 (0 never lets the "
                              "ODE solver finish)"),
                             ("lr", 0 < cfg.lr < float("inf"), "a finite positive learning rate"),
                             ("lam", 0 <= cfg.lam < float("inf"), "a finite weight >= 0")]:
        if not ok:
            raise ValueError(f"--{key}={getattr(cfg, key)!r} makes no sense: {key} takes {allowed}")
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {cfg.schedule!r}; valid choices: cosine, constant")
    if cfg.sigma_min <= 0 or (cfg.sigma_max != 0 and cfg.sigma_max <= cfg.sigma_min):
        raise ValueError(f"need 0 < sigma_min < sigma_max (or sigma_max = 0 for auto), got "
                         f"{cfg.sigma_min}, {cfg.sigma_max}")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        probe = os.path.join(cfg.out_dir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"output directory {cfg.out_dir!r} is not writable ({e.strerror}); pass --out_dir=DIR") from None


def names(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


# ---- Data sets: (n, rng) -> (n, 2) float32 ----

def checkerboard(n, rng):
    """The 8 dark squares (side 3) of a 4 x 4 board on [-6, 6]^2, filled uniformly."""
    i = rng.integers(0, 4, n)                          # column
    j = 2 * rng.integers(0, 2, n) + i % 2              # a row of the same colour
    return (3 * (np.stack([i, j], 1) - 2 + rng.random((n, 2)))).astype(np.float32)


def gaussians8(n, rng):
    """8 Gaussians, std 1/sqrt(2), centred on a circle of radius 4 sqrt(2)."""
    a = 2 * np.pi * rng.integers(0, 8, n) / 8
    centre = 4 * math.sqrt(2) * np.stack([np.cos(a), np.sin(a)], 1)
    return (centre + rng.standard_normal((n, 2)) / math.sqrt(2)).astype(np.float32)


def spirals2(n, rng):
    """Two interleaved spiral arms of 1.5 turns (radius up to ~7.6), the second the first turned by 180 deg."""
    theta = np.sqrt(rng.random(n)) * 3 * np.pi
    arm = np.stack([-np.cos(theta) * theta, np.sin(theta) * theta], 1) + 0.5 * rng.random((n, 2))
    sign = np.where(rng.integers(0, 2, n) == 0, 1.0, -1.0)[:, None]
    return (sign * arm * 2.3 / 3).astype(np.float32)


def moons(n, rng):
    """scikit-learn's two moons (noise 0.05), centred and scaled by 3 to the size of the others."""
    from sklearn.datasets import make_moons
    x, _ = make_moons(n, noise=0.05, random_state=int(rng.integers(2 ** 31)))
    return (3 * (x - [0.5, 0.25])).astype(np.float32)


DATASETS = {"checkerboard": checkerboard, "8gaussians": gaussians8, "2spirals": spirals2, "moons": moons}


# ---- Experiment 1: the Gaussian example (Fig. 1) ----
# p = N(0, s^2 I), s = 0.1, exact score -x / s^2. Perturbation u = k h(r) A x with A = R (90-degree rotation:
# non-conservative) or A = I (radial: the gradient of a function of r, hence conservative), and
# h(r) = r^3 / (1 + (r / 1.7)^4): tiny where p has its mass, a bounded swirl / push of size ~k 1.7^4 further out.
# Both have ||u|| = k h(r) r, so one k serves both: ESM = E_p[0.5 ||u||^2] = k^2 E_p[0.5 h^2 r^2] = eps.
# The expectation over p is a 1-D integral over r (Rayleigh density): 256-point Gauss-Legendre on
# [0, 10 s] (the mass beyond is e^-50). Asym and NAsym depend on r only (R commutes with rotations), so
# the same nodes on the x-axis give their exact expectations too.

SIGMA_G, EPSILONS, R_CAP = 0.1, (0.0, 0.5e-3, 0.75e-3, 1e-3, 1.5e-3, 1.75e-3, 2.25e-3), 1.7


@functools.lru_cache
def radial_nodes(n=256):
    """Nodes r and weights w with sum w g(r) = E_p[g(r)] for p = N(0, s^2 I) in 2-D."""
    z, w = np.polynomial.legendre.leggauss(n)
    r = 5 * SIGMA_G * (z + 1)
    return r, w * 5 * SIGMA_G * r / SIGMA_G ** 2 * np.exp(-r ** 2 / (2 * SIGMA_G ** 2))


def h_profile(r2):
    return r2 ** 1.5 / (1 + (r2 / R_CAP ** 2) ** 2)


def gaussian_field(kind: str, eps: float):
    """The perturbed score s(x) = -x / s^2 + u(x) with ESM error eps; kind 'rotational' or 'radial'."""
    r, w = radial_nodes()
    k = math.sqrt(eps / np.sum(w * 0.5 * h_profile(r ** 2) ** 2 * r ** 2))

    def s(x, t=None):
        Ax = torch.stack([-x[:, 1], x[:, 0]], 1) if kind == "rotational" else x
        return -x / SIGMA_G ** 2 + k * h_profile((x ** 2).sum(1, keepdim=True)) * Ax
    return s


def gaussian_nll(x):
    """-log p(x), clipped at 0 as the authors do (0 inside r < 0.235, where p > 1)."""
    return (x.pow(2).sum(1) / (2 * SIGMA_G ** 2) + math.log(2 * math.pi * SIGMA_G ** 2)).clamp_min(0)


def run_gaussian(cfg: Config, cap=300):
    x_start = torch.tensor([-2.0, -2.0], dtype=torch.float64) + 0.5 * torch.randn(
        10, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r, w = radial_nodes()
    nodes = torch.tensor(np.stack([r, 0 * r], 1))
    rows, trajs = [], {}
    for kind in ("rotational", "radial"):
        for eps in EPSILONS:
            s = gaussian_field(kind, eps)
            a0 = 0.0125 if eps > 0 else 0.01                      # the paper's step size, decaying as e^(-i/1000)
            path = [x_start]
            qcsbm.langevin(lambda x, t: s(x), x_start, None, cap, step_size=lambda i: a0 / math.exp(i / 1000),
                           noise=False, t=0.0, callback=lambda i, t, x: path.append(x))
            nll = torch.stack([gaussian_nll(x).mean() for x in path[1:]])
            below = (nll < 1e-3).nonzero()
            steps = int(below[0]) + 1 if len(below) else cap
            asym, nasym = qcsbm.asymmetry(s, nodes)
            rows.append(dict(field=kind, eps=eps, steps=steps, asym=float((w * asym.numpy()).sum()),
                             nasym=float((w * nasym.numpy()).sum())))
            trajs[kind, eps] = torch.stack(path[:steps + 1]).numpy()
            print(f"  {kind:10s} eps={eps:.2e}: {steps:3d} steps, Asym {rows[-1]['asym']:.3e}, "
                  f"NAsym {rows[-1]['nasym']:.3e}")
    write_csv(os.path.join(cfg.out_dir, "gaussian.csv"), rows)
    write_table(cfg, "gaussian_table.md", gaussian_table(rows))
    plot_gaussian(cfg, rows, trajs)
    return rows


def plot_gaussian(cfg, rows, trajs):
    """Rows: eps; columns: rotational, radial. Arrows: the field's direction, shaded by log10 of its length."""
    g = np.linspace(-3, 3, 21)
    X, Y = np.meshgrid(g, g)
    pts = torch.tensor(np.stack([X.ravel(), Y.ravel()], 1))
    fig, axes = plt.subplots(len(EPSILONS), 2, figsize=(5, 2.4 * len(EPSILONS) + 0.6), sharex=True, sharey=True,
                             layout="constrained")
    for i, eps in enumerate(EPSILONS):
        for j, kind in enumerate(("rotational", "radial")):
            ax, v = axes[i, j], gaussian_field(kind, eps)(pts).numpy()
            n = np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12)
            arrows = ax.quiver(X, Y, *(v / n).T, np.log10(n.ravel()), cmap="Greys", scale=30, width=0.004,
                               clim=(0, 4))
            for tr in trajs[kind, eps].transpose(1, 0, 2):
                ax.plot(*tr.T, "x-", lw=0.8, ms=2.5)
            steps = next(r["steps"] for r in rows if r["field"] == kind and r["eps"] == eps)
            ax.set(xlim=(-3, 3), ylim=(-3, 3), xticks=[-3, 0, 3], yticks=[-3, 0, 3], aspect="equal")
            ax.set_title(f"{kind}, eps={eps * 1e3:g}e-3: {steps} steps", fontsize=8)
            ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("x1", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("x2", fontsize=8)
    fig.colorbar(arrows, ax=axes, location="bottom", fraction=0.02, aspect=40,
                 label="log10 |s(x)| (arrow shade; arrows show direction only)")
    save(fig, cfg, "toy_gaussian_fields.png", tight=False)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for kind, m in (("rotational", "o-"), ("radial", "s-")):
        ax.plot([r["eps"] * 1e3 for r in rows if r["field"] == kind],
                [r["steps"] for r in rows if r["field"] == kind], m, label=kind)
    ax.set(xlabel="ESM error eps (x 1e-3)", ylabel="Langevin steps", title="steps until mean -log p < 1e-3 (cap 300)")
    ax.title.set_fontsize(9)
    ax.legend()
    save(fig, cfg, "toy_gaussian_steps.png")


# ---- Experiment 2: C, U and QC on 2-D data (Sect. 3.2) ----

def loss_fn(f, x0, sde, param, lam):
    """Per-sample training loss. C and U: DSM (Eq. 2). QC: DSM + lam std^2 L_QC with the exact 2x2 Jacobian
    from the same forward pass: in 2-D, tr(J J^T) - tr(J J) = (J_01 - J_10)^2 exactly (no Hutchinson)."""
    if param != "qc" or lam == 0:
        return qcsbm.training_loss(f, x0, sde, param="u" if param == "qc" else param)[0]
    t = sde.eps + (sde.T - sde.eps) * torch.rand(x0.shape[0], dtype=x0.dtype)
    z, std = torch.randn_like(x0), sde.std(t)
    x_t = (x0 + std[:, None] * z).requires_grad_()
    s = qcsbm.score(f, x_t, t, sde, "u")                                           # (B, 2)
    (J0,) = torch.autograd.grad(s[:, 0].sum(), x_t, create_graph=True)            # rows of J, (B, 2) each
    (J1,) = torch.autograd.grad(s[:, 1].sum(), x_t, create_graph=True)
    dsm = qcsbm.dsm_from_score(s, z, std, None, "sigma2")
    return dsm + lam * std ** 2 * (J0[:, 1] - J1[:, 0]) ** 2


def fit(cfg, net, batch_loss, bar) -> float:
    """Train `net` for the steps of `bar` (a progress bar over cfg.steps) with Adam at cfg.lr, decayed by a cosine
    to 1% of it (cfg.schedule == "cosine") or constant; batch_loss() draws a fresh batch and returns its
    per-sample losses. One backward per step. Returns the seconds taken. (ebflow.py and dlsm.py train with it too.)"""
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    cosine = lambda i: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * i / cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine if cfg.schedule == "cosine" else lambda i: 1.0)
    start = time.perf_counter()
    for _ in bar:
        loss = batch_loss().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()                                                           # the one backward of the step
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return time.perf_counter() - start


def train(cfg, dataset, param, lam, seed, sde, desc, show=True):
    torch.manual_seed(seed)
    rng, f = np.random.default_rng(seed), qcsbm.MLP()
    batch_loss = lambda: loss_fn(f, torch.from_numpy(DATASETS[dataset](cfg.batch_size, rng)), sde, param, lam)
    seconds = fit(cfg, f, batch_loss, progress(range(cfg.steps), desc=desc, leave=False, disable=not show))
    return f.eval().requires_grad_(False), seconds


def oracle_score(x, ref, std, chunk=32):
    """Exact score of (1/N) sum_i N(y_i, std^2 I): (sum_i w_i y_i - x) / std^2, w = softmax(-|x - y_i|^2 / 2 std^2).
    Small chunks keep the (chunk, N) temporaries out of freshly mapped memory, whose page faults cost more than
    the arithmetic (3x faster than chunks of 512 at N = 10,000; the rows do not interact, so bitwise the same)."""
    out = []
    for xc in x.double().split(chunk):
        w = torch.softmax(-torch.cdist(xc, ref).pow(2) / (2 * std ** 2), dim=1)     # (chunk, N)
        out.append((w @ ref - xc) / std ** 2)
    return torch.cat(out).to(x.dtype)


def setup_dataset(cfg, dataset):
    """Held-out data (seeded apart from training), the VE SDE, and the probes of the score metrics: for each
    level t, held-out points perturbed to x_t and the oracle score there (the same for every model)."""
    rng, gen = np.random.default_rng(12345), torch.Generator().manual_seed(12345)
    held_out, ref = DATASETS[dataset](cfg.n_eval, rng), torch.from_numpy(DATASETS[dataset](cfg.n_ref, rng))
    sigma_max = cfg.sigma_max or float(torch.pdist(torch.from_numpy(held_out[:2000])).max())
    sde, probes = qcsbm.VESDE(cfg.sigma_min, sigma_max), []
    for t in map(float, names(cfg.levels)):
        std = float(sde.std(torch.tensor(t)))
        x_t = torch.from_numpy(held_out) + std * torch.randn(held_out.shape, generator=gen)
        probes.append((t, x_t, oracle_score(x_t, ref.double(), std)))
    return held_out, sde, probes


def evaluate(cfg, f, param, sde, held_out, probes, seed):
    """NLL (nats per point) with its NFE, score error, Asym, NAsym, precision / recall; and the samples."""
    score_fn = lambda x, t: qcsbm.score(f, x, t, sde, param)
    gen = torch.Generator().manual_seed(10_000 + seed)
    bpd, nfe = qcsbm.bits_per_dim(score_fn, torch.from_numpy(held_out), sde, cfg.rtol, cfg.rtol, n_bins=None,
                                  generator=gen)
    samples, _ = qcsbm.ode_sampler(score_fn, sde.prior_sample((cfg.n_samples, 2), gen), sde, 2,
                                   rtol=cfg.rtol, atol=cfg.rtol)
    err, asym, nasym = [], [], []
    for t, x_t, s_oracle in probes:
        t_vec, std = torch.full((len(x_t),), t), float(sde.std(torch.tensor(t)))
        s = score_fn(x_t, t_vec).detach()
        err.append(float((0.5 * std ** 2 * (s - s_oracle).pow(2).sum(1)).mean()))   # std^2-weighted, like DSM
        a, na = qcsbm.asymmetry(lambda y: score_fn(y, t_vec), x_t)
        asym.append(float(a.mean()))
        nasym.append(float(na.mean()))
    pr = prdc(held_out, samples.numpy(), cfg.k)
    metrics = dict(nll=float(bpd.mean()) * 2 * math.log(2), nfe=nfe, score_error=float(np.mean(err)),
                   asym=float(np.mean(asym)), nasym=float(np.mean(nasym)), precision=pr["precision"],
                   recall=pr["recall"])
    return metrics, samples.numpy()


# Every (data set, model, lam, seed) is one job: train, then evaluate. Jobs run in `workers` single-threaded
# processes (a 2-D MLP gains little from intra-op threads, and a lot from using both cores for two jobs).
# One process shows each job's training bar under the jobs bar; several show the jobs bar alone.

def run_job(job, show=False):
    torch.set_num_threads(1)
    f, secs = train(job["cfg"], job["dataset"], job["param"], job["lam"], job["seed"], job["sde"],
                    f"{job['dataset']} {job['param'].upper()} lam={job['lam']:g} seed {job['seed']}", show)
    metrics, samples = evaluate(job["cfg"], f, job["param"], job["sde"], job["held_out"], job["probes"], job["seed"])
    return job["uses"], dict(**metrics, train_seconds=secs), samples, f.state_dict()


def run_jobs(cfg, jobs):
    """Yield (key, metrics, samples, state_dict) as jobs finish, under one progress bar."""
    jobs = sorted(jobs, key=lambda j: {"qc": 0, "c": 1, "u": 2}[j["param"]])      # slowest first
    bar = progress(total=len(jobs), desc="train + evaluate")
    if cfg.workers == 1:
        results = (run_job(job, show=True) for job in jobs)
    else:
        pool = mp.get_context("spawn").Pool(cfg.workers)  # spawn: fork after torch has run threads is unsafe
        results = pool.imap_unordered(run_job, jobs)
    done = False
    try:
        for result in results:
            bar.update()
            yield result
        done = True
    finally:
        bar.close()
        if cfg.workers > 1:
            pool.close() if done else pool.terminate()        # let workers exit cleanly unless interrupted
            pool.join()


def run_models(cfg: Config, density: bool, sweep: bool):
    """Experiments 2 and 3 in one pool of jobs; CSVs rewritten as results arrive, figures at the end.
    A sweep point equal to a density-table model (lam = 0 is U, lam = cfg.lam is QC, same seed) is trained once."""
    datasets = names(cfg.datasets) if density else []
    setups = {d: setup_dataset(cfg, d) for d in dict.fromkeys(datasets + ([cfg.lambda_dataset] if sweep else []))}
    uses = [("density", d, p, s) for d in datasets for p in MODELS for s in range(cfg.seeds)]
    uses += [("lambda", cfg.lambda_dataset, lam, s) for lam in map(float, names(cfg.lams))
             for s in range(cfg.lambda_seeds)] if sweep else []
    jobs = {}                                              # (dataset, param, lam, seed) -> job; one per model
    for use in uses:
        kind, d, p, s = use
        param, lam = (p, cfg.lam if p == "qc" else 0.0) if kind == "density" else ("qc" if p > 0 else "u", p)
        held_out, sde, probes = setups[d]
        job = jobs.setdefault((d, param, lam, s), dict(dataset=d, param=param, lam=lam, seed=s, uses=[], cfg=cfg,
                                                      sde=sde, held_out=held_out, probes=probes))
        job["uses"].append(use)
    for d in datasets:
        np.save(os.path.join(cfg.out_dir, f"data_{d}.npy"), setups[d][0])
        print(f"{d}: VE SDE sigma {setups[d][1].sigma_min:g} -> {setups[d][1].sigma_max:.3g}")
    rows, models = {}, {}
    for job_uses, m, samples, state in run_jobs(cfg, list(jobs.values())):
        for kind, d, p, s in job_uses:
            rows[kind, d, p, s] = dict(dataset=d, model=p.upper(), seed=s, **m) if kind == "density" else \
                dict(dataset=d, lam=p, seed=s, **m)
            if kind == "density" and s == 0:
                np.save(os.path.join(cfg.out_dir, f"samples_{d}_{p}.npy"), samples)
                models[d, p] = (state, samples)
        for kind in dict.fromkeys(k for k, *_ in job_uses):
            write_csv(os.path.join(cfg.out_dir, f"{kind}.csv"), [rows[u] for u in uses if u in rows and u[0] == kind])
        tqdm.write(f"  {job_uses[0][1]} {job_uses[0][2]} seed {job_uses[0][3]}: " +
                   ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
    for d in datasets:
        plot_density(cfg, d, {p: models[d, p] for p in MODELS}, setups[d][0], setups[d][1])
    density_rows = [rows[u] for u in uses if u[0] == "density"]
    lambda_rows = [rows[u] for u in uses if u[0] == "lambda"]
    if sweep:
        plot_lambda(cfg, lambda_rows)
        write_table(cfg, "lambda_table.md", lambda_table(lambda_rows), cfg.lambda_seeds)
    if density:
        write_table(cfg, "density_table.md", density_table(density_rows), cfg.seeds)
    return density_rows, lambda_rows


def plot_density(cfg, dataset, models, data, sde):
    """Rows C, U, QC; columns: field at the smallest noise level, rotation density, samples over the data."""
    lim = float(np.abs(data).max()) * 1.1
    g = np.linspace(-lim, lim, 60)
    X, Y = np.meshgrid(g, g)
    pts = torch.tensor(np.stack([X.ravel(), Y.ravel()], 1), dtype=torch.float32)
    t = torch.full((len(pts),), sde.eps)
    nets, rots = {}, {}
    for param, (state, _) in models.items():
        nets[param] = qcsbm.MLP()
        nets[param].load_state_dict(state)
        J = qcsbm.jacobian(lambda y: qcsbm.score(nets[param], y, t, sde, param), pts)
        rots[param] = (sde.std(t)[:, None] ** 2 * (J[:, 0, 1] - J[:, 1, 0])[:, None]).view(X.shape).numpy()
    vmax = max(np.percentile(np.abs(r), 99) for r in rots.values()) or 1.0
    fig, axes = plt.subplots(len(models), 3, figsize=(9, 3 * len(models)), squeeze=False)
    for row, (param, (_, samples)) in zip(axes, models.items()):
        q, v = slice(None, None, 3), qcsbm.score(nets[param], pts, t, sde, param).detach()
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)                       # directions only
        row[0].quiver(X[q, q], Y[q, q], v[:, 0].view(X.shape)[q, q], v[:, 1].view(X.shape)[q, q], scale=30,
                      width=0.004)
        im = row[1].imshow(rots[param], origin="lower", extent=(-lim, lim, -lim, lim), cmap="RdBu_r",
                           vmin=-vmax, vmax=vmax)
        row[2].scatter(*data.T, s=1, c="0.75")
        row[2].scatter(*samples.T, s=1, c="C3")
        for ax, title in zip(row, ("score direction, smallest noise", "rotation density std^2 (J12 - J21)",
                                   "ODE samples (red) over data (grey)")):
            ticks = [-round(lim * 0.9), 0, round(lim * 0.9)]
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=ticks, yticks=ticks, aspect="equal")
            ax.set_title(f"{param.upper()}: {title}", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=row[1], fraction=0.046).set_label("std^2 (J12 - J21)", fontsize=8)
    save(fig, cfg, f"toy_{dataset}.png")


def plot_lambda(cfg, rows):
    lams = sorted({r["lam"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for ax, key in zip(axes, ("asym", "nasym", "nll")):
        vals = [[r[key] for r in rows if r["lam"] == lam] for lam in lams]
        ax.errorbar(lams, [np.mean(v) for v in vals], [np.std(v) for v in vals], fmt="o-", capsize=3)
        ax.set_xscale("symlog", linthresh=min([lam for lam in lams if lam > 0] or [1]))
        ax.set(xlabel="lam (weight of L_QC)", ylabel={"asym": "Asym", "nasym": "NAsym", "nll": "NLL (nats)"}[key],
               title=f"{key} of QC on {cfg.lambda_dataset}", yscale="linear" if key == "nll" else "log")
        lo, hi = ax.get_ylim()
        if key != "nll" and hi > 10 * lo:            # over a decade: the decades' labels are enough
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    save(fig, cfg, "toy_lambda.png")


# ---- Speed: seconds per training iteration, one thread, side by side with the authors' network shape ----

class PaperShapedMLP(nn.Module):
    """The authors' 2-D network, for timing only: 2-64-128-256 Swish, the noise level through a 1-unit branch
    joined before the output layer. Same arithmetic as theirs; ours (qcsbm.MLP) conditions every layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 256))
        self.noise = nn.Sequential(nn.Linear(1, 1), nn.SiLU(), nn.Linear(1, 1), nn.SiLU(), nn.Linear(1, 1))
        self.out = nn.Linear(257, 2)

    def forward(self, x, std):
        return x - self.out(F.silu(torch.cat([self.body(x), self.noise(std[:, None])], 1)))


def make_step(net, param, batch, lam=0.1):
    """One training iteration (forward, the one backward, Adam) on a fixed checkerboard batch, as a closure."""
    sde, opt = qcsbm.VESDE(0.1, 3.0), torch.optim.Adam(net.parameters(), 1e-4)
    x0 = torch.from_numpy(checkerboard(batch, np.random.default_rng(0)))

    def step():
        loss = loss_fn(net, x0, sde, param, lam).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def run_speed(cfg: Config, rounds=20):
    """Median seconds per iteration on one thread, the configurations interleaved round by round (so a busy
    machine slows all of them alike), at the authors' batch 5000 and at ours."""
    rounds = 2 if cfg.quick else rounds
    configs = [(name, p, b) for b in dict.fromkeys((5000, cfg.batch_size)) for p in MODELS
               for name in ("qcsbm.MLP", "paper-shaped")]
    steps = {c: make_step(qcsbm.MLP() if c[0] == "qcsbm.MLP" else PaperShapedMLP(), c[1], c[2]) for c in configs}
    times = {c: [] for c in configs}
    for _ in progress(range(rounds + 1), desc="timing"):
        for c in configs:
            start = time.perf_counter()
            steps[c]()
            times[c].append(time.perf_counter() - start)
    rows = [dict(net=n, model=p.upper(), batch=b, seconds=float(np.median(times[n, p, b][1:])))
            for n, p, b in configs]
    write_csv(os.path.join(cfg.out_dir, "speed.csv"), rows)
    for r in rows:
        print(f"  {r['net']:13s} {r['model']:2s} batch {r['batch']:5d}: {r['seconds'] * 1e3:7.1f} ms/iter")
    return rows


# ---- Output helpers and main ----

def write_csv(path, rows):
    with open(path + ".tmp", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)


def save(fig, cfg, name, tight=True):
    """Small PNGs: 70 dpi, then an adaptive 128-colour palette (a third of the bytes, no visible change)."""
    from PIL import Image
    path = os.path.join(cfg.out_dir, name)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    Image.open(path).convert("RGB").quantize(128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


# Tables: markdown, exactly as the README shows them. A mean over seeds carries "± std" only when there
# are several seeds. Asym and NAsym under 1e-6 are float32 round-off here (C's are ~1e-8: C is exactly
# conservative) and print as 0.

ROUND_OFF = 1e-6


def num(x, digits=3, zero=0.0) -> str:
    return "0" if abs(x) <= zero else f"{x:.{digits}g}"


def cell(values, key) -> str:
    zero = ROUND_OFF if key in ("asym", "nasym") else 0.0
    mean = f"{np.mean(values):.3f}" if key == "nll" else num(float(np.mean(values)), 3, zero)  # nats: 3 decimals
    return mean if len(values) == 1 or mean == "0" else f"{mean} ± {np.std(values):.2g}"


def density_table(rows) -> str:
    keys = ("nll", "score_error", "asym", "nasym", "precision", "recall")
    lines = ["| data | model | NLL | score error | Asym | NAsym | precision | recall |", "|---|---|" + "---|" * 6]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for model in dict.fromkeys(r["model"] for r in rows):
            sel = [r for r in rows if r["dataset"] == dataset and r["model"] == model]
            lines.append(f"| {dataset} | {model} | " + " | ".join(cell([r[k] for r in sel], k) for k in keys) + " |")
    return "\n".join(lines)


def gaussian_table(rows) -> str:
    eps = list(dict.fromkeys(r["eps"] for r in rows))
    get = lambda field, e: next(r for r in rows if r["field"] == field and r["eps"] == e)
    lines = ["| ε (×1e-3) | " + " | ".join(f"{e * 1e3:g}" for e in eps) + " |", "|---|" + "---|" * len(eps)]
    for field in ("rotational", "radial"):
        lines.append(f"| {field}: steps | " + " | ".join(str(get(field, e)["steps"]) for e in eps) + " |")
    for field in ("rotational", "radial"):
        pairs = [(num(get(field, e)["asym"], 3, ROUND_OFF), num(get(field, e)["nasym"], 2, ROUND_OFF)) for e in eps]
        lines.append(f"| {field}: Asym / NAsym | " + " | ".join("0" if p == ("0", "0") else " / ".join(p)
                                                               for p in pairs) + " |")
    return "\n".join(lines)


def lambda_table(rows) -> str:
    lams = sorted({r["lam"] for r in rows})
    lines = ["| λ | " + " | ".join(f"{lam:g}" for lam in lams) + " |", "|---|" + "---|" * len(lams)]
    for key, label in (("asym", "Asym"), ("nasym", "NAsym"), ("nll", "NLL")):
        lines.append(f"| {label} | " + " | ".join(cell([r[key] for r in rows if r["lam"] == lam], key)
                                                  for lam in lams) + " |")
    return "\n".join(lines)


def remake_tables(cfg) -> dict:
    """--experiment=table: the markdown tables again from the CSVs of a finished run in --out_dir (after a
    change of their format), without training anything."""
    out = {}
    for kind, make in (("gaussian", gaussian_table), ("density", density_table), ("lambda", lambda_table)):
        path = os.path.join(cfg.out_dir, f"{kind}.csv")
        if os.path.exists(path):
            with open(path) as fh:
                out[kind] = [{k: typed(v) for k, v in r.items()} for r in csv.DictReader(fh)]
            write_table(cfg, f"{kind}_table.md", make(out[kind]), len({r.get("seed", 0) for r in out[kind]}))
    if not out:
        raise ValueError(f"--experiment=table found no gaussian.csv, density.csv or lambda.csv in {cfg.out_dir!r}; "
                         f"it rewrites the tables of a finished run (pass that run's --out_dir)")
    return out


def typed(v: str):
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def write_table(cfg, name, table, seeds=1):
    """The table, and the command and machine it came from, as markdown next to the figures; and on stdout."""
    import platform
    run = cli.command("toy.py", cfg, PRESETS, "default", QUICK, skip=("experiment", "workers", "out_dir"))
    with open(os.path.join(cfg.out_dir, name), "w") as fh:
        fh.write(f"{table}\n\nFrom `{run}`: {seeds} seed(s), torch {torch.__version__}, {platform.machine()}, "
                 f"{os.cpu_count()} cores.\n")
    print(table)


def main(argv=None):
    cfg = parse(sys.argv[1:] if argv is None else argv)
    print("config: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    start, results, threads = time.perf_counter(), {}, torch.get_num_threads()
    torch.set_num_threads(1)                   # a 2-D MLP is latency-bound: threads cost more than they give
    try:
        if cfg.experiment in ("all", "gaussian"):
            print("Experiment 1: the Gaussian example (Fig. 1)")
            results["gaussian"] = run_gaussian(cfg)
        density, sweep = cfg.experiment in ("all", "density"), cfg.experiment in ("all", "lambda")
        if density or sweep:
            print("; ".join(["Experiment 2: C, U and QC on 2-D data (Sect. 3.2)"] * density +
                            [f"Experiment 3: lam sweep of QC on {cfg.lambda_dataset}"] * sweep))
            results["density"], results["lambda"] = run_models(cfg, density, sweep)
        if cfg.experiment == "speed":
            results["speed"] = run_speed(cfg)
        if cfg.experiment == "table":
            results = remake_tables(cfg)
    finally:
        torch.set_num_threads(threads)
    print(f"done in {time.perf_counter() - start:.0f} s; figures, CSVs and samples are in {os.path.abspath(cfg.out_dir)}")
    return results


if __name__ == "__main__":
    cli.run(main)
