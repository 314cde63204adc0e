"""DLSM's motivational experiment (Chao et al., ICLR 2022): posterior scores on the inter-twining moons, five ways.

    python dlsm.py                        # the whole experiment (README: measured times)
    python dlsm.py --seeds=1 --scale=5    # one seed, a different guidance scale for (b)
    python dlsm.py --experiment=table     # rewrite dlsm_table.md from a finished run's dlsm.csv
    python dlsm.py --quick                # everything, tiny, in seconds (the tests run this)

A conditional sample of class y needs the posterior score, by Bayes' theorem
    grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x),
with a score model s(x, t) for the first term and a noise-conditional classifier p(y | x, t) for the second. We
compute the posterior score of each class five ways:
    (a) base:    s + grad log p(y | x, t), the classifier trained with cross-entropy (CE) only;
    (b) scaling: s + scale * grad log p(y | x, t), the same classifier, its gradient scaled;
    (c) DLSM:    s + grad log p(y | x, t), the classifier trained with CE + lam * L_DLSM, where
                 L_DLSM = 0.5 std^2 || s(x_t, t) + grad log p(y | x_t, t) + z / std ||^2   (s frozen)
                 is denoising score matching of the posterior score: it asks the classifier's gradient, not
                 only its decision, to be right;
    (d) a conditional score model s(x, t, y) trained with DSM on each class directly;
    (e) the oracle: the exact posterior score of the noise-perturbed empirical distribution of each class.
Reported, per method (mean over the two classes and the seeds): precision / recall of class-conditional PC samples
against held-out points of that class, and the expected errors of the posterior score and of the likelihood score
grad log p(y | x, t) against (e), 0.5 std^2 ||.||^2 averaged over SDE levels as toy.py's score error.
"""
import csv
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
    experiment: str = "all"          # all | table (rewrite dlsm_table.md from a finished run's dlsm.csv)
    seeds: int = 3                   # training seeds; the table shows mean +/- std
    workers: int = 2                 # seeds run in this many single-threaded processes at once (1: in this process)
    quick: bool = False              # tiny settings for the tests (seconds)
    out_dir: str = ""                # PNG, CSV, table; '' = runs/dlsm, or runs/dlsm_<what differs>
    # VE SDE, as toy.py's defaults
    sigma_min: float = 0.05
    sigma_max: float = 0.0           # 0 = auto: the largest distance between two data points
    # Training: Adam, fresh data every step, cosine decay (as toy.py)
    batch_size: int = 500
    steps: int = 1600                # for each of the four networks
    lr: float = 1e-2
    schedule: str = "cosine"         # cosine | constant
    lam: float = 1.0                 # weight of L_DLSM next to CE for (c) (DLSM paper: 1)
    scale: float = 10.0              # the classifier-gradient scale of (b) (our choice)
    # Evaluation
    n_eval: int = 2000               # held-out points (both classes): score errors and precision / recall reference
    n_samples: int = 1000            # PC samples per class and method
    n_ref: int = 20000               # clean labelled reference sample that defines the oracle (e)
    levels: str = "0.1,0.3,0.5,0.7"  # SDE times t at which the score errors are averaged
    sample_steps: int = 200          # PC sampler steps (predictor + one corrector each)
    snr: float = 0.16
    k: int = 3


QUICK = dict(seeds=1, workers=1, batch_size=128, steps=30, n_eval=200, n_samples=100, n_ref=2000,
             levels="0.3,0.6", sample_steps=20)
METHODS = ("a", "b", "c", "d", "e")
NAMES = {"a": "(a) CE classifier", "b": "(b) CE, gradient scaled", "c": "(c) CE + DLSM classifier",
         "d": "(d) conditional score model", "e": "(e) oracle"}


def parse(argv) -> Config:
    cfg = cli.parse(Config, argv, quick=QUICK)
    for key in ("seeds", "workers", "batch_size", "steps", "n_eval", "n_samples", "n_ref", "sample_steps", "k"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"--{key} must be a positive integer, got {getattr(cfg, key)}")
    if cfg.experiment not in ("all", "table"):
        raise ValueError(f"unknown experiment {cfg.experiment!r}; valid choices: all, table")
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {cfg.schedule!r}; valid choices: cosine, constant")
    cfg.out_dir = cfg.out_dir or cli.run_dir("runs/dlsm", cfg, quick=QUICK, skip=("experiment", "workers"))
    os.makedirs(cfg.out_dir, exist_ok=True)
    return cfg


def labelled_moons(n, rng):
    """toy.moons with its labels: scikit-learn's two moons (noise 0.05), centred and scaled by 3; y in {0, 1}."""
    from sklearn.datasets import make_moons
    x, y = make_moons(n, noise=0.05, random_state=int(rng.integers(2 ** 31)))
    return (3 * (x - [0.5, 0.25])).astype(np.float32), y


# ---- Networks: the classifier and the conditional score model share one shape ----

class Net(nn.Module):
    """(x, std[, y]) -> (B, out): qcsbm.MLP's 2-64-128-256 Swish body, log std entering every layer through an
    embedding, to which a class embedding is added when `classes` > 0. Classifier: out = 2 logits. Conditional
    score model: out = 2, read as h in s = h / std (the U parameterization, as qcsbm.score)."""

    def __init__(self, out: int = 2, classes: int = 0, widths=(64, 128, 256), emb: int = 32):
        super().__init__()
        self.emb = nn.Sequential(nn.Linear(1, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(classes, emb) if classes else None
        ws = [2, *widths]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(ws[:-1], ws[1:]))
        self.conds = nn.ModuleList(nn.Linear(emb, b) for b in ws[1:])
        self.out = nn.Linear(ws[-1], out)

    def forward(self, x, std, y=None):
        e = self.emb(torch.log(std)[:, None]) + (self.label(y) if y is not None else 0)
        h = x
        for layer, cond in zip(self.layers, self.conds):
            h = F.silu(layer(h) + cond(e))
        return self.out(h)


def likelihood_score(clf, x, t, y, sde):
    """grad_x log p(y | x, t) of the classifier; keeps the graph when the caller may differentiate it (training)."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        x_ = x if x.requires_grad else x.detach().requires_grad_()
        log_p = F.log_softmax(clf(x_, sde.std(t)), 1).gather(1, y[:, None]).sum()
        (g,) = torch.autograd.grad(log_p, x_, create_graph=create_graph)
    return g


def cond_score(net, x, t, y, sde):
    """s(x, t, y) = h(x, std, y) / std."""
    return net(x, sde.std(t), y) / sde.std(t)[:, None]


# ---- Losses: per sample; the loop calls backward() once ----

def loss_fn(kind, nets, x0, y, sde, lam=1.0):
    """score: DSM (Eq. 2) of the unconditional model. cond: DSM of s(x, t, y). ce: cross-entropy of the classifier at
    x_t. dlsm: CE + lam * L_DLSM, the posterior score s + grad log p(y | x_t) (s frozen) regressed on -z / std."""
    sde_score = lambda x, t: qcsbm.score(nets["score"], x, t, sde, "u")
    match kind:
        case "score":
            return qcsbm.dsm_loss(sde_score, x0, sde)
        case "cond":
            return qcsbm.dsm_loss(lambda x, t: cond_score(nets["cond"], x, t, y, sde), x0, sde)
        case "ce" | "dlsm":
            x_t, t, z, std, _ = qcsbm.perturb(x0, sde)
            x_t.requires_grad_()
            clf = nets[kind]
            ce = F.cross_entropy(clf(x_t, std), y, reduction="none")
            if kind == "ce":
                return ce
            with torch.no_grad():
                s = sde_score(x_t, t)                                              # frozen: stage 1
            post = s + likelihood_score(clf, x_t, t, y, sde)
            return ce + lam * qcsbm.dsm_from_score(post, z, std, None, "sigma2")
    raise ValueError(f"unknown loss {kind!r}")


def train(cfg, kind, nets, sde, seed, show=True):
    torch.manual_seed(seed)
    rng, net = np.random.default_rng(seed), nets[kind]

    def batch_loss():
        x0, y = labelled_moons(cfg.batch_size, rng)
        return loss_fn(kind, nets, torch.from_numpy(x0), torch.from_numpy(y), sde, cfg.lam)
    toy.fit(cfg, net, batch_loss, cli.progress(range(cfg.steps), desc=f"seed {seed}: {kind}", leave=False,
                                               disable=not show))       # Adam, cosine decay, one backward per step
    net.eval().requires_grad_(False)


# ---- The five posterior scores and the oracle ----

def oracle_scores(x, t, y, ref, ref_y, sde, likelihood=True):
    """(e): the exact posterior score grad log p_t(x | y) and likelihood score grad log p_t(y | x) of the
    reference sample blurred by N(0, std^2 I): class y's mixture, and it minus the mixture of all points.
    likelihood=False skips the second (None), which sampling does not use and which costs twice the first."""
    std = float(sde.std(t[:1]))
    post = torch.empty_like(x)
    for c in (0, 1):
        rows = y == c
        post[rows] = toy.oracle_score(x[rows], ref[ref_y == c], std)
    return post, (post - toy.oracle_score(x, ref, std) if likelihood else None)


def posterior_fns(cfg, nets, sde, ref, ref_y):
    """Per method: (x, t, y, likelihood=True) -> (posterior score, likelihood score or, if not asked for, maybe None)."""
    s = lambda x, t: qcsbm.score(nets["score"], x, t, sde, "u")

    def classifier(clf, scale):
        def fn(x, t, y, likelihood=True):
            g = scale * likelihood_score(clf, x, t, y, sde)
            return s(x, t) + g, g
        return fn

    def conditional(x, t, y, likelihood=True):
        post = cond_score(nets["cond"], x, t, y, sde)
        return post, (post - s(x, t) if likelihood else None)
    return {"a": classifier(nets["ce"], 1.0), "b": classifier(nets["ce"], cfg.scale),
            "c": classifier(nets["dlsm"], 1.0), "d": conditional,
            "e": lambda x, t, y, likelihood=True: oracle_scores(x, t, y, ref, ref_y, sde, likelihood)}


# ---- One seed: train the four networks, score the five methods ----

def setup(cfg):
    """Held-out and reference labelled points (seeded apart from training), and the VE SDE."""
    rng = np.random.default_rng(12345)
    held = labelled_moons(cfg.n_eval, rng)
    ref = labelled_moons(cfg.n_ref, rng)
    sigma_max = cfg.sigma_max or float(torch.pdist(torch.from_numpy(held[0][:2000])).max())
    return held, (torch.from_numpy(ref[0]).double(), torch.from_numpy(ref[1])), qcsbm.VESDE(cfg.sigma_min, sigma_max)


def seed_job(job):
    """One seed, start to end, in whichever process runs it: (seed, its table rows); seed 0 also draws the figure."""
    cfg, seed, show = job
    torch.set_num_threads(1)
    held, ref, sde = setup(cfg)
    rows, samples, fns = run_seed(cfg, seed, held, ref, sde, show)
    if seed == 0:
        plot(cfg, fns, samples, held, sde)
    return seed, rows


def run_seed(cfg, seed, held, ref, sde, show=True):
    torch.manual_seed(seed)
    nets = {"score": qcsbm.MLP(), "ce": Net(2), "dlsm": Net(2), "cond": Net(2, classes=2)}
    start = time.perf_counter()
    for kind in ("score", "ce", "dlsm", "cond"):                  # the DLSM classifier needs the trained score model
        train(cfg, kind, nets, sde, seed, show)
    train_seconds = time.perf_counter() - start
    fns = posterior_fns(cfg, nets, sde, *ref)
    gen = torch.Generator().manual_seed(20_000 + seed)
    x_held, y_held = torch.from_numpy(held[0]), torch.from_numpy(held[1])
    probes = []                                                   # (t, std, x_t, oracle posterior and likelihood)
    for t in map(float, toy.names(cfg.levels)):
        t_vec, std = torch.full((len(x_held),), t), float(sde.std(torch.tensor(t)))
        x_t = x_held + std * torch.randn(x_held.shape, generator=gen)
        probes.append((t_vec, std, x_t, *oracle_scores(x_t, t_vec, y_held, *ref, sde)))
    rows, samples = [], {}
    for m in cli.progress(METHODS, desc=f"seed {seed}: evaluate", leave=False, disable=not show):
        metrics, samples[m, 0], samples[m, 1] = evaluate(cfg, fns[m], probes, y_held, held, sde, gen)
        rows.append(dict(method=m, seed=seed, **metrics, train_seconds=train_seconds))
    return rows, samples, fns


@torch.no_grad()
def evaluate(cfg, fn, probes, y_held, held, sde, gen):
    """Score errors against (e) at the probes; precision / recall of each class's PC samples."""
    post_err, lik_err = [], []
    for t_vec, std, x_t, post_o, lik_o in probes:
        post, lik = fn(x_t, t_vec, y_held)
        post_err.append(float((0.5 * std ** 2 * (post - post_o).pow(2).sum(1)).mean()))
        lik_err.append(float((0.5 * std ** 2 * (lik - lik_o).pow(2).sum(1)).mean()))
    pr, samples = [], []
    for c in (0, 1):
        y = torch.full((cfg.n_samples,), c)
        x, _ = qcsbm.pc_sampler(lambda x, t: fn(x, t, y, likelihood=False)[0], sde.prior_sample((cfg.n_samples, 2), gen), sde,
                                cfg.sample_steps, generator=gen, snr=cfg.snr)
        samples.append(x.numpy())
        pr.append(prdc(held[0][held[1] == c], samples[-1], cfg.k))
    metrics = dict(precision=float(np.mean([p["precision"] for p in pr])),
                   recall=float(np.mean([p["recall"] for p in pr])),
                   posterior_error=float(np.mean(post_err)), likelihood_error=float(np.mean(lik_err)))
    return metrics, *samples


def plot(cfg, fns, samples, held, sde):
    """Columns (a)-(e). Rows 1-2: class 0's posterior score (white arrows: direction) at two noise levels over its
    error against (e) (colour); row 3: PC samples of class 0 (red) and 1 (blue) over the held-out data (grey)."""
    g = torch.linspace(-6, 6, 72)
    X, Y = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([X.ravel(), Y.ravel()], 1)
    y0, q = torch.zeros(len(pts), dtype=torch.long), slice(2, None, 5)
    fig, axes = plt.subplots(3, len(METHODS), figsize=(3.2 * len(METHODS), 9.5), squeeze=False, layout="constrained")
    for row, t in zip(axes, (0.2, 0.5)):
        t_vec, std = torch.full((len(pts),), t), float(sde.std(torch.tensor(t)))
        oracle = fns["e"](pts, t_vec, y0)[0]
        for ax, m in zip(row, METHODS):
            s = fns[m](pts, t_vec, y0)[0].detach()
            err = (0.5 * std ** 2 * (s - oracle).pow(2).sum(1)).view(X.shape)
            if m != "e":                                              # (e) is the reference: its error is 0
                im = ax.imshow(torch.log10(err.clamp_min(1e-3)).numpy(), origin="lower", extent=(-6, 6, -6, 6), cmap="magma",
                               vmin=-3, vmax=2)
            d = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
            ax.quiver(X[q, q].numpy(), Y[q, q].numpy(), d[:, 0].view(X.shape)[q, q].numpy(), d[:, 1].view(X.shape)[q, q].numpy(),
                      color="k" if m == "e" else "w", scale=25, width=0.006)
        row[0].set_ylabel(f"class-0 posterior score\nt = {t} (std {std:.2f})\n\nx2")
        fig.colorbar(im, ax=row.tolist(), fraction=0.02, label="log10 of 0.5 std² |s - s_oracle|²")
    for ax, m in zip(axes[2], METHODS):
        ax.scatter(*held[0].T, s=1, c="0.8")
        ax.scatter(*samples[m, 0].T, s=1, c="C3", label="class 0")
        ax.scatter(*samples[m, 1].T, s=1, c="C0", label="class 1")
        ax.legend(loc="lower left", fontsize=7, markerscale=5)
        ax.set_xlabel("x1")
    axes[2, 0].set_ylabel("PC samples over held-out data\n\nx2")
    for ax, m in zip(axes[0], METHODS):
        ax.set_title(NAMES[m], fontsize=10)
    for ax in axes.ravel():
        ax.set(xlim=(-6, 6), ylim=(-6, 6), aspect="equal")
    path = os.path.join(cfg.out_dir, "dlsm_moons.png")
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def markdown_table(rows):
    """Mean ± std over seeds, as toy.py's tables: no spread for one seed, and an exact 0 (the oracle's errors) as 0."""
    keys = ("precision", "recall", "posterior_error", "likelihood_error")
    lines = ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for m in METHODS:
        sel = [r for r in rows if r["method"] == m]
        lines.append(f"| {NAMES[m]} | " + " | ".join(toy.cell([r[k] for r in sel], k) for k in keys) + " |")
    return "\n".join(lines)


def write_table(cfg, rows) -> str:
    table = markdown_table(rows)
    with open(os.path.join(cfg.out_dir, "dlsm_table.md"), "w") as fh:
        fh.write(table + "\n")
    print(table)
    return table


def read_rows(cfg) -> list:
    """--experiment=table: the rows of a finished run's dlsm.csv in --out_dir."""
    path = os.path.join(cfg.out_dir, "dlsm.csv")
    if not os.path.exists(path):
        raise ValueError(f"--experiment=table found no dlsm.csv in {cfg.out_dir!r}; it rewrites the table of a "
                         f"finished run (pass that run's --out_dir)")
    with open(path) as fh:
        return [{k: toy.typed(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def main(argv=None):
    cfg = parse(sys.argv[1:] if argv is None else argv)
    if cfg.experiment == "table":
        rows = read_rows(cfg)
        write_table(cfg, rows)
        return rows
    print("config: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    start, threads = time.perf_counter(), torch.get_num_threads()
    sde = setup(cfg)[2]
    print(f"moons: VE SDE sigma {sde.sigma_min:g} -> {sde.sigma_max:.3g}")
    # Single-threaded seeds: a 2-D MLP is latency-bound, threads cost more than they give, and two processes use
    # both cores. Spawn: fork after torch has run threads is unsafe. A seed's results do not depend on the process.
    # One process shows each seed's training bars under the seeds bar; several show the seeds bar alone.
    pool = mp.get_context("spawn").Pool(min(cfg.workers, cfg.seeds)) if cfg.workers > 1 and cfg.seeds > 1 else None
    jobs = [(cfg, seed, pool is None) for seed in range(cfg.seeds)]
    torch.set_num_threads(1)
    done, by_seed = False, {}
    try:
        results = pool.imap_unordered(seed_job, jobs) if pool else map(seed_job, jobs)
        for seed, seed_rows in cli.progress(results, total=len(jobs), desc="seeds"):
            by_seed[seed] = seed_rows
            tqdm.write("\n".join(f"  seed {seed} {NAMES[r['method']]}: " + ", ".join(
                f"{k} {r[k]:.4g}" for k in ("precision", "recall", "posterior_error", "likelihood_error"))
                for r in seed_rows))
            rows = [r for s in sorted(by_seed) for r in by_seed[s]]
            toy.write_csv(os.path.join(cfg.out_dir, "dlsm.csv"), rows)
        done = True
    finally:
        torch.set_num_threads(threads)
        if pool:
            pool.close() if done else pool.terminate()    # let workers exit cleanly unless interrupted
            pool.join()
    write_table(cfg, rows)
    print(f"done in {time.perf_counter() - start:.0f} s; figure, CSV and table are in {os.path.abspath(cfg.out_dir)}")
    return rows


if __name__ == "__main__":
    cli.run(main)
