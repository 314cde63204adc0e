"""Section 6, Fig. 4: a one-layer autoencoder score model learns to be conservative without tied weights.

    s(x) = R h(W^T x + b) + c,   R, W in R^{D x H},   h(a) = a * sigmoid(beta * a)  (Swish, one beta per unit)

Its Jacobian is J(x) = R diag(h'(a)) W^T = sum_k h'(a_k) r_k w_k^T with a = W^T x + b. Tying R = W makes J
symmetric, but it is not the only way. The paper (after Im et al., 2016) writes the condition as
R W^T = W R^T; that is exact when all units share one slope h' (a linear h). With a nonlinear h the slopes
h'(a_k) vary independently with x, so J is symmetric everywhere iff each unit is, r_k w_k^T = w_k r_k^T:
r_k parallel to w_k, i.e. R = W Lambda with Lambda diagonal. That implies R W^T = W R^T and allows R != W.
(tests/test_autoencoder.py checks both, and that R = W S with S symmetric but not diagonal is not enough.)
Trained with L_QC alone, ||W R^T - R W^T||_F^2 falls by more than ten orders of magnitude; ||W - R||_F^2 does not.

    python autoencoder.py                        # Fig. 4: D = H = 2, exact 2x2 Jacobian, 10k steps
    python autoencoder.py --preset=wide          # D = 16, H = 32: Hutchinson L_QC (qcsbm.qc_loss)
    python autoencoder.py --preset=checkerboard  # also fit data: DSM at one noise level + lam * L_QC
"""
from __future__ import annotations

import csv
import os
import sys
from dataclasses import asdict, dataclass

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import cli
import qcsbm


@dataclass
class Config:
    dim: int = 2                  # D, data dimension (paper: 2)
    hidden: int = 2               # H, hidden units (paper: 2)
    steps: int = 10_000           # Adam steps (paper: 10000)
    lr: float = 1e-4              # Adam learning rate (paper: 1e-4)
    clip: float = 1.0             # gradient-norm clipping (paper: 1; 0 = off)
    grid: int = 40                # L_QC on a grid x grid grid over [-extent, extent]^2 (paper: 40);
                                  # for D > 2 on grid^2 fresh uniform points in the cube at every step
    extent: float = 10.0          # half-width of that region (paper: 10)
    estimator: str = "auto"       # L_QC from the exact Jacobian or by Hutchinson; auto: exact iff D == 2
    slices: int = 1               # Hutchinson probes per point
    data: str = "none"            # none: L_QC alone (the paper); or a toy.py data set: DSM + lam * L_QC
    sigma: float = 1.0            # with data: the one noise level DSM trains at (s has no time input)
    lam: float = 1.0              # with data: weight of L_QC (times sigma^2, as in qcsbm.training_loss)
    batch_size: int = 1000        # with data: data points per step
    seed: int = 8                 # seed of the initialization and of every draw (paper's figure: 8)
    log_every: int = 200          # steps between log lines (console and CSV)
    out_dir: str = ""             # output folder ('' = runs/autoencoder[_<preset>][_quick][_<what differs>]):
                                  # autoencoder.csv, autoencoder.png, results.md, model.pt
    preset: str = "paper"         # paper | wide | checkerboard (see PRESETS)
    quick: bool = False           # 300 steps on a 20x20 grid, for the tests

    def __post_init__(self):
        inf = float("inf")
        for key, ok, allowed in [
                ("dim", self.dim >= 1, "at least 1 dimension"), ("hidden", self.hidden >= 1, "at least 1 unit"),
                ("steps", self.steps >= 1, "at least 1 step"), ("lr", 0 < self.lr < inf, "a finite positive rate"),
                ("clip", 0 <= self.clip < inf, "a finite gradient-norm bound > 0, or 0 to turn clipping off"),
                ("grid", self.grid >= 1, "at least 1 point per side"),
                ("extent", 0 < self.extent < inf, "a finite half-width > 0"),
                ("slices", self.slices >= 1, "at least 1 probe"),
                ("sigma", 0 < self.sigma < inf, "a finite noise level > 0 (0 divides by zero in DSM)"),
                ("lam", 0 <= self.lam < inf, "a finite weight >= 0"),
                ("batch_size", self.batch_size >= 1, "at least 1 data point per step"),
                ("log_every", self.log_every >= 1, "at least 1 step between log lines")]:
            if not ok:
                raise ValueError(f"--{key}={getattr(self, key)!r} makes no sense: {key} takes {allowed}")


PRESETS = {"paper": {},
           "wide": {"dim": 16, "hidden": 32, "lr": 1e-3, "steps": 3000},
           "checkerboard": {"data": "checkerboard", "hidden": 64, "lr": 1e-2, "steps": 3000}}
QUICK = {"steps": 300, "log_every": 50, "grid": 20}
ESTIMATORS = ("auto", "exact", "hutchinson")


def parse(argv: list[str]) -> Config:
    """--key=value overrides of Config, applied in the order defaults < --preset < --quick < other keys."""
    cfg = cli.parse(Config, argv, PRESETS, "paper", QUICK)
    cfg.out_dir = cfg.out_dir or cli.run_dir("runs/autoencoder", cfg, PRESETS, "paper", QUICK, skip=("log_every",))
    if cfg.estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {cfg.estimator!r}; valid choices: {', '.join(ESTIMATORS)}")
    if cfg.data != "none" and (cfg.dim != 2 or cfg.data not in datasets()):
        raise ValueError(f"--data needs --dim=2 and one of: none, {', '.join(datasets())}; "
                         f"got --data={cfg.data} --dim={cfg.dim}")
    return cfg


def datasets() -> dict:
    """The 2-D data sets of toy.py: name -> sample(n, numpy rng) -> (n, 2) float32 array."""
    try:                                          # imported here: the paper's run does not need toy.py
        from toy import DATASETS
    except ImportError as e:
        raise ValueError(f"--data needs the data sets of toy.py, which failed to import: {e}") from None
    return DATASETS


class AutoencoderScore(nn.Module):
    """s(x) = R h(W^T x + b) + c with Swish h(a) = a sigmoid(beta a); R, W, b, c ~ U[-1, 1], beta = 1.
    A handful of parameters: it runs on the CPU, where it is fastest (on one thread)."""

    def __init__(self, D: int, H: int, generator: torch.Generator):
        super().__init__()
        u = lambda *shape: nn.Parameter(torch.rand(*shape, generator=generator) * 2 - 1)
        self.R, self.W, self.b, self.c = u(D, H), u(D, H), u(H), u(D)
        self.beta = nn.Parameter(torch.ones(H))

    def forward(self, x):                                                # (B, D) -> (B, D)
        a = x @ self.W + self.b                                          # (B, H)
        return (a * torch.sigmoid(self.beta * a)) @ self.R.T + self.c

    def jacobian(self, x):
        """J = R diag(h'(a)) W^T, (B, D, D), with h'(a) = sig + beta a sig (1 - sig), sig = sigmoid(beta a)."""
        a = x @ self.W + self.b
        sig = torch.sigmoid(self.beta * a)
        return torch.einsum("ik,bk,jk->bij", self.R, sig + self.beta * a * sig * (1 - sig), self.W)


def exact_lqc(J: torch.Tensor) -> torch.Tensor:
    """Eq. 9 without probes: tr(J J^T) - tr(J J) = 0.5 ||J - J^T||_F^2 per sample. We compute the right-hand
    side: it is never negative, whereas the difference of traces ends in float32 noise of either sign."""
    return 0.5 * ((J - J.transpose(1, 2)) ** 2).sum((1, 2))


def grid2d(lim: float, n: int) -> torch.Tensor:
    side = torch.linspace(-lim, lim, n)
    return torch.stack(torch.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2)      # (n^2, 2)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(sys.argv[1:] if argv is None else argv)
    os.makedirs(cfg.out_dir, exist_ok=True)
    g, rng = torch.Generator().manual_seed(cfg.seed), np.random.default_rng(cfg.seed)  # model / data
    model = AutoencoderScore(cfg.dim, cfg.hidden, g)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    exact = cfg.estimator == "exact" or (cfg.estimator == "auto" and cfg.dim == 2)
    sample = datasets()[cfg.data] if cfg.data != "none" else None
    grid = grid2d(cfg.extent, cfg.grid)                                  # the paper's 40 x 40 points
    print(f"autoencoder: D={cfg.dim} H={cfg.hidden} L_QC {'exact' if exact else 'Hutchinson'} data={cfg.data}")

    def noisy_data(n):                                                   # x_t = x0 + sigma z, z, std
        z = torch.randn(n, 2, generator=g)
        return torch.from_numpy(sample(n, rng)) + cfg.sigma * z, z, torch.full((n,), cfg.sigma)

    def losses():                                                        # (loss, mean L_QC, mean DSM)
        if sample is None:                                               # the paper: L_QC alone on a region
            x = (grid if cfg.dim == 2 else
                 (torch.rand(cfg.grid ** 2, cfg.dim, generator=g) * 2 - 1) * cfg.extent)
        else:  # DSM at one noise level: s fits the score of the data convolved with N(0, sigma^2 I).
            x, z, std = noisy_data(cfg.batch_size)
            dsm = qcsbm.dsm_from_score(model(x), z, std, std, "sigma2").mean()
        qc = (exact_lqc(model.jacobian(x)) if exact else
              qcsbm.qc_loss(model, x, qcsbm.draw_probes(x, cfg.slices, generator=g))).mean()
        return (qc, qc, torch.zeros(())) if sample is None else (dsm + cfg.lam * cfg.sigma ** 2 * qc, qc, dsm)

    path, png, rows = os.path.join(cfg.out_dir, "autoencoder.csv"), os.path.join(cfg.out_dir, "autoencoder.png"), []
    with open(path, "w", newline="") as fh:
        log = csv.writer(fh)
        log.writerow(["step", "lqc", "asym_weights", "weight_gap"] + ["dsm"] * (sample is not None))
        try:
            for step in (bar := cli.progress(range(cfg.steps + 1), desc="autoencoder", leave=False, mininterval=1)):
                loss, qc, dsm = losses()
                if step % cfg.log_every == 0 or step == cfg.steps:
                    R, W = model.R.detach(), model.W.detach()
                    rows.append(dict(step=step, lqc=qc.item(), asym_weights=((W @ R.T - R @ W.T) ** 2)
                                     .sum().item(), weight_gap=((W - R) ** 2).sum().item(), dsm=dsm.item()))
                    log.writerow(list(rows[-1].values())[:4 + (sample is not None)])
                    fh.flush()
                    bar.write("step {step:6d}  L_QC {lqc:.3e}  ||WR^T-RW^T||^2 {asym_weights:.3e}  ||W-R||^2 "
                              "{weight_gap:.3e}".format(**rows[-1]) + f"  DSM {dsm:.4f}" * (sample is not None))
                if step == cfg.steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()                                          # the one backward of the step
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip or float("inf"))  # 0: off
                opt.step()
        except KeyboardInterrupt:
            print("interrupted: the log so far is kept and plotted")
    torch.save({"model": model.state_dict(), "config": asdict(cfg), "step": rows[-1]["step"]},
               os.path.join(cfg.out_dir, "model.pt"))
    # Per unit: cos(r_k, w_k) = +-1 for every k means R = W diag(lambda), lambda_k = r_k.w_k / |w_k|^2.
    R, W = model.R.detach(), model.W.detach()
    result = dict(csv=path, png=png, rows=rows, cos=((R * W).sum(0) / (R.norm(dim=0) * W.norm(dim=0))).tolist(),
                  lam_k=((R * W).sum(0) / (W * W).sum(0)).tolist())
    if cfg.hidden <= 8:
        print("per unit k: cos(r_k, w_k) =", *(f"{c:+.6f}" for c in result["cos"]),
              "  lambda_k =", *(f"{l:+.4f}" for l in result["lam_k"]))

    # Fig. 4: both weight measures (and L_QC) against steps, log scale; with data, the fitted field beside it.
    fig, axes = plt.subplots(1, 2 if sample else 1, figsize=(10 if sample else 5.5, 3.8), squeeze=False)
    ax, steps = axes[0, 0], [r["step"] for r in rows]
    ax.semilogy(steps, [r["asym_weights"] for r in rows], label=r"$\|WR^T - RW^T\|_F^2$")
    ax.semilogy(steps, [r["weight_gap"] for r in rows], label=r"$\|W - R\|_F^2$")
    ax.semilogy(steps, [r["lqc"] for r in rows], "k:", label=r"$\mathcal{L}_{QC}$ (mean)")
    ax.set(xlabel="training step", ylabel="value (log scale)", title=f"one-layer autoencoder, D={cfg.dim}, H={cfg.hidden}")
    ax.legend()
    if sample:                                                           # how conservative is the fitted field?
        x, z, std = noisy_data(2000)
        asym, nasym = qcsbm.asymmetry(model, x)
        xg = grid2d(1.1 * x.abs().max().item(), 21)
        with torch.no_grad():
            dsm, s = qcsbm.dsm_from_score(model(x), z, std, std, "sigma2").mean().item(), model(xg)
        result.update(asym=asym.mean().item(), nasym=nasym.mean().item(), dsm=dsm)
        print(f"at 2000 fresh noisy points: Asym {result['asym']:.3e}  NAsym {result['nasym']:.3e}  "
              f"DSM {dsm:.4f}  ||WR^T-RW^T||^2 {rows[-1]['asym_weights']:.3e}  ||W-R||^2 "
              f"{rows[-1]['weight_gap']:.3e}")
        axes[0, 1].scatter(*x.T, s=1, c="0.75")
        S, side = s.reshape(21, 21, 2).numpy(), xg[:21, 0].numpy()
        lines = axes[0, 1].streamplot(side, side, S[..., 0], S[..., 1], density=1.2, linewidth=0.8,
                                      color=np.hypot(S[..., 0], S[..., 1]), cmap="viridis").lines
        fig.colorbar(lines, ax=axes[0, 1], label="|s(x)|")
        axes[0, 1].set(aspect="equal", xlabel="x1", ylabel="x2", title=f"learned s, {cfg.data}, sigma={cfg.sigma}, "
                       f"lam={cfg.lam}\nNAsym {result['nasym']:.1e} at noisy data (grey)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    write_results(cfg, rows, result)
    print(f"wrote {path}, {png}, {os.path.join(cfg.out_dir, 'results.md')} and {os.path.join(cfg.out_dir, 'model.pt')}")
    return result


def write_results(cfg: Config, rows: list[dict], result: dict):
    """The run's result as a one-row markdown table, with the command that made it, next to the figure."""
    import platform
    first, last = rows[0], rows[-1]
    run = cli.command("autoencoder.py", cfg, PRESETS, "paper", QUICK, skip=("out_dir",))
    cells = [f"`{run}`", str(last["step"]), f"{first['asym_weights']:.2g} → {last['asym_weights']:.2g}",
             f"{first['weight_gap']:.3g} → {last['weight_gap']:.3g}"]
    head = "| command | steps | ‖WRᵀ − RWᵀ‖²_F (start → end) | ‖W − R‖²_F (start → end) |"
    if "nasym" in result:
        cells += [f"{result['nasym']:.2g}", f"{result['dsm']:.3f}"]
        head += " NAsym at noisy data | DSM |"
    elif cfg.hidden <= 8:
        cells.append(", ".join(f"{l:.3f}" for l in result["lam_k"]))
        head += " λ_k (R = W diag λ) |"
    table = "\n".join([head, "|" + "---|" * len(cells), "| " + " | ".join(cells) + " |"])
    with open(os.path.join(cfg.out_dir, "results.md"), "w") as fh:
        fh.write(f"{table}\n\nSeed {cfg.seed}, torch {torch.__version__}, {platform.machine()}.\n")
    print(table)


if __name__ == "__main__":
    torch.set_num_threads(1)
    cli.run(main)
