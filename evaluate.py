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
          reference (statistics cached, keyed by the data and the weights) or --fid_stats=mu/sigma.npz.
          Library, weights and statistics are checked before any sampling. On digits a small classifier
          replaces Inception: "digits-FID", NOT comparable with Inception FID.

Work is cut into batches; batch b runs on rank b % world_size and is saved under out_dir/parts as soon
as it is done, so an interrupted evaluation resumes where it stopped. Results: out_dir/results.json.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import image_io
import qcsbm
from image_io import (DATASETS, cleanup_distributed, load_dataset, model_from_checkpoint, save_grid,
                      setup_distributed, to_uint8)
from metrics import prdc


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
    sample_steps: int = 1000                   # sampler steps (paper: 1000)
    snr: float = 0.16                   # PC corrector signal-to-noise ratio (paper, CIFAR-10 VE: 0.16)
    k: int = 3                          # nearest neighbours of precision / recall (paper: 3)
    inception_weights: str = ""         # torch-fidelity's Inception weights (default: the torch hub cache)
    fid_stats: str = ""                 # reference mu / sigma npz as pytorch-fid writes it ('' = training set)
    is_splits: int = 1                  # IS over this many parts (paper's code: 1; Salimans et al.: 10)
    device: str = "auto"                # auto | cpu | cuda | mps
    quick: bool = False                 # a tiny version of everything, for tests and smoke runs

    def __post_init__(self):
        checks = [("tol", math.isfinite(self.tol) and self.tol > 0, "a finite tolerance > 0 (1e-5 in the "
                   "paper; 0 would never let the ODE solver finish)"),
                  ("nll_n", self.nll_n >= 0, "a number of test points >= 0 (0 = the whole test split)"),
                  ("asym_n", self.asym_n >= 1, "at least 1 test point"),
                  ("slices", self.slices >= 1, "at least 1 probe"),
                  ("batch_size", self.batch_size >= 1, "at least 1 item per batch"),
                  ("sample_steps", self.sample_steps >= 1, "at least 1 sampler step"),
                  ("snr", math.isfinite(self.snr) and self.snr > 0, "a finite positive signal-to-noise ratio"),
                  ("device", self.device in ("auto", "cpu", "cuda", "mps"), "one of auto, cpu, cuda, mps")]
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"--{key}={getattr(self, key)!r} makes no sense: {key} takes {allowed}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device=cuda, but this machine has no CUDA device that torch can use; "
                             "use --device=cpu or --device=auto")


# Settings for a digits checkpoint (small and cheap), applied under the command line; --quick goes on top.
DIGITS = dict(n_samples=1000, batch_size=500, sample_steps=500, asym_n=512, slices=64)
QUICK = dict(nll_n=8, asym_n=8, n_samples=8, sample_steps=10, tol=1e-3, batch_size=4)
EVALS = ("nll", "asym", "sample", "fid")
# Settings that do not change the numbers (or name the inputs), left out of the default out_dir's name.
NOT_IN_NAME = ("ckpt", "data", "eval", "out_dir", "data_dir", "cache_dir", "inception_weights", "device",
               "batch_size")
EXACT_MAX_D = 256        # form the full D x D Jacobian up to this D
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d"     # the published file's SHA-256 starts so (torch hub names files this way)
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
FID_INSTALL = ("install the torchvision built for your torch (the same CUDA or CPU build), then "
               "pip install -r requirements-fid.txt (README, 'FID and IS')")


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


def frechet_distance_to(feats: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """frechet_distance(*feature_stats(feats), mu, sigma), in O(N^3) rather than O(d^3) when there are
    fewer points N than dimensions d. With A = the centred points / sqrt(N - 1), S1 = A^T A, and the non-zero
    eigenvalues of S1 S2 = A^T (A S2) are those of the N x N PSD matrix A S2 A^T."""
    feats = np.asarray(feats, dtype=np.float64)
    N, d = feats.shape
    if N >= d:
        return frechet_distance(*feature_stats(feats), mu, sigma)
    A = (feats - feats.mean(0)) / math.sqrt(N - 1)                       # (N, d)
    ev = np.linalg.eigvalsh(A @ sigma @ A.T)                             # (N,)
    diff = feats.mean(0) - np.asarray(mu)
    tr_S1 = (A * A).sum()                                                # tr A^T A = ||A||_F^2
    return float(diff @ diff + tr_S1 + np.trace(sigma) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def inception_score(logits: np.ndarray, splits: int = 1) -> tuple[float, float]:
    """IS = exp E_x KL(p(y|x) || p(y)), mean and std over `splits` consecutive parts. splits=1 (all samples
    at once) is what the paper's code reports (score_sde: tfgan's classifier_score_from_logits on all 50k);
    Salimans et al.'s protocol is 10 parts."""
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
    """torch-fidelity's FID Inception network from a local weights file -> (net, SHA-256 of the file).
    A missing library, a missing file or a file of another format is a one-line error."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:                                      # torch-fidelity, or its torchvision
        what = "torchvision (torch-fidelity needs it)" if "torchvision" in (e.name or "") else "torch-fidelity"
        raise ImportError(f"FID / IS need {what}, which is not installed: {FID_INSTALL}") from e
    except RuntimeError as e:       # e.g. 'operator torchvision::nms does not exist': another torch's build
        raise ImportError(f"torchvision cannot load beside torch {torch.__version__} ({e}): it was built for "
                          f"another torch; {FID_INSTALL}") from e
    path = Path(weights or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    if not path.exists():
        raise FileNotFoundError(f"Inception weights not found at {path}: download {INCEPTION_URL} on a "
                                f"machine with network and put it there, or pass --inception_weights=PATH")
    blob = path.read_bytes()
    try:                            # the real file is a plain {name: tensor} dict written by torch.save
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a PyTorch weights file ({type(e).__name__}); "
                         f"expected {INCEPTION_FILE}") from None
    if not (isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values())):
        raise ValueError(f"{path} holds no {{name: tensor}} dict; expected the state dict {INCEPTION_FILE}")
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(path))
    except RuntimeError as e:                                             # load_state_dict: names or shapes
        detail = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise ValueError(f"{path} does not hold the FID Inception weights ({INCEPTION_FILE}): "
                         f"{detail[:160]}{'...' if len(detail) > 160 else ''}") from None
    return net.to(device).eval(), hashlib.sha256(blob).hexdigest()


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


# ---- Resumable work split across ranks ----

def run_batches(part_dir: Path, n: int, batch_size: int, work, desc: str) -> dict:
    """Run work(b, lo, hi) -> {name: array} on the batches [lo, hi) of n items; batch b on rank b % world.
    Each batch is saved to part_dir/b.npz when done and skipped when already there (resume). Returns
    every batch's arrays concatenated in order, on every rank."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    part_dir.mkdir(parents=True, exist_ok=True)
    n_batches = math.ceil(n / batch_size)
    mine = range(rank, n_batches, world)
    todo = [b for b in mine if not usable_part(part_dir / f"{b:06d}.npz")]
    if rank == 0 and len(todo) < len(mine):
        print(f"{desc}: resuming from {part_dir}, {len(mine) - len(todo)} of rank 0's {len(mine)} batches done")
    for b in cli.progress(todo, desc=desc, disable=rank != 0):
        out = work(b, b * batch_size, min(n, (b + 1) * batch_size))
        np.savez(part_dir / f"{b:06d}.tmp.npz", **out)
        os.replace(part_dir / f"{b:06d}.tmp.npz", part_dir / f"{b:06d}.npz")    # never a half-written part
    if dist.is_initialized():
        dist.barrier()
    parts = [read_part(part_dir / f"{b:06d}.npz") for b in range(n_batches)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def read_part(path: Path) -> dict:
    """Every array of one part file, read in full (so a damaged file fails here, not later)."""
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def usable_part(path: Path) -> bool:
    """True if the part at `path` exists and reads in full; a damaged one (truncated by a full disk, a
    copy cut short) is removed with a warning, to be computed again."""
    if not path.exists():
        return False
    try:
        read_part(path)
        return True
    except Exception as e:
        print(f"warning: {path} is damaged ({type(e).__name__}: {str(e)[:120]}); computing that batch again",
              file=sys.stderr)
        path.unlink(missing_ok=True)
        return False


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
        x_t, t, *_ = qcsbm.perturb(x, ev.sde, generator=g)                # test points, each at its own t
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
        bar = cli.progress(total=cfg.sample_steps, desc=f"sampling {lo}:{hi}", leave=False, disable=ev.rank != 0)
        x, nfe = sampler(ev.score_fn, x, ev.sde, cfg.sample_steps, generator=gens,
                         callback=lambda *_: bar.update(), **opts)
        bar.close()
        return {"x": x.cpu().numpy(), "nfe": np.array([nfe])}

    key = settings_key(n=cfg.n_samples, seed=cfg.seed, sampler=cfg.sampler, steps=cfg.sample_steps, snr=cfg.snr,
                       bs=cfg.batch_size, **ev.model_id)
    out = run_batches(parts / f"sample_{key}", cfg.n_samples, cfg.batch_size, work, "sample batches")
    images = to_uint8(torch.from_numpy(out["x"]))
    if ev.rank == 0:
        np.savez(Path(cfg.out_dir) / "samples.npz", samples=images)      # (N, H, W, C) uint8
        save_grid(images[:100], Path(cfg.out_dir) / "samples.png")
    return {"samples_n": len(images), "sample_nfe": float(out["nfe"].mean()), "samples": images}


@dataclass
class FidSetup:
    """What --eval=fid needs, made before any sampling so that a missing library, weights file or
    statistics file fails at once, not after hours of sampling."""
    features: Callable     # uint8 images (N, H, W, C) -> (features (N, dim), logits or class probabilities)
    net_id: str            # the network and its weights, for the reference-statistics cache key
    dim: int               # 2048 (Inception pool features) or 64 (digits classifier)
    stats: tuple | None    # (mu, sigma) from --fid_stats, or None: the training set's
    classifier_acc: float | None = None                                  # digits only


def fid_setup(cfg, dataset: str, device) -> FidSetup:
    if dataset == "digits":
        net, acc = digits_classifier(cfg.cache_dir)
        print("digits: FID uses our digits classifier's 64-d features, not Inception: the result is "
              "digits-FID, NOT comparable with Inception FID")
        net_id = f"digits_classifier_{settings_key(**DIGITS_CLF)}"
        out = FidSetup(lambda ims: digits_features(net, ims), net_id, 64, None, acc)
    else:
        net, sha = inception_network(cfg.inception_weights, device)
        other = "" if sha.startswith(INCEPTION_SHA256) else ", NOT the published file: numbers not comparable"
        print(f"FID / IS: torch-fidelity's FID Inception network, weights "
              f"{cfg.inception_weights or 'from the torch hub cache'} (SHA-256 {sha[:8]}...{other})")
        out = FidSetup(lambda ims: inception_features(net, ims, device), f"inception_{sha[:16]}", 2048, None)
    if cfg.fid_stats:
        out.stats = load_fid_stats(cfg.fid_stats, out.dim)
    return out


def load_fid_stats(path: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an npz with arrays 'mu' (dim,) and 'sigma' (dim, dim), as pytorch-fid writes them."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--fid_stats: {path} not found")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(f"--fid_stats: cannot read {path} as an npz ({type(e).__name__})") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(f"--fid_stats: {path} holds {sorted(arrays)}; expected 'mu' and 'sigma' "
                         f"(pytorch-fid's format)")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        d, hint = mu.shape[0] if mu.ndim == 1 else mu.shape, " (pytorch-fid's --dims=2048)" if dim == 2048 else ""
        raise ValueError(f"--fid_stats: {path} holds statistics of {d}-d features (mu {mu.shape}, sigma "
                         f"{sigma.shape}); ours are {dim}-d{hint}")
    return mu, sigma


def reference_stats(cfg, dataset: str, fid: FidSetup) -> dict:
    """mu, sigma and up to 10,000 features (for PRDC) of the training set, cached under cache_dir, keyed by
    hashes of the images and of the network's weights: computed once, not reused for other data or weights."""
    train = to_uint8(load_dataset(dataset, cfg.data_dir, "train"))
    key = settings_key(n=len(train), data=hashlib.sha1(train.tobytes()).hexdigest(), net=fid.net_id)
    path = Path(cfg.cache_dir) / f"ref_{dataset}_{key}.npz"
    if not path.exists():
        f_train = fid.features(train)[0]
        keep = np.random.default_rng(0).permutation(len(f_train))[:10000]  # real points kept for PRDC
        mu, sigma = feature_stats(f_train)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(str(path) + ".tmp.npz", mu=mu, sigma=sigma, features=f_train[keep])
        os.replace(str(path) + ".tmp.npz", path)
    with np.load(path) as ref:
        return {k: ref[k] for k in ref.files} | {"path": str(path)}


def eval_fid(cfg, ev, images: np.ndarray, fid: FidSetup) -> dict:
    """FID, IS (Inception) or digits-FID and classifier statistics, and PRDC, against the training set."""
    ref = reference_stats(cfg, ev.dataset, fid)
    mu_r, sigma_r = fid.stats or (ref["mu"], ref["sigma"])
    f_real = ref["features"]
    f_fake, out = fid.features(images)
    n = min(len(f_real), len(f_fake))
    res = prdc(f_real[:n], f_fake[:n], k=cfg.k) | {"fid_ref": cfg.fid_stats or ref["path"]}
    fd = frechet_distance_to(f_fake, mu_r, sigma_r)
    if ev.dataset == "digits":
        conf = out.max(1)
        fd_real = frechet_distance_to(fid.features(to_uint8(ev.test))[0], mu_r, sigma_r)
        return res | {"digits_fid": fd, "fid_n": len(images), "classifier_test_acc": fid.classifier_acc,
                      "digits_fid_real_test": fd_real, "real_test_n": len(ev.test),   # the floor
                      "samples_confident": float((conf >= 0.9).mean()),
                      "samples_class_hist": np.bincount(out.argmax(1), minlength=10).tolist()}
    is_mean, is_std = inception_score(out, cfg.is_splits)
    res |= {"fid": fd, "fid_n": len(images), "is": is_mean}
    return res | ({"is_std": is_std} if cfg.is_splits > 1 else {})                # a std needs parts


class Evaluation:
    """What every evaluation needs: the model's score function, its SDE, the test split, the rank."""

    def __init__(self, cfg: EvalConfig, model, train: dict, step, device, rank: int):
        self.dataset, self.device, self.rank = train["data"], device, rank
        self.param = "c" if train["method"] == "c" else "u"              # QC is a U model (Eq. 10)
        self.sde = qcsbm.VESDE(train["sigma_min"], train["sigma_max"])
        self.test = load_dataset(self.dataset, cfg.data_dir, "test")
        # Parts are keyed by what they depend on: the weights used (by content, not by path or step: a
        # retrained or copied file at the same path gets its own parts) and how they become a score.
        self.weights = weights_hash(model)
        self.model_id = dict(weights=self.weights, param=self.param, sigma_min=train["sigma_min"],
                             sigma_max=train["sigma_max"], dataset=self.dataset)
        model = model.to(device).eval()
        self.score_fn = lambda x, t: qcsbm.score(model, x, t, self.sde, self.param)


def weights_hash(model) -> str:
    """sha256 of every tensor of `model` (names, dtypes, shapes and bytes), in state-dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_results(path: Path, key: str, results: dict):
    """Merge `results` into the entry `key` (the checkpoint's identity) of the JSON file at `path` and write
    it atomically (temporary file, fsync, rename): a crash leaves the old file or the new one, never half.
    Entries of other checkpoints are kept beside it, never mixed into it."""
    table = {}
    if path.exists():
        try:
            table = json.loads(path.read_text())
            if not isinstance(table, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            aside = path.with_name(path.name + ".unreadable")
            os.replace(path, aside)
            print(f"warning: {path} could not be read ({e}); moved to {aside}, starting a new one", file=sys.stderr)
            table = {}
        if "ckpt" in table and "step" in table:     # the earlier layout: one checkpoint's numbers, unkeyed
            table = {"unkeyed (written before results were keyed by checkpoint)": table}
    table[key] = table.get(key, {}) | results
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(table, indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    note = "on a digits checkpoint the defaults are: " + " ".join(f"--{k}={v}" for k, v in DIGITS.items())
    user = cli.parse_overrides(EvalConfig, sys.argv[1:] if argv is None else argv, quick=QUICK, note=note)
    if not user.get("ckpt"):
        raise ValueError("--ckpt=PATH is required (a checkpoint written by train_images.py, or a "
                         "score_sde-format one with --data=NAME)")
    evals = [e for e in user.get("eval", EvalConfig.eval).split(",") if e]
    if bad := [e for e in evals if e not in EVALS]:
        raise ValueError(f"unknown evaluation(s) {bad}; valid choices: {', '.join(EVALS)}")
    EvalConfig(**user)                      # every value checked before the checkpoint is read
    rank, world, _, device = setup_distributed(user.get("device", "auto"))
    lock = None
    try:
        model, train, step = model_from_checkpoint(user["ckpt"], user.get("use_ema", True), user.get("data", ""))
        digits = DIGITS if train["data"] == "digits" else {}
        cfg = EvalConfig(**(digits | (QUICK if user.get("quick") else {}) | user))
        # <ckpt dir>/eval for the default evaluation; eval_quick, eval_nll_n-100, ... for other settings
        cfg.out_dir = cfg.out_dir or cli.run_dir(str(Path(cfg.ckpt).parent / "eval"), cfg,
                                                 {"": digits}, "", QUICK, skip=NOT_IN_NAME)
        cfg.data_dir = cfg.data_dir or train["data_dir"]
        # One evaluation per out_dir: two would write the same parts and results.json.
        lock = image_io.lock_folder(cfg.out_dir, "evaluation", rank, world, print if rank == 0 else (lambda *a: None))
        ev = Evaluation(cfg, model, train, step, device, rank)
        parts = Path(cfg.out_dir) / "parts"
        results = {"ckpt": cfg.ckpt, "step": step, "weights_sha256": ev.weights, "dataset": ev.dataset,
                   "method": train["method"], "world_size": world, "settings": asdict(cfg)}
        if rank == 0:
            print(f"evaluating {cfg.ckpt} (step {'unknown' if step is None else step}, {'EMA' if cfg.use_ema else 'raw'} weights, "
                  f"{ev.dataset}, {train['method'].upper()}) on {world} process(es): {', '.join(evals)}")
        fid = fid_setup(cfg, ev.dataset, device) if "fid" in evals and rank == 0 else None  # fails early
        if "nll" in evals:
            results |= eval_nll(cfg, ev, parts)
        if "asym" in evals:
            results |= eval_asym(cfg, ev, parts)
        if "sample" in evals or "fid" in evals:
            images = eval_sample(cfg, ev, parts)
            results |= {k: v for k, v in images.items() if k != "samples"}
        if fid is not None:
            results |= eval_fid(cfg, ev, images["samples"], fid)
        if rank == 0:
            path = Path(cfg.out_dir) / "results.json"
            # One entry per checkpoint identity: the weights evaluated (by content) and which ones (EMA/raw).
            key = f"{ev.weights[:16]} {'ema' if cfg.use_ema else 'raw'} step {step} {Path(cfg.ckpt).name}"
            write_results(path, key, results | {f"settings_{e}": asdict(cfg) for e in evals})
            print_table(results)
            print(f"results in {path}")
        return results
    finally:
        if lock is not None:
            lock.release()
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
