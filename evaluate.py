"""Evaluate a train_images.py checkpoint: the numbers of the paper's Tables 2 and 3, without TensorFlow.

    python evaluate.py --ckpt=runs/cifar10/ckpt.pt --eval=nll,asym,sample,fid
    torchrun --nproc_per_node=8 evaluate.py --ckpt=runs/cifar10_qc_finetune/ckpt.pt --eval=sample,fid

  nll     bits/dim on the test split through the probability flow ODE (qcsbm.bits_per_dim: RK45 with
          rtol = atol = 1e-5, uniform dequantization), mean and standard error.
  asym    Asym and NAsym (Eqs. 6-7) at test points perturbed at a random t each: exact Jacobians when
          D <= 256 (digits, D = 64: the K-probe estimate is reported beside it), K probes otherwise.
  sample  predictor-corrector samples (1000 steps, snr 0.16 for CIFAR-10 VE, noise-free last step) as a
          uint8 npz and a PNG grid. Sample i always comes from seed (seed, i), whatever the number of
          processes or the batch size.
  fid     FID and IS with the FID Inception network (torch-fidelity's port of the 2015 TensorFlow graph),
          precision / recall / density / coverage (k = 3) on the same features, the training set as
          reference (statistics cached). On digits a small classifier replaces Inception: "digits-FID",
          NOT comparable with Inception FID.

Work is cut into batches; batch b runs on rank b % world_size and is saved under out_dir/parts as soon
as it is done, so an interrupted evaluation resumes where it stopped. Results: out_dir/results.json.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import qcsbm
from metrics import prdc
from image_io import DATASETS, cleanup_distributed, load_dataset, model_from_checkpoint, setup_distributed


@dataclass
class EvalConfig:
    ckpt: str = ""                      # checkpoint of train_images.py, or in score_sde's format (required)
    data: str = ""                      # data set of a score_sde-format --ckpt (ours record theirs)
    eval: str = "nll,asym,sample,fid"   # comma-separated subset of: nll, asym, sample, fid
    out_dir: str = ""                   # results and resumable parts (default: <ckpt dir>/eval)
    data_dir: str = ""                  # where load_dataset finds the data ('' = the checkpoint's data_dir)
    cache_dir: str = "runs/cache"       # reference feature statistics and the digits classifier
    use_ema: bool = True                # evaluate the EMA weights (paper: yes)
    seed: int = 0                       # every random number below derives from it
    batch_size: int = 128               # per process
    nll_n: int = 0                      # test points for NLL (0 = the whole test split)
    tol: float = 1e-5                   # RK45 rtol = atol of the likelihood ODE (paper: 1e-5)
    asym_n: int = 1000                  # test points for Asym / NAsym, each at its own random t
    slices: int = 16                    # probes K of the Asym estimator when D > 256 (and beside exact)
    n_samples: int = 50000              # samples for FID / IS / precision / recall (paper: 50k)
    sampler: str = "pc"                 # pc | em | ode
    steps: int = 1000                   # sampler steps (paper: 1000)
    snr: float = 0.16                   # PC corrector signal-to-noise ratio (paper, CIFAR-10 VE: 0.16)
    k: int = 3                          # nearest neighbours of precision / recall (paper: 3)
    inception_weights: str = ""         # torch-fidelity's Inception weights (default: the torch hub cache)
    device: str = "auto"                # auto | cpu | cuda | mps
    quick: bool = False                 # a tiny version of everything, for tests and smoke runs


# Settings per data set, applied under the command line; --quick goes on top of them.
PRESETS = {"digits": dict(n_samples=1000, batch_size=500, steps=500, asym_n=512, slices=64)}  # as train_images
QUICK = dict(nll_n=8, asym_n=8, n_samples=8, steps=10, tol=1e-3, batch_size=4)
EVALS = ("nll", "asym", "sample", "fid")
# Settings that do not change the numbers (or name the inputs), left out of the default out_dir's name.
NOT_IN_NAME = ("ckpt", "data", "eval", "out_dir", "data_dir", "cache_dir", "inception_weights", "device",
               "batch_size")
EXACT_MAX_D = 256        # form the full D x D Jacobian up to this D
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE


# ---- Metrics on feature sets ----
# FID is the Frechet (2-Wasserstein) distance between Gaussians fitted to two feature sets:
#   ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}).
# S1 S2 is not symmetric, but it is similar to M = S1^{1/2} S2 S1^{1/2}, which is symmetric PSD, so
# tr (S1 S2)^{1/2} = sum_i sqrt(eig_i(M)): two symmetric eigendecompositions, no complex parts to trim.

def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr (S1 S2)^{1/2}, via eigh of S1^{1/2} S2 S1^{1/2}."""
    w, V = np.linalg.eigh(sigma1)
    root1 = (V * np.sqrt(np.clip(w, 0, None))) @ V.T                     # S1^{1/2}
    ev = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()                     # round-off can make ev < 0
    diff = np.asarray(mu1) - np.asarray(mu2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp E_x KL(p(y|x) || p(y)), mean and std over `splits` disjoint parts (the usual protocol)."""
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), 1)
    scores = []
    for part in logp.chunk(splits):
        logpy = torch.logsumexp(part, 0) - math.log(len(part))           # log of the marginal p(y)
        scores.append(math.exp((part.exp() * (part - logpy)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---- Feature networks ----
# Images: the FID Inception network from torch-fidelity (needs torchvision), weights from a local file
# or the torch hub cache, never downloaded here. Digits (8x8): Inception makes no sense, so we train a
# small MLP classifier once (fixed seed, one thread, so it is the same network everywhere) and use its
# 64-d penultimate features.

def inception_network(weights: str, device):
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError("FID / IS need the FID Inception network from torch-fidelity (and torchvision): "
                          "pip install torch-fidelity") from e
    path = Path(weights or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    if not path.exists():
        raise FileNotFoundError(f"Inception weights not found at {path}: download {INCEPTION_URL} on a "
                                f"machine with network and put it there, or pass --inception_weights=PATH")
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(path))
    return net.to(device).eval()


@torch.no_grad()
def inception_features(net, images: np.ndarray, device, batch_size: int = 200):
    """uint8 (N, H, W, C) -> (pool features (N, 2048), logits (N, 1008)); gray images become RGB."""
    pools, logits = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="inception", leave=False):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).to(device)
        p, l = net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
        pools.append(p.cpu().numpy()), logits.append(l.cpu().numpy())
    return np.concatenate(pools), np.concatenate(logits)


DIGITS_CLF = dict(hidden=(128, 64), epochs=400, lr=3e-3, weight_decay=1e-3, noise=0.1, n_train=1500, seed=0)


def digits_classifier(cache_dir: str) -> tuple[nn.Sequential, float]:
    """An MLP 64-128-64-10 on sklearn's 8x8 digits (pixels / 16, a seeded shuffle: 1500 to train with
    N(0, 0.1^2) pixel noise added, so that slightly noisy samples are still read, 297 to test); cached
    under cache_dir, keyed by a hash of its settings. -> (net, test accuracy)"""
    from sklearn.datasets import load_digits
    s = DIGITS_CLF
    path = Path(cache_dir) / f"digits_classifier_{settings_key(**s)}.pt"
    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(s["seed"]).permutation(len(X))
    X, y = torch.tensor(X[perm] / 16.0, dtype=torch.float32), torch.tensor(y[perm])
    n = s["n_train"]
    torch.manual_seed(s["seed"])
    net = nn.Sequential(nn.Linear(64, s["hidden"][0]), nn.SiLU(), nn.Linear(*s["hidden"]), nn.SiLU(),
                        nn.Linear(s["hidden"][1], 10))
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)                                          # bit-reproducible on CPU
        opt = torch.optim.Adam(net.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
        for _ in range(s["epochs"]):                                      # full-batch training
            opt.zero_grad()
            F.cross_entropy(net(X[:n] + s["noise"] * torch.randn(n, 64)), y[:n]).backward()
            opt.step()
        torch.set_num_threads(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
    with torch.no_grad():
        acc = float((net(X[n:]).argmax(1) == y[n:]).float().mean())
    return net.eval(), acc


@torch.no_grad()
def digits_features(net, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 8, 8, 1) -> (penultimate features (N, 64), class probabilities (N, 10))."""
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255)
    h = net[:4](x)
    return h.numpy(), torch.softmax(net[4](h), 1).numpy()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [0, 1], (N, C, H, W) float -> (N, H, W, C) uint8, the layout FID tools expect."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---- Resumable work split across ranks ----

def run_batches(part_dir: Path, n: int, batch_size: int, work, desc: str) -> dict:
    """Run work(b, lo, hi) -> {name: array} on the batches [lo, hi) of n items; batch b on rank b % world.
    Each batch is saved to part_dir/b.npz when done and skipped when already there (resume). Returns
    every batch's arrays concatenated in order, on every rank."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    part_dir.mkdir(parents=True, exist_ok=True)
    n_batches = math.ceil(n / batch_size)
    mine = range(rank, n_batches, world)
    todo = [b for b in mine if not (part_dir / f"{b:06d}.npz").exists()]
    if rank == 0 and len(todo) < len(mine):
        print(f"{desc}: resuming from {part_dir}, {len(mine) - len(todo)} of rank 0's {len(mine)} batches done")
    for b in cli.progress(todo, desc=desc, disable=rank != 0):
        out = work(b, b * batch_size, min(n, (b + 1) * batch_size))
        np.savez(part_dir / f"{b:06d}.tmp.npz", **out)
        os.replace(part_dir / f"{b:06d}.tmp.npz", part_dir / f"{b:06d}.npz")    # never a half-written part
    if dist.is_initialized():
        dist.barrier()
    parts = [np.load(part_dir / f"{b:06d}.npz") for b in range(n_batches)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files}


def settings_key(**kw) -> str:
    """A short hash of everything a part depends on, so parts of different settings never mix."""
    return hashlib.sha1(json.dumps(kw, sort_keys=True, default=str).encode()).hexdigest()[:10]


def mean_se(a) -> tuple[float, float]:
    a = np.asarray(a, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")


# ---- The evaluations ----

def eval_nll(cfg, ev, parts: Path) -> dict:
    x = ev.test[:cfg.nll_n or len(ev.test)]
    n_bins = DATASETS[ev.dataset][2]                                     # 17 levels for digits, else 256

    def work(b, lo, hi):
        g = torch.Generator(ev.device).manual_seed(cfg.seed * 1_000_003 + b)  # dequantization + probe
        bpd, nfe = qcsbm.bits_per_dim(ev.score_fn, x[lo:hi].to(ev.device), ev.sde, rtol=cfg.tol,
                                      atol=cfg.tol, n_bins=n_bins, generator=g)
        return {"bpd": bpd.cpu().numpy(), "nfe": np.array([nfe])}

    key = settings_key(n=len(x), bs=cfg.batch_size, seed=cfg.seed, tol=cfg.tol, **ev.model_id)
    out = run_batches(parts / f"nll_{key}", len(x), cfg.batch_size, work, "NLL batches")
    m, se = mean_se(out["bpd"])
    return {"nll_bpd": m, "nll_bpd_se": se, "nll_n": len(x), "nll_mean_nfe": float(out["nfe"].mean())}


def eval_asym(cfg, ev, parts: Path) -> dict:
    x0 = ev.test[:cfg.asym_n]
    exact = x0[0].numel() <= EXACT_MAX_D

    def work(b, lo, hi):
        g = torch.Generator(ev.device).manual_seed(cfg.seed * 1_000_003 + b)
        x = x0[lo:hi].to(ev.device)
        t = ev.sde.eps + (ev.sde.T - ev.sde.eps) * torch.rand(len(x), generator=g, device=ev.device)
        mean, std = ev.sde.marginal(x, t)
        x_t = mean + qcsbm.bcast(std, x) * qcsbm.randn_like(x, g)         # a test point perturbed at t
        s = lambda y: ev.score_fn(y, t)                                   # the score at this batch's t
        asym_k, nasym_k = qcsbm.asymmetry(s, x_t, slices=cfg.slices, generator=g)
        out = {"asym_probe": asym_k.cpu().numpy(), "nasym_probe": nasym_k.cpu().numpy()}
        if exact:
            asym, nasym = qcsbm.asymmetry(s, x_t, slices=None)
            out |= {"asym_exact": asym.cpu().numpy(), "nasym_exact": nasym.cpu().numpy()}
        return out

    key = settings_key(n=len(x0), bs=cfg.batch_size, seed=cfg.seed, K=cfg.slices, **ev.model_id)
    out = run_batches(parts / f"asym_{key}", len(x0), cfg.batch_size, work, "Asym batches")
    res = {"asym_n": len(x0), "asym_slices": cfg.slices}
    for name, a in out.items():
        res[name], res[name + "_se"] = mean_se(a)
    main_ = "exact" if exact else "probe"
    for name in ("asym", "nasym", "asym_se", "nasym_se"):
        res[name] = res[name.replace("sym", f"sym_{main_}", 1)]
    res["asym_method"] = main_
    return res


def eval_sample(cfg, ev, parts: Path) -> dict:
    if cfg.sampler not in qcsbm.SAMPLERS or cfg.sampler == "langevin":
        raise ValueError(f"unknown sampler {cfg.sampler!r}; valid choices: pc, em, ode")
    sampler, opts = qcsbm.SAMPLERS[cfg.sampler], {"snr": cfg.snr} if cfg.sampler == "pc" else {}
    shape = tuple(ev.test.shape[1:])

    def work(b, lo, hi):
        gens = [torch.Generator(ev.device).manual_seed(cfg.seed * 2 ** 32 + i) for i in range(lo, hi)]
        x = ev.sde.prior_sample((hi - lo, *shape), generator=gens, device=ev.device)
        bar = cli.progress(total=cfg.steps, desc=f"sampling {lo}:{hi}", leave=False, disable=ev.rank != 0)
        x, nfe = sampler(ev.score_fn, x, ev.sde, cfg.steps, generator=gens,
                         callback=lambda *_: bar.update(), **opts)
        bar.close()
        return {"x": x.cpu().numpy(), "nfe": np.array([nfe])}

    key = settings_key(n=cfg.n_samples, seed=cfg.seed, sampler=cfg.sampler, steps=cfg.steps, snr=cfg.snr,
                       bs=cfg.batch_size, **ev.model_id)
    out = run_batches(parts / f"sample_{key}", cfg.n_samples, cfg.batch_size, work, "sample batches")
    images = to_uint8(torch.from_numpy(out["x"]))
    if ev.rank == 0:
        np.savez(Path(cfg.out_dir) / "samples.npz", samples=images)      # (N, H, W, C) uint8
        save_grid(images[:100], Path(cfg.out_dir) / "samples.png")
    return {"samples_n": len(images), "sample_nfe": float(out["nfe"].mean()), "samples": images}


def save_grid(images: np.ndarray, path: Path):
    import matplotlib.pyplot as plt
    n = math.ceil(math.sqrt(len(images)))
    H, W, C = images.shape[1:]
    grid = np.full((n * (H + 1), n * (W + 1), C), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, n)
        grid[r * (H + 1):r * (H + 1) + H, c * (W + 1):c * (W + 1) + W] = im
    scale = max(1, 512 // len(grid))                                      # small images: upscale, nearest
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    plt.imsave(path, grid[..., 0] if C == 1 else grid, cmap="gray")


def eval_fid(cfg, ev, images: np.ndarray) -> dict:
    """FID, IS (Inception) or digits-FID and classifier statistics, and PRDC, against the training set."""
    train = to_uint8(load_dataset(ev.dataset, cfg.data_dir, "train"))
    if ev.dataset == "digits":
        net, acc = digits_classifier(cfg.cache_dir)
        feats = lambda ims: digits_features(net, ims)
        tag = f"digits_classifier_{settings_key(**DIGITS_CLF)}"
    else:
        net = inception_network(cfg.inception_weights, ev.device)
        feats = lambda ims: inception_features(net, ims, ev.device)
        tag = "inception"
    ref_path = Path(cfg.cache_dir) / f"ref_{ev.dataset}_{tag}_{len(train)}.npz"
    if not ref_path.exists():                                             # computed once, then cached
        f_train = feats(train)[0]
        keep = np.random.default_rng(0).permutation(len(f_train))[:10000]  # real points kept for PRDC
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(str(ref_path) + ".tmp.npz", *feature_stats(f_train), f_train[keep])
        os.replace(str(ref_path) + ".tmp.npz", ref_path)
    ref = np.load(ref_path)
    mu_r, sigma_r, f_real = ref["arr_0"], ref["arr_1"], ref["arr_2"]
    f_fake, probs = feats(images)
    n = min(len(f_real), len(f_fake))
    res = {f"{k}": v for k, v in prdc(f_real[:n], f_fake[:n], k=cfg.k).items()}
    fd = frechet_distance(*feature_stats(f_fake), mu_r, sigma_r)
    if ev.dataset == "digits":
        conf = probs.max(1)
        fd_real = frechet_distance(*feature_stats(feats(to_uint8(ev.test))[0]), mu_r, sigma_r)
        return res | {"digits_fid": fd, "fid_n": len(images), "classifier_test_acc": acc,
                      "digits_fid_real_test": fd_real, "real_test_n": len(ev.test),   # the floor
                      "samples_confident": float((conf >= 0.9).mean()),
                      "samples_class_hist": np.bincount(probs.argmax(1), minlength=10).tolist()}
    is_mean, is_std = inception_score(probs)
    return res | {"fid": fd, "fid_n": len(images), "is": is_mean, "is_std": is_std}


class Evaluation:
    """What every evaluation needs: the model's score function, its SDE, the test split, the rank."""

    def __init__(self, cfg: EvalConfig, model, train: dict, step, device, rank: int):
        self.dataset, self.device, self.rank = train["data"], device, rank
        self.param = "c" if train["method"] == "c" else "u"              # QC is a U model (Eq. 10)
        self.sde = qcsbm.VESDE(train["sigma_min"], train["sigma_max"])
        self.test = load_dataset(self.dataset, cfg.data_dir, "test")
        self.model_id = dict(ckpt=str(Path(cfg.ckpt).resolve()), step=step, ema=cfg.use_ema)
        model = model.to(device).eval()
        self.score_fn = lambda x, t: qcsbm.score(model, x, t, self.sde, self.param)


def main(argv: list[str] | None = None) -> dict:
    note = "\n".join(f"on a {data} checkpoint the defaults are: " + " ".join(f"--{k}={v}" for k, v in over.items())
                     for data, over in PRESETS.items())
    user = cli.parse_overrides(EvalConfig, sys.argv[1:] if argv is None else argv, quick=QUICK, note=note)
    if not user.get("ckpt"):
        raise ValueError("--ckpt=PATH is required (a checkpoint written by train_images.py, or a "
                         "score_sde-format one with --data=NAME)")
    evals = [e for e in user.get("eval", EvalConfig.eval).split(",") if e]
    if bad := [e for e in evals if e not in EVALS]:
        raise ValueError(f"unknown evaluation(s) {bad}; valid choices: {', '.join(EVALS)}")
    rank, world, _, device = setup_distributed(user.get("device", "auto"))
    try:
        model, train, step = model_from_checkpoint(user["ckpt"], user.get("use_ema", True), user.get("data", ""))
        cfg = EvalConfig(**(PRESETS.get(train["data"], {}) | (QUICK if user.get("quick") else {}) | user))
        # <ckpt dir>/eval for the default evaluation; eval_quick, eval_nll_n-100, ... for other settings
        cfg.out_dir = cfg.out_dir or cli.run_dir(str(Path(cfg.ckpt).parent / "eval"), cfg, PRESETS, train["data"],
                                                 QUICK, skip=NOT_IN_NAME)
        cfg.data_dir = cfg.data_dir or train["data_dir"]
        ev = Evaluation(cfg, model, train, step, device, rank)
        parts = Path(cfg.out_dir) / "parts"
        results = {"ckpt": cfg.ckpt, "step": step, "dataset": ev.dataset, "method": train["method"],
                   "world_size": world, "settings": asdict(cfg)}
        if rank == 0:
            print(f"evaluating {cfg.ckpt} (step {'unknown' if step is None else step}, {'EMA' if cfg.use_ema else 'raw'} weights, "
                  f"{ev.dataset}, {train['method'].upper()}) on {world} process(es): {', '.join(evals)}")
        if "nll" in evals:
            results |= eval_nll(cfg, ev, parts)
        if "asym" in evals:
            results |= eval_asym(cfg, ev, parts)
        if "sample" in evals or "fid" in evals:
            images = eval_sample(cfg, ev, parts)
            results |= {k: v for k, v in images.items() if k != "samples"}
        if "fid" in evals and rank == 0:
            results |= eval_fid(cfg, ev, images["samples"])
        if rank == 0:
            path = Path(cfg.out_dir) / "results.json"
            merged = (json.loads(path.read_text()) if path.exists() else {}) | results
            path.write_text(json.dumps(merged, indent=1))
            print_table(results)
            print(f"results in {path}")
        return results
    finally:
        cleanup_distributed()


def print_table(r: dict):
    """One row per metric: value (+- standard error, or IS's std over splits) and the number of points."""
    rows = [("NLL (bits/dim)", "nll_bpd", "nll_n"), ("Asym", "asym", "asym_n"), ("NAsym", "nasym", "asym_n"),
            ("Asym, exact", "asym_exact", "asym_n"), ("NAsym, exact", "nasym_exact", "asym_n"),
            (f"Asym, {r.get('asym_slices')} probes", "asym_probe", "asym_n"),
            (f"NAsym, {r.get('asym_slices')} probes", "nasym_probe", "asym_n"),
            ("FID", "fid", "fid_n"), ("digits-FID (NOT Inception FID)", "digits_fid", "fid_n"),
            ("digits-FID of real test digits", "digits_fid_real_test", "real_test_n"),
            ("IS", "is", "fid_n"), (f"precision (k={r['settings']['k']})", "precision", "fid_n"),
            (f"recall (k={r['settings']['k']})", "recall", "fid_n"), ("density", "density", "fid_n"),
            ("coverage", "coverage", "fid_n"), ("samples read with p >= 0.9", "samples_confident", "fid_n"),
            ("classifier accuracy, real test digits", "classifier_test_acc", None)]
    print("| metric | value | n |\n|---|---|---|")
    for label, key, n in rows:
        err = r.get(key + "_se", r.get(key + "_std"))
        if key in r:
            print(f"| {label} | {r[key]:.4g}{f' +- {err:.2g}' if err is not None else ''} | {r.get(n, '')} |")


if __name__ == "__main__":
    cli.run(main)
