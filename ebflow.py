"""EBFlow (Chao et al., NeurIPS 2023) at the scale of toy.py: a normalizing flow read as an energy-based model.

    python ebflow.py                                # both experiments (README: measured times)
    python ebflow.py --experiment=density --datasets=checkerboard --seeds=1
    python ebflow.py --experiment=speed             # seconds per training iteration against the width D
    python ebflow.py --objective=ml                 # train the same flow by maximum likelihood instead
    python ebflow.py --experiment=table             # the table again, with toy.py's rows if it has run since
    python ebflow.py --quick                        # everything, tiny, in seconds (the tests run this)

A flow g maps x to z = g(x) through linear layers h = W a + b and invertible elementwise functions a = sig(h),
with a N(0, I) base. Change of variables: log p(x) = log N(g(x)) + sum_l log|det W_l| + sum_l sum_i log sig'(h_l,i).
The log-determinants of the linear layers do not depend on x, so they belong to the normalizer:
    log p(x) = -E(x) - log Z,   E(x) = 0.5 ||z||^2 - sum_l sum_i log sig'(h_l,i),
    log Z = (D / 2) log(2 pi) - sum_l log|det W_l|.
Score matching needs only the score s = -dE/dx, never log Z: a training iteration costs O(B D^2 L) against
maximum likelihood's O(B D^2 L + D^3 L) (the log-determinants and their gradients, inverse matrices).
The score is a gradient, hence exactly conservative; the likelihood is exact (log Z computed at evaluation only).

Experiment 1 (density): EBFlow trained with denoising (or sliced) score matching on checkerboard, 8 Gaussians and
2 spirals, scored exactly as toy.py scores C / U / QC (same held-out points, noise levels and oracle), and put
beside toy.py's rows when its density.csv is found (--toy_csv).
Experiment 2 (speed): seconds per training iteration (DSM, SSM, maximum likelihood) as the width D grows.
"""
import csv
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import cli
import qcsbm
import toy
from metrics import prdc


@dataclass
class Config:
    experiment: str = "all"          # all | density | speed | table (remake density_table.md from the CSVs)
    datasets: str = "checkerboard,8gaussians,2spirals"   # the QCSBM paper's three
    seeds: int = 3                   # training seeds per data set; the table shows mean +/- std
    quick: bool = False              # tiny settings for the tests (seconds)
    out_dir: str = ""                # PNGs, CSVs, samples, tables; '' = runs/ebflow, or runs/ebflow_<what differs>
    toy_csv: str = "runs/toy/density.csv"   # toy.py's C / U / QC rows to print beside ours (skipped if absent)
    workers: int = 2                 # parallel single-threaded training processes (1: in this process)
    # The flow: `layers` blocks [linear D x D, elementwise sig], then a last linear layer
    layers: int = 10
    bumps: int = 8                   # sig(h) = alpha h + a sum of `bumps` tanh steps, per unit (see Sigma)
    # Training: Adam, fresh data every step, as toy.py
    objective: str = "dsm"           # dsm | ssm (sliced score matching) | ml (maximum likelihood, for comparison)
    sigma: float = 0.1               # DSM noise (EBFlow paper: a small fixed sigma)
    batch_size: int = 500
    steps: int = 2000
    lr: float = 5e-3
    schedule: str = "cosine"         # cosine (decay to 1% of lr) | constant
    # Evaluation: the same held-out points, SDE levels and oracle as toy.py's defaults
    sigma_min: float = 0.05
    sigma_max: float = 0.0           # 0 = auto, as toy.py
    n_eval: int = 2000
    n_samples: int = 2000
    n_ref: int = 20000
    levels: str = "0.1,0.3,0.5,0.7"
    k: int = 3
    grid: int = 400                  # grid points per side for the density's integral and its blurred score
    n_probe: int = 500               # of toy's probes per level (n_eval), those used for the blurred score's metrics
    # Speed: one training iteration of a D-dimensional flow (D x D linear layers) on D/2 checkerboard pairs
    widths: str = "16,64,256,512,1024,2048"
    speed_layers: int = 4
    speed_batch: int = 128
    rounds: int = 5                  # timed iterations per (objective, D), interleaved; the median is reported


QUICK = dict(seeds=1, workers=1, layers=3, batch_size=128,
             steps=30, n_eval=200, n_samples=200, n_ref=2000, levels="0.3,0.6", grid=120, widths="8,32",
             speed_batch=16, rounds=2)
EXPERIMENTS, OBJECTIVES = ("all", "density", "speed", "table"), ("dsm", "ssm", "ml")


def parse(argv) -> Config:
    cfg = cli.parse(Config, argv, quick=QUICK)
    if cfg.experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {cfg.experiment!r}; valid choices: {', '.join(EXPERIMENTS)}")
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}; valid choices: {', '.join(OBJECTIVES)}")
    for name in toy.names(cfg.datasets):
        if name not in toy.DATASETS:
            raise ValueError(f"unknown data set {name!r}; valid choices: {', '.join(toy.DATASETS)}")
    for key in ("seeds", "workers", "layers", "bumps", "batch_size", "steps", "n_eval", "n_samples", "n_ref", "k", "grid", "n_probe",
                "speed_layers", "speed_batch", "rounds"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"--{key} must be a positive integer, got {getattr(cfg, key)}")
    if any(int(d) < 2 or int(d) % 2 for d in toy.names(cfg.widths)):
        raise ValueError(f"--widths takes even numbers >= 2 (D/2 checkerboard pairs), got {cfg.widths!r}")
    cfg.out_dir = cfg.out_dir or cli.run_dir("runs/ebflow", cfg, quick=QUICK,
                                             skip=("experiment", "workers", "toy_csv"))
    os.makedirs(cfg.out_dir, exist_ok=True)
    return cfg


# ---- The flow as an energy-based model ----
# Each elementwise function is sig(h) = alpha h + sum_k A_k tanh(B_k (h - C_k)) with alpha = e^r and A_k, B_k > 0
# (softplus), one set per unit: strictly increasing (sig' >= alpha > 0), so invertible, and flexible enough to make
# steps (a sum of logistic CDFs, as in Gaussianization flows). The energy needs sig'; the hand-written score below
# also needs sig''. Both are closed forms.

class Sigma(nn.Module):
    """An invertible elementwise function of D units with K tanh steps each; sig, sig', sig'' and the inverse."""

    def __init__(self, dim: int, bumps: int):
        super().__init__()
        self.a = nn.Parameter(torch.full((dim, bumps), -3.0))             # A = softplus(a): small steps at first
        self.b = nn.Parameter(torch.ones(dim, bumps))                     # B = softplus(b)
        self.c = nn.Parameter(torch.linspace(-2, 2, bumps).repeat(dim, 1))
        self.r = nn.Parameter(torch.zeros(dim))                           # slope alpha = exp(r) of the linear part

    def forward(self, h):
        """sig(h), sig'(h), sig''(h), each (B, D)."""
        A, B, alpha = F.softplus(self.a), F.softplus(self.b), self.r.exp()   # (D, K), (D, K), (D,)
        th = torch.tanh(B * (h[..., None] - self.c))                     # (B, D, K)
        sech2 = 1 - th ** 2
        return (alpha * h + (A * th).sum(-1), alpha + (A * B * sech2).sum(-1), (-2 * A * B ** 2 * th * sech2).sum(-1))

    @torch.no_grad()
    def inverse(self, y, iters=100):
        """sig^-1 by bisection: |sig(h) - alpha h| <= sum_k A_k, so h lies in [(y - sum A) / alpha, (y + sum A) / alpha]."""
        r = F.softplus(self.a).sum(-1)                                    # (D,)
        alpha = self.r.exp()
        lo, hi = (y - r) / alpha, (y + r) / alpha
        for _ in range(iters):
            mid = (lo + hi) / 2
            above = self(mid)[0] > y
            lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
        return (lo + hi) / 2


class EBFlow(nn.Module):
    """x -> z: `layers` blocks [h = W a + b, a = sig(h)], then z = W a + b; base N(0, I).

    energy_and_score gives E(x) and s(x) = -dE/dx by a hand-written backward pass (no autograd), so training by
    score matching differentiates s once, and log Z (the log-determinants) is needed only by log_prob."""

    def __init__(self, dim: int = 2, layers: int = 10, bumps: int = 8):
        super().__init__()
        # Random rotations mix the units from the start; the first layer also scales the data (std ~3.5) to ~1.
        self.W = nn.ParameterList(nn.Parameter(torch.linalg.qr(torch.randn(dim, dim))[0] * (0.3 if i == 0 else 1))
                                  for i in range(layers + 1))
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(layers + 1))
        self.sig = nn.ModuleList(Sigma(dim, bumps) for _ in range(layers))

    def energy_and_score(self, x):
        """E(x) = 0.5 ||z||^2 - sum_l sum_i log sig'(h_l,i), shape (B,); s(x) = -dE/dx, shape (B, D)."""
        a, saved, log_dsig = x, [], 0
        for W, b, sig in zip(self.W, self.b, self.sig):
            a, d1, d2 = sig(a @ W.T + b)                                  # a = sig(h); sig'(h), sig''(h)
            saved.append((d1, d2))
            log_dsig = log_dsig + torch.log(d1).sum(1)
        z = a @ self.W[-1].T + self.b[-1]
        # Backward by hand: g = dE/da, from dE/dz = z back through each layer:
        # dE/dh = dE/da * sig'(h) - sig''(h) / sig'(h)   (the second term from -log sig'(h)), dE/da_prev = dE/dh W.
        g = z @ self.W[-1]
        for W, (d1, d2) in zip(reversed(self.W[:-1]), reversed(saved)):
            g = (g * d1 - d2 / d1) @ W
        return 0.5 * (z ** 2).sum(1) - log_dsig, -g

    def score(self, x):
        return self.energy_and_score(x)[1]

    def log_z(self):
        """log Z = (D / 2) log(2 pi) - sum_l log|det W_l|: the only place the determinants are computed."""
        D = self.W[0].shape[0]
        return 0.5 * D * math.log(2 * math.pi) - sum(torch.linalg.slogdet(W)[1] for W in self.W)

    def log_prob(self, x):
        """Exact log p(x) = -E(x) - log Z, per sample."""
        return -self.energy_and_score(x)[0] - self.log_z()

    @torch.no_grad()
    def sample(self, n, generator=None):
        """x = g^-1(z), z ~ N(0, I): linear solves and bisection, layer by layer in reverse."""
        W0 = self.W[0]
        a = torch.randn(n, W0.shape[0], generator=generator, dtype=W0.dtype)
        a = torch.linalg.solve(self.W[-1], (a - self.b[-1]).T).T
        for W, b, sig in zip(reversed(self.W[:-1]), reversed(self.b[:-1]), reversed(self.sig)):
            a = torch.linalg.solve(W, (sig.inverse(a) - b).T).T
        return a


# ---- Training objectives: per-sample losses, the loop calls backward() once ----

def loss_fn(flow, x, objective, sigma=0.1):
    """dsm: 0.5 sigma^2 ||s(x + sigma z) + z / sigma||^2 (Eq. 2 at one noise level).
    ssm: sliced score matching, v^T (ds/dx) v + 0.5 ||s||^2 with Rademacher v (the variance-reduced form).
    ml: -log p(x), which needs log Z, i.e. every log|det W_l| and (in backward) every W_l^-1."""
    match objective:
        case "dsm":
            z = torch.randn_like(x)
            std = torch.full((len(x),), sigma, dtype=x.dtype)
            return qcsbm.dsm_from_score(flow.score(x + sigma * z), z, std, None, "sigma2")
        case "ssm":
            x = x.detach().requires_grad_()
            s = flow.score(x)
            v = torch.randint(0, 2, x.shape, dtype=x.dtype) * 2 - 1
            (Jv,) = torch.autograd.grad((s * v).sum(), x, create_graph=True)   # v^T ds/dx; ds/dx is symmetric
            return (Jv * v).sum(1) + 0.5 * (s ** 2).sum(1)
        case "ml":
            return -flow.log_prob(x)
    raise ValueError(f"unknown objective {objective!r}; valid choices: {', '.join(OBJECTIVES)}")


def train(cfg, dataset, seed, position=0):
    torch.manual_seed(seed)
    rng, flow = np.random.default_rng(seed), EBFlow(2, cfg.layers, cfg.bumps)
    batch_loss = lambda: loss_fn(flow, torch.from_numpy(toy.DATASETS[dataset](cfg.batch_size, rng)), cfg.objective,
                                 cfg.sigma)
    bar = tqdm(range(cfg.steps), desc=f"{dataset} EBFlow seed {seed}", leave=False, position=position, disable=None)
    seconds = toy.fit(cfg, flow, batch_loss, bar)                  # Adam, cosine decay, one backward per step
    return flow.eval().requires_grad_(False), seconds


# ---- Experiment 1: EBFlow on the 2-D data, scored as toy.py scores C / U / QC ----
# NLL is exact: -log p(x) = E(x) + log Z with the log-determinants. Score error and Asym need the score of the model
# blurred by each SDE level's noise, which is what C / U / QC estimate there: in 2-D it is a quadrature over a grid,
#   grad log (p * N(0, std^2 I))(x) = (sum_j w_j y_j - x) / std^2,  w = softmax_j(log p(y_j) - |x - y_j|^2 / 2 std^2),
# toy.oracle_score's formula with the grid points weighted by the model's density instead of 1/N. The same grid
# gives the integral of p (it should be ~1: the normalizer from the log-determinants is exact).

def grid(lim, n):
    """An n x n grid of cell centres on [-lim, lim]^2 (float64) and the cell area."""
    g = (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * lim / n) - lim
    X, Y = torch.meshgrid(g, g, indexing="xy")
    return torch.stack([X.ravel(), Y.ravel()], 1), (2 * lim / n) ** 2


def blurred_score(x, pts, log_w, std, chunk=8):
    """Score of the density sum_j e^log_w_j delta(y - pts_j) blurred by N(0, std^2 I), at x (float64). Small
    chunks, as toy.oracle_score: 2.4x faster than chunks of 256 on a 100k-point grid, bitwise the same."""
    out = []
    for xc in x.double().split(chunk):
        w = torch.softmax(log_w - torch.cdist(xc, pts).pow(2) / (2 * std ** 2), dim=1)     # (chunk, G)
        out.append((w @ pts - xc) / std ** 2)
    return torch.cat(out)


def evaluate(cfg, flow, sde, held_out, probes, seed):
    """toy.evaluate's metrics for a flow (in float64): exact NLL (nfe 1: one pass), score error of the blurred
    density against the oracle, Asym / NAsym of the flow's score at the same points, precision / recall of exact
    samples; and the integral of p on the grid."""
    flow = flow.double()
    x = torch.from_numpy(held_out).double()
    nll = float(-flow.log_prob(x).mean())
    pts, cell = grid(float(np.abs(held_out).max()) * 1.1 + 1.0, cfg.grid)
    log_p = torch.cat([flow.log_prob(p) for p in pts.split(65536)])
    mass = float(log_p.exp().sum() * cell)
    keep = log_p > log_p.max() - 25                              # cells with e^-25 of the peak density weigh nothing
    pts, log_w = pts[keep], log_p[keep]
    err, asym, nasym = [], [], []
    for t, x_t, s_oracle in probes:
        std, x_t, s_oracle = float(sde.std(torch.tensor(t))), x_t[:cfg.n_probe], s_oracle[:cfg.n_probe]
        s = blurred_score(x_t, pts, log_w, std)
        err.append(float((0.5 * std ** 2 * (s - s_oracle).pow(2).sum(1)).mean()))       # as toy.evaluate
        a, na = qcsbm.asymmetry(flow.score, x_t.double())         # of -dE/dx itself: round-off
        asym.append(float(a.mean()))
        nasym.append(float(na.mean()))
    samples = flow.sample(cfg.n_samples, torch.Generator().manual_seed(10_000 + seed)).numpy()
    pr = prdc(held_out, samples, cfg.k)
    metrics = dict(nll=nll, nfe=1, score_error=float(np.mean(err)), asym=float(np.mean(asym)),
                   nasym=float(np.mean(nasym)), precision=pr["precision"], recall=pr["recall"])
    return metrics, mass, samples


def run_job(job):
    cfg, dataset, seed, (held_out, sde, probes) = job
    flow, secs = train(cfg, dataset, seed)
    metrics, mass, samples = evaluate(cfg, flow, sde, held_out, probes, seed)
    return dict(dataset=dataset, model="EBFlow", seed=seed, **metrics, train_seconds=secs, grid_mass=mass), \
        samples, flow.state_dict()


def run_density(cfg):
    """Train and evaluate every (data set, seed), two single-threaded processes at a time (as toy.py)."""
    datasets = toy.names(cfg.datasets)
    setups = {d: toy.setup_dataset(cfg, d) for d in datasets}                # toy's held-out points, SDE, probes
    jobs = [(cfg, d, s, setups[d]) for d in datasets for s in range(cfg.seeds)]
    rows, flows = [], {}
    # Single-threaded jobs: a 2-D flow is latency-bound; two processes use both cores. Spawn: fork after torch is unsafe.
    pool = mp.get_context("spawn").Pool(cfg.workers, torch.set_num_threads, (1,)) if cfg.workers > 1 else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = pool.imap_unordered(run_job, jobs) if pool else map(run_job, jobs)
        for row, samples, state in cli.progress(results, total=len(jobs), desc="train + evaluate"):
            rows.append(row)
            if row["seed"] == 0:
                flows[row["dataset"]] = (state, samples)
            tqdm.write(f"  {row['dataset']} seed {row['seed']}: " +
                       ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
    finally:
        torch.set_num_threads(threads)
        if pool:
            pool.close()
            pool.join()
    rows.sort(key=lambda r: (datasets.index(r["dataset"]), r["seed"]))
    toy.write_csv(os.path.join(cfg.out_dir, "density.csv"), rows)
    for d, (state, samples) in flows.items():
        torch.save(state, os.path.join(cfg.out_dir, f"flow_{d}.pt"))
        np.save(os.path.join(cfg.out_dir, f"samples_{d}.npy"), samples)
    plot_density(cfg, {d: flows[d] for d in datasets}, {d: setups[d][0] for d in datasets})
    return rows, write_table(cfg, rows)


def write_table(cfg, rows):
    """density_table.md: toy.py's C / U / QC rows from --toy_csv (when it has every data set here), then EBFlow's."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    toy_rows = read_csv(cfg.toy_csv) if os.path.exists(cfg.toy_csv) else []
    toy_rows = [r for r in toy_rows if r["dataset"] in datasets]
    if {(r["dataset"], r["model"]) for r in toy_rows} != {(d, m) for d in datasets for m in ("C", "U", "QC")}:
        toy_rows = []
    table = toy.density_table(toy_rows + rows)
    with open(os.path.join(cfg.out_dir, "density_table.md"), "w") as fh:
        fh.write(table + "\n")
    return table


def read_csv(path):
    with open(path) as fh:
        return [{k: (v if k in ("dataset", "model") else float(v)) for k, v in r.items()} for r in csv.DictReader(fh)]


def plot_density(cfg, flows, data):
    """One row per data set: the exact density p(x), the score direction, exact samples over the data."""
    fig, axes = plt.subplots(len(flows), 3, figsize=(10, 3.1 * len(flows)), squeeze=False)
    for row, (dataset, (state, samples)) in zip(axes, flows.items()):
        flow = EBFlow(2, cfg.layers, cfg.bumps).double()
        flow.load_state_dict(state)
        lim = float(np.abs(data[dataset]).max()) * 1.1
        pts, _ = grid(lim, 200)
        with torch.no_grad():
            p = flow.log_prob(pts).exp().view(200, 200).numpy()
        im = row[0].imshow(p, origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
        fig.colorbar(im, ax=row[0], fraction=0.046, label="p(x)")
        q, _ = grid(lim, 20)
        v = flow.score(q)
        v = (v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)).detach().numpy()        # directions only
        row[1].quiver(*q.numpy().T, *v.T, scale=30, width=0.004)
        row[2].scatter(*data[dataset].T, s=1, c="0.75", label="held-out data")
        row[2].scatter(*samples.T, s=1, c="C3", label="EBFlow samples")
        row[2].legend(loc="upper right", fontsize=7, markerscale=5)
        for ax, title in zip(row, ("exact density p(x)", "score -dE/dx (direction)", "exact samples, data")):
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="x1", ylabel="x2")
            ax.set_title(f"{dataset}: {title}", fontsize=8)
    toy.save(fig, cfg, "ebflow_density.png")


# ---- Experiment 2: the cost of a training iteration against the width D ----
# A D-dimensional flow with D x D linear layers on D/2 independent checkerboard pairs. DSM and SSM touch each W only
# through products with a batch (O(B D^2) per layer); maximum likelihood also needs log|det W| (an LU, O(D^3)) and,
# in backward, W^-T (another O(D^3)). The three steps are timed interleaved, round by round.

def make_step(D, objective, cfg):
    torch.manual_seed(0)
    flow = EBFlow(D, cfg.speed_layers, cfg.bumps)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.concatenate([toy.checkerboard(cfg.speed_batch, rng) for _ in range(D // 2)], 1) / 3.5)

    def step():
        loss = loss_fn(flow, x, objective, cfg.sigma).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def run_speed(cfg):
    widths = [int(d) for d in toy.names(cfg.widths)]
    configs = [(D, obj) for D in widths for obj in OBJECTIVES]
    steps = {c: make_step(*c, cfg) for c in configs}
    times = {c: [] for c in configs}
    for _ in cli.progress(range(cfg.rounds + 1), desc="timing"):
        for c in configs:
            start = time.perf_counter()
            steps[c]()
            times[c].append(time.perf_counter() - start)
    rows = [dict(D=D, objective=obj, seconds=float(np.median(times[D, obj][1:])), threads=torch.get_num_threads())
            for D, obj in configs]                                                  # round 0 is a warm-up
    toy.write_csv(os.path.join(cfg.out_dir, "speed.csv"), rows)
    lines = ["| D | " + " | ".join(f"{o.upper()} (s)" for o in OBJECTIVES) + " | ML / DSM |", "|---|---|---|---|---|"]
    for D in widths:
        sec = {r["objective"]: r["seconds"] for r in rows if r["D"] == D}
        lines.append(f"| {D} | " + " | ".join(f"{sec[o]:.4g}" for o in OBJECTIVES) + f" | {sec['ml'] / sec['dsm']:.2f} |")
    table = "\n".join(lines)
    with open(os.path.join(cfg.out_dir, "speed_table.md"), "w") as fh:
        fh.write(table + "\n")
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for obj, label in zip(OBJECTIVES, ("DSM", "SSM", "maximum likelihood")):
        ax.plot(widths, [r["seconds"] for r in rows if r["objective"] == obj], "o-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="width D of the linear layers",
           ylabel="seconds per training iteration", title=f"{cfg.speed_layers + 1} D x D layers, batch {cfg.speed_batch}")
    ax.legend(fontsize=8)
    toy.save(fig, cfg, "ebflow_speed.png")
    return rows, table


def main(argv=None):
    cfg = parse(sys.argv[1:] if argv is None else argv)
    print("config: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    start, results = time.perf_counter(), {}
    if cfg.experiment in ("all", "density"):
        print(f"Experiment 1: EBFlow ({cfg.objective.upper()}) on {cfg.datasets}")
        results["density"], table = run_density(cfg)
        print(table)
    if cfg.experiment == "table":
        print(write_table(cfg, read_csv(os.path.join(cfg.out_dir, "density.csv"))))
    if cfg.experiment in ("all", "speed"):
        threads = torch.get_num_threads()
        print(f"Experiment 2: seconds per training iteration against D ({threads} thread{'s' * (threads != 1)})")
        results["speed"], table = run_speed(cfg)
        print(table)
    print(f"done in {time.perf_counter() - start:.0f} s; figures, CSVs and samples are in {os.path.abspath(cfg.out_dir)}")
    return results


if __name__ == "__main__":
    cli.run(main)
