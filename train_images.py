"""Train U-, C- or QC-NCSN++ on images (Section 5 of Chao et al., ICML 2023), on one process or many.

    python train_images.py                                    # QC on sklearn's 8x8 digits, CPU, ~8 min
    python train_images.py --quick                            # the whole pipeline in seconds
    python train_images.py --preset=cifar10 --data_dir=data   # U-NCSN++ as the paper (600k steps)
    torchrun --nproc_per_node=8 train_images.py --preset=cifar10_qc_finetune --data_dir=data

Settings live in `Config` (paper values in the comments); `--preset=NAME` applies one of `PRESETS`, then
`--key=value` overrides any field. Everything a run needs to continue is in `<out_dir>/ckpt.pt`, written
atomically; a run started again in the same `out_dir` resumes from it. Under torchrun each rank takes its
slice of one global batch, and the single backward() of a step lets DistributedDataParallel average
exactly the gradient of the global-batch loss (L_QC included).
"""
import dataclasses
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import cli
import image_io
import qcsbm
from image_io import DATASETS, cleanup_distributed, load_uint8, save_grid, setup_distributed, to_uint8


@dataclass
class Config:
    preset: str = "digits"          # a PRESETS entry: its values are the defaults of every other option
    quick: bool = False             # tiny model, a few steps: the whole pipeline in seconds
    # Data
    data: str = "cifar10"           # digits | cifar10 | cifar100 | svhn | imagenet32
    data_dir: str = "data"          # folder with the official files (digits needs none)
    hflip: bool = True              # random horizontal flips (paper: CIFAR and ImageNet, not SVHN)
    # NCSN++ (paper: the deep continuous model)
    nf: int = 128                   # base width (paper: 128)
    ch_mult: tuple = (1, 2, 2, 2)   # width multiplier per resolution (paper: 1,2,2,2)
    num_res_blocks: int = 8         # residual blocks per resolution (paper: 8)
    attn_resolutions: tuple = (16,)  # resolutions with self-attention (paper: 16)
    dropout: float = 0.1            # (paper: 0.1)
    fourier_scale: float = 16.0     # Fourier feature scale (paper: 16)
    # VE SDE on images in [0, 1] (paper: 0.01 -> 50)
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    # Method
    method: str = "u"               # u | c | qc (Eq. 10; qc = u + lam * L_QC)
    lam: float = 1e-4               # weight of L_QC, used when method == 'qc' (paper: 1e-4)
    slices: int = 1                 # probes per sample for L_QC (paper: 1 at batch 128, 16 at batch 8)
    probe: str = "rademacher"       # rademacher | gaussian
    qc_fraction: float = 1.0        # L_QC on this random fraction of each batch, rescaled: unbiased, cheaper
                                    # (paper: 1, the whole batch)
    weighting: str = "sigma2"       # sigma2 | likelihood
    # Optimization (paper: Adam 2e-4, warmup 5000, grad clip 1, EMA 0.999, batch 128)
    batch_size: int = 128           # GLOBAL batch = per-rank batch x world size
    lr: float = 2e-4
    warmup: int = 5000              # linear learning-rate warmup steps
    grad_clip: float = 1.0          # clip the global gradient norm (0 = off; non-finite norms always stop)
    ema_decay: float = 0.999
    steps: int = 600_000            # total steps (paper: 600k for U, then QC from 600k to 700k)
    init_from: str = ""             # checkpoint to start from when out_dir has none (U -> QC fine-tune):
                                    # ours, or score_sde's format (the published U-NCSN++ checkpoints)
    init_step: int = -1             # step of an --init_from file that has none (the QCSBM authors' files)
    # Runtime
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | mps
    dtype: str = "float32"          # float32 | bf16 (bf16 autocasts the network forward)
    cuda_graph: bool = False        # replay loss, backward, clipping and Adam from one CUDA graph (one CUDA
                                    # process; the first 3 steps run eagerly, then the step is captured)
    out_dir: str = ""               # '' -> runs/<preset>[_quick]
    log_every: int = 100            # steps between log lines
    snapshot_every: int = 10_000    # steps between checkpoints + sample grids
    n_samples: int = 64             # images in the sample grid
    sample_steps: int = 1000        # predictor-corrector steps for the grid (paper: 1000)
    snr: float = 0.16               # Langevin corrector signal-to-noise ratio (paper: 0.16)

    def __post_init__(self):
        if self.dtype in ("fp16", "float16"):
            raise ValueError(f"--dtype={self.dtype} is not supported: float16 overflows in the Jacobian-vector "
                             f"products of L_QC (non-finite for 7-25% of the samples in our measurement, "
                             f"BENCHMARKS.md); use --dtype=bf16 or float32")
        for key, valid in [("data", DATASETS), ("method", qcsbm.PARAMS), ("probe", qcsbm.PROBES),
                           ("weighting", qcsbm.WEIGHTINGS), ("dtype", ("float32", "bf16")),
                           ("device", DEVICES)]:
            if getattr(self, key) not in valid:
                raise ValueError(f"unknown {key} {getattr(self, key)!r}; valid choices: {', '.join(valid)}")
        self.ch_mult, self.attn_resolutions = tuple(self.ch_mult), tuple(self.attn_resolutions)
        check_values(self, [
            ("steps", self.steps > 0, "a positive number of training steps"),
            ("batch_size", self.batch_size > 0, "a positive (global) batch size"),
            ("nf", self.nf > 0, "a positive base width"),
            ("num_res_blocks", self.num_res_blocks >= 1, "at least 1 residual block per resolution"),
            ("ch_mult", len(self.ch_mult) > 0 and all(isinstance(m, int) and m > 0 for m in self.ch_mult),
             "one positive integer per resolution level, e.g. 1,2,2,2"),
            ("dropout", 0 <= self.dropout < 1, "a probability in [0, 1)"),
            ("sigma_min", 0 < self.sigma_min < self.sigma_max and math.isfinite(self.sigma_max),
             f"0 < sigma_min < sigma_max (sigma_max is {self.sigma_max})"),
            ("lam", math.isfinite(self.lam) and self.lam >= 0, "a finite weight >= 0"),
            ("slices", self.slices >= 1, "at least 1 probe per sample"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a finite positive learning rate"),
            ("warmup", self.warmup >= 0, "a number of steps >= 0 (0 = no warmup)"),
            ("grad_clip", math.isfinite(self.grad_clip) and self.grad_clip >= 0,
             "a finite gradient-norm bound > 0, or 0 to turn clipping off (a non-finite norm still stops "
             "the run)"),
            ("ema_decay", 0 <= self.ema_decay < 1, "a decay in [0, 1) (0.999 in the paper)"),
            ("init_step", self.init_step >= -1, "a step >= 0, or -1 for none"),
            ("log_every", self.log_every >= 1, "at least 1 step between log lines"),
            ("snapshot_every", self.snapshot_every >= 1, "at least 1 step between checkpoints"),
            ("n_samples", self.n_samples >= 1, "at least 1 image in the sample grid"),
            ("sample_steps", self.sample_steps >= 1, "at least 1 sampler step"),
            ("snr", math.isfinite(self.snr) and self.snr > 0, "a finite positive signal-to-noise ratio"),
        ])
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device=cuda, but this machine has no CUDA device that torch can use "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                             "use --device=cpu or --device=auto")
        if self.device == "mps" and not torch.backends.mps.is_available():
            raise ValueError("--device=mps, but MPS is not available here; use --device=cpu or --device=auto")
        if self.out_dir:
            check_out_dir(self.out_dir)


DEVICES = ("auto", "cpu", "cuda", "mps")


def check_values(cfg, checks):
    """Raise one ValueError for the first (option, ok, what is allowed) whose ok is False."""
    for key, ok, allowed in checks:
        if not ok:
            raise ValueError(f"--{key}={getattr(cfg, key)!r} makes no sense: {key} takes {allowed}")


def check_out_dir(path: str):
    """Refuse an output folder that cannot be created or written, without creating anything."""
    probe = os.path.abspath(path)
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise ValueError(f"--out_dir={path!r} cannot be used: it exists and is not a folder")
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"--out_dir={path!r} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out_dir={path!r} cannot be {'written' if probe == os.path.abspath(path) else 'created'}: "
                         f"no write permission on {probe}")


def finetune(name):  # the paper's QC fine-tune: from the U checkpoint at 600k to 700k, lam 1e-4, 1 slice
    return dict(data=name, hflip=name != "svhn", method="qc", lam=1e-4, slices=1, steps=700_000,
                init_from=f"runs/{name}/ckpt.pt", init_step=600_000)


PRESETS = {
    # Tiny enough for 2 CPU cores: QC on 8x8 digits, recognizable samples in ~8 minutes.
    # sigma_max = 5 ~ the largest distance between two digits (Song & Ermon's rule for sigma_max).
    "digits": dict(data="digits", hflip=False, nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                   dropout=0.0, sigma_max=5.0, method="qc", lam=1e-3, batch_size=64, lr=1e-3, warmup=100,
                   ema_decay=0.995, steps=1500, log_every=50, snapshot_every=750, sample_steps=300, n_samples=64),
    "cifar10": dict(data="cifar10"),
    "cifar10_qc_finetune": finetune("cifar10"),
    "cifar100": dict(data="cifar100"),
    "cifar100_qc_finetune": finetune("cifar100"),
    "svhn": dict(data="svhn", hflip=False),
    "svhn_qc_finetune": finetune("svhn"),
    "imagenet32": dict(data="imagenet32"),
    "imagenet32_qc_finetune": finetune("imagenet32"),
}
QUICK = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, dropout=0.0, batch_size=16, warmup=0, steps=6,
             log_every=2, snapshot_every=6, n_samples=16, sample_steps=10)
MODEL_KEYS = ("data", "nf", "ch_mult", "num_res_blocks", "attn_resolutions", "fourier_scale")
ARCH_KEYS = ("image_size", "channels", "nf", "ch_mult", "num_res_blocks", "attn_resolutions")  # in the weights
LOSS_KEYS = ("method", "lam", "slices", "probe", "qc_fraction", "weighting", "sigma_min", "sigma_max")  # kept on resume


def parse_config(argv) -> Config:
    """`--preset=NAME` first, then `--quick`, then every `--key=value` (typed by the field's default)."""
    cfg = cli.parse(Config, argv, PRESETS, "digits", QUICK)
    if not cfg.out_dir:
        cfg.out_dir = f"runs/{cfg.preset}" + ("_quick" if cfg.quick else "")
        check_out_dir(cfg.out_dir)
    return cfg


def get_batch(data: torch.Tensor, levels: int, gen: torch.Generator, batch_size: int, rank: int, world: int,
              hflip: bool) -> torch.Tensor:
    """This rank's slice of one global batch. Indices (drawn with replacement) and flips come from `gen`,
    which is identical on every rank, so N ranks see exactly the batch one process would see."""
    idx = torch.randint(len(data), (batch_size,), generator=gen)
    flip = torch.rand(batch_size, generator=gen) < 0.5
    mine = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    x = data[idx[mine]].float() / (levels - 1)                            # (B, C, H, W) in [0, 1]
    return torch.where(flip[mine, None, None, None], x.flip(3), x) if hflip else x


# ---- Model, SDE, checkpoints, distributed set-up ----

def model_config(cfg: Config) -> qcsbm.NCSNppConfig:
    C, size, _ = DATASETS[cfg.data]
    return qcsbm.NCSNppConfig(image_size=size, channels=C, nf=cfg.nf, ch_mult=cfg.ch_mult,
                              num_res_blocks=cfg.num_res_blocks, attn_resolutions=cfg.attn_resolutions,
                              dropout=cfg.dropout, fourier_scale=cfg.fourier_scale)


def make_sde(cfg: Config) -> qcsbm.VESDE:
    return qcsbm.VESDE(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)


def check_same_model(saved: dict, cfg: Config, path: str):
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {getattr(cfg, k)!r} now" for k in MODEL_KEYS
            if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"checkpoint {path} was trained with another model config; nothing was "
                         f"overwritten. Mismatch: " + "; ".join(diff))


def check_same_loss(saved: dict, cfg: Config, path: str):
    """Resuming continues the saved run: the same objective, or a new run in another --out_dir."""
    diff = [f"{k}={saved.get(k)!r} there, {k}={getattr(cfg, k)!r} now" for k in LOSS_KEYS
            if k in saved and saved[k] != getattr(cfg, k)]
    if diff:
        raise ValueError(f"{os.path.dirname(path) or '.'} holds a run with another objective ({'; '.join(diff)}); "
                         f"nothing was changed. To continue it, drop those options; to start a new run, pass "
                         f"another --out_dir (with --init_from={path} to start from its weights)")


def check_same_architecture(found: qcsbm.NCSNppConfig, cfg: Config, path: str):
    want = model_config(cfg)
    diff = [f"{k}: {getattr(found, k)!r} in the file, {getattr(want, k)!r} in this run" for k in ARCH_KEYS
            if getattr(found, k) != getattr(want, k)]
    if diff:
        raise ValueError(f"{path} holds another NCSN++ than --preset={cfg.preset} builds for {cfg.data}: "
                         + "; ".join(diff) + ". Pass the matching --nf / --ch_mult / --num_res_blocks / "
                         "--attn_resolutions, or the right --data")


def rng_state(data_gen, noise_gen) -> dict:
    """Every random stream of this rank, as tensors and plain Python (so weights_only loading works)."""
    np_state = np.random.get_state()
    return {"data": data_gen.get_state(), "noise": noise_gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8),
            "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(s: dict, data_gen, noise_gen):
    data_gen.set_state(s["data"])
    noise_gen.set_state(s["noise"])
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and len(s["cuda"]):
        torch.cuda.set_rng_state(s["cuda"])
    np.random.set_state(("MT19937", s["numpy"][0].numpy().astype(np.uint32), *s["numpy"][1:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def save_samples(model, sde, cfg: Config, path: str, device):
    """A PNG grid of `n_samples` predictor-corrector samples of `model` (the EMA), same noise every time."""
    C, size, _ = DATASETS[cfg.data]
    gen = torch.Generator(device).manual_seed(cfg.seed + 12345)
    x = sde.prior_sample((cfg.n_samples, C, size, size), generator=gen, device=device)
    param = "c" if cfg.method == "c" else "u"
    x, _ = qcsbm.pc_sampler(lambda x, t: qcsbm.score(model, x, t, sde, param), x, sde, cfg.sample_steps,
                            generator=gen, snr=cfg.snr)
    save_grid(to_uint8(x.float()), path, size=256)


# ---- Training ----

def check_cuda_graph(device: torch.device, world: int):
    """--cuda_graph captures one process's whole step; say plainly where that cannot apply."""
    if device.type != "cuda":
        raise ValueError(f"--cuda_graph needs a CUDA device; this run is on {device.type!r} (drop --cuda_graph)")
    if world > 1:
        raise ValueError(f"--cuda_graph runs one process; under torchrun ({world} processes) "
                         f"DistributedDataParallel's gradient all-reduce is not captured (drop --cuda_graph)")


def make_capturable(opt: torch.optim.Adam, device: torch.device):
    """Adam as a CUDA graph needs it: capturable, with lr and the step counts as device tensors (updated in
    place, so a replay sees them; a checkpoint may hold plain floats)."""
    for group in opt.param_groups:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        for p in group["params"]:
            if "step" in opt.state.get(p, {}):
                opt.state[p]["step"] = opt.state[p]["step"].to(device, torch.float32)


class GraphedStep:
    """--cuda_graph: `step(x0)` (loss, backward, clipping, Adam; gradients set to None before it) replayed
    from one CUDA graph. The first `warmup` calls run eagerly on a side stream, as capture requires (lazy
    initializations and cuDNN's choices happen outside it); they are ordinary training steps. The next call
    captures the step on its own copy of x0 and replays it; later calls copy their batch in and replay.
    The outputs are the graph's static tensors, overwritten by the next replay."""

    def __init__(self, step, opt, generators, warmup: int = 3):
        self.step, self.opt, self.generators, self.warmup = step, opt, generators, warmup
        self.graph = None

    def __call__(self, x0):
        if self.graph is None and self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.opt.zero_grad(set_to_none=True)
                out = self.step(x0)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.x0, self.graph = x0.clone(), torch.cuda.CUDAGraph()
            for gen in self.generators:                # draws from our generator advance on every replay
                self.graph.register_generator_state(gen)
            self.opt.zero_grad(set_to_none=True)       # the backward in the graph allocates the gradients
            with torch.cuda.graph(self.graph):
                self.out = self.step(self.x0)
        self.x0.copy_(x0)
        self.graph.replay()
        return self.out


def load_start(path: str, resuming: bool, cfg: Config, model, ema, opt, say):
    """Load model, EMA and Adam state from `path` into this run. Returns the step to continue from and,
    when resuming, the saved random streams (one entry per rank)."""
    obj = image_io.read_file(path)
    if resuming or not image_io.is_score_sde(obj):
        ckpt = image_io.check_ours(obj, path)
        check_same_model(ckpt["config"], cfg, path)
        if resuming:
            check_same_loss(ckpt["config"], cfg, path)
        model.load_state_dict(ckpt["model"], strict=True)
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        say(f"resumed at step {step} from {path}" if resuming else
            f"initialized from {path} (step {step}, method {ckpt['config']['method']!r})")
        return step, ckpt["rng"] if resuming else None
    ckpt = image_io.from_score_sde(obj, DATASETS[cfg.data][1], path)
    check_same_architecture(ckpt["config"], cfg, path)
    step = ckpt["step"] if ckpt["step"] is not None else cfg.init_step
    if step < 0:
        raise ValueError(f"{path} records no training step (the QCSBM authors' files do not): pass "
                         f"--init_step=N, the step it was saved at (the paper's U checkpoints: 600000)")
    model.load_state_dict(ckpt["model"], strict=True)
    ema.load_state_dict({"num_updates": ckpt["ema_num_updates"], "model": ckpt["ema"]})
    if ckpt["optimizer"] is not None:
        opt.load_state_dict(ckpt["optimizer"])
    say(f"initialized from the score_sde-format checkpoint {path} at step {step}"
        f"{'' if ckpt['step'] is not None else ' (--init_step)'}: model, EMA ({ckpt['ema_num_updates']} "
        f"updates; decay {cfg.ema_decay} from now on)"
        f"{', Adam state' if ckpt['optimizer'] is not None else ', no Adam state in the file'}")
    return step, None


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    rank, world, local_rank, device = setup_distributed(cfg.device)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    stop = {"signal": None}                        # set by Ctrl-C / SIGTERM; the loop saves and exits

    def request_stop(signum, frame):
        if stop["signal"]:                         # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum)

    in_main = threading.current_thread() is threading.main_thread()
    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    lock = None
    try:
        if cfg.cuda_graph:
            check_cuda_graph(device, world)
        if cfg.batch_size % world:
            raise ValueError(f"batch_size {cfg.batch_size} (global) is not divisible by world size {world}")
        # One run per out_dir: a second one would overwrite this one's checkpoint under it.
        new_dir = not os.path.isdir(cfg.out_dir)
        try:
            lock = image_io.lock_folder(cfg.out_dir, "training run", rank, world, say)
        except OSError as e:
            raise ValueError(f"--out_dir={cfg.out_dir!r} cannot be used: {e}") from None
        if cfg.dtype == "bf16" and cfg.method == "qc":
            say("note: --dtype=bf16 with method qc: L_QC is computed through the bf16 network; measured against "
                "float32 on the same batch (BENCHMARKS.md) its batch mean is within 1% and single samples "
                "within 5%, so logged loss_qc values are approximate to that; use --dtype=float32 for exact L_QC")
        # Data: every rank holds the whole (uint8) training set and draws the same global batches.
        data = torch.from_numpy(load_uint8(cfg.data, cfg.data_dir, "train"))
        levels = DATASETS[cfg.data][2]
        # Model, EMA, optimizer: identical initialization on every rank (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.seed)
        model = qcsbm.NCSNpp(model_config(cfg)).to(device)
        say(f"NCSN++: {sum(p.numel() for p in model.parameters()):,} parameters")
        ema = qcsbm.EMA(model, cfg.ema_decay)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sde, step = make_sde(cfg), 0
        on_disk = {"step": None}                   # the step ckpt_path holds (None: no checkpoint there)
        # Random streams: batches are shared by all ranks, noise / dropout are per rank.
        data_gen = torch.Generator().manual_seed(cfg.seed)
        noise_gen = torch.Generator(device).manual_seed(cfg.seed + rank)
        torch.manual_seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)

        # Resume from out_dir, or start from --init_from (ours or score_sde's format); the model must match.
        source = ckpt_path if os.path.isfile(ckpt_path) else cfg.init_from
        if source == ckpt_path and cfg.init_from:
            say(f"{ckpt_path} exists: resuming that run; --init_from={cfg.init_from} is ignored")
        if source:
            step, rngs = load_start(source, source == ckpt_path, cfg, model, ema, opt, say)
            if source == ckpt_path:
                on_disk["step"] = step
            if rngs is not None:
                if len(rngs) == world:
                    set_rng_state(rngs[rank], data_gen, noise_gen)
                else:
                    say(f"world size changed ({len(rngs)} -> {world}): random streams reseeded")
            if step >= cfg.steps:
                say(f"already at step {step} of --steps={cfg.steps}: nothing to train (raise --steps to go on)")
        if master:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as fh:
                json.dump(dataclasses.asdict(cfg), fh, indent=1)
            say("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
            say(f"world size {world}, device {device}, global batch {cfg.batch_size}, dtype {cfg.dtype}")

        def kept():  # exactly what is on disk now
            return (f"{ckpt_path} holds the checkpoint of step {on_disk['step']}" if on_disk["step"] is not None
                    else f"no checkpoint has been written to {ckpt_path}")

        def save():  # every rank sends its random streams; rank 0 writes the one file
            bad = [name for name, t in [*model.state_dict().items(), *(("ema." + k, v) for k, v in
                                        ema.state_dict()["model"].items())]
                   if t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:                                # never write a checkpoint that cannot be resumed from
                raise FloatingPointError(f"non-finite weights at step {step} ({', '.join(bad[:4])}"
                                         f"{' ...' if len(bad) > 4 else ''}): not saved; {kept()}. Lower "
                                         f"--lr or keep --grad_clip on")
            rngs = [None] * world
            if world > 1:
                dist.all_gather_object(rngs, rng_state(data_gen, noise_gen))
            else:
                rngs[0] = rng_state(data_gen, noise_gen)
            if master:
                image_io.save_checkpoint(image_io.make_checkpoint(model, ema, opt, step, dataclasses.asdict(cfg), rngs),
                                         ckpt_path, f"the checkpoint of step {step}")
            on_disk["step"] = step

        net = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None,
                  broadcast_buffers=False) if world > 1 else model

        def f(x, std):  # the network as qcsbm calls it; bf16 autocasts its forward only (no cast cache in a graph)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16",
                                cache_enabled=not cfg.cuda_graph):
                return net(x, std).float()

        lam = cfg.lam if cfg.method == "qc" else 0.0

        def step_loss(x0):
            return qcsbm.training_loss(f, x0, sde, param=cfg.method, lam=lam, slices=cfg.slices, probe=cfg.probe,
                                       weighting=cfg.weighting, generator=noise_gen, qc_fraction=cfg.qc_fraction)

        def whole_step(x0):  # --cuda_graph: everything a step computes, in one graph
            total, dsm, qc = step_loss(x0)
            total.mean().backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            opt.step()
            return total, dsm, qc, grad_norm

        graphed = None
        if cfg.cuda_graph:
            make_capturable(opt, device)
            graphed = GraphedStep(whole_step, opt, [noise_gen])
        before = "(the graphed step was applied in memory, not saved)" if graphed else "before applying it"
        log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if master else None
        bar = cli.progress(total=cfg.steps, initial=step, disable=not master, dynamic_ncols=True, desc="train")
        sums, t0, n0, stopping = np.zeros(3), time.time(), step, False
        while step < cfg.steps:
            x0 = get_batch(data, levels, data_gen, cfg.batch_size, rank, world, cfg.hflip).to(device)
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else cfg.lr
            for group in opt.param_groups:
                if graphed:
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            # One forward gives per-sample L_DSM and L_QC; one backward; DDP averages the gradient. A graphed
            # step has already been applied here, so its checks below come after it (the checkpoint is kept).
            if graphed:
                total, dsm, qc, grad_norm = graphed(x0)
            else:
                total, dsm, qc = step_loss(x0)
            stats = torch.stack([total.mean(), dsm.mean(), qc.mean(),
                                 torch.tensor(float(stop["signal"] is not None), device=device)]).detach()
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            loss, loss_dsm, loss_qc, stopping = stats.tolist()
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss ({loss}) at step {step + 1}; stopped {before}; "
                                         f"{kept()}")
            if not graphed:
                opt.zero_grad(set_to_none=True)
                total.mean().backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"non-finite gradient at step {step + 1}; stopped {before}; {kept()}")
            if not graphed:
                opt.step()
            ema.update(model)
            step += 1
            bar.update(1)
            sums += (loss, loss_dsm, loss_qc)

            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = (time.time() - t0) / (step - n0)
                mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
                rec = {"step": step, "loss": sums[0] / (step - n0), "loss_dsm": sums[1] / (step - n0),
                       "loss_qc": sums[2] / (step - n0), "lr": lr, "sec_per_step": dt,
                       "images_per_sec": cfg.batch_size / dt, "peak_mem_mb": mem}
                if master:
                    bar.write(f"step {step:7d} | loss {rec['loss']:.4f} dsm {rec['loss_dsm']:.4f} "
                              f"qc {rec['loss_qc']:.3e} | lr {lr:.2e} | {dt:.3f} s/step "
                              f"{rec['images_per_sec']:.0f} img/s | {mem:.0f} MB")
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                sums, t0, n0 = np.zeros(3), time.time(), step

            if step % cfg.snapshot_every == 0 or step == cfg.steps or stopping:
                save()
                if master and not stopping:  # a stopping run (SIGTERM grace time) skips the samples
                    grid = os.path.join(cfg.out_dir, f"samples_{step:07d}.png")
                    save_samples(ema.model, sde, cfg, grid, device)
                    bar.write(f"step {step}: saved {ckpt_path} and {grid}")
                t0 = time.time()
            if stopping:
                say(f"\nstopped by {stop['signal'].name if stop['signal'] else 'another rank'} at step {step}; "
                    f"{kept()}")
                break
        bar.close()
        if log:
            log.close()
        if stopping:  # the conventional status of a process ended by a signal, 128 + its number
            raise SystemExit(128 + (stop["signal"] or signal.SIGTERM))
        return {"step": step, "model": model, "ema": ema.model, "out_dir": cfg.out_dir}
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if lock is not None:
            lock.release()
            if new_dir and not os.listdir(cfg.out_dir):     # a run that stopped before writing anything
                os.rmdir(cfg.out_dir)                       # leaves no empty folder behind
        cleanup_distributed()


if __name__ == "__main__":
    cli.run(main)
