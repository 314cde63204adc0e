"""Benchmark the inner training step of U, C and QC score models, side by side, and the samplers.

One process, one network, every variant timed in interleaved repetitions (order rotated each round),
so that the ratios to the U step survive a noisy or shared machine. A step is: loss, backward(),
optimizer step. QC uses qcsbm.training_loss as it is; two reference formulations of the same L_QC
gradient (the authors' two-pass form and the double-VJP form) are passed to it here and checked to give
the library's gradient. Results: a markdown table on stdout and runs/bench/results.json (a run with other
settings: runs/bench_<what differs>/results.json).

    python bench.py                               # small NCSN++ (1.8M), batch 8, CPU, 1 thread
    python bench.py --model=deep --batch_size=128 --device=cuda --threads=0 --dtype=bf16
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
import cli
import qcsbm


@dataclass
class Config:
    model: str = "small"     # tiny (50k params) | small (1.8M, nf 32, mult 1,2,2, 2 blocks) | deep (paper)
    batch_size: int = 8      # images per step (paper: 128 per GPU for the deep model)
    image_size: int = 32     # CIFAR-10 size
    reps: int = 7            # interleaved timed repetitions; medians reported
    lam: float = 1e-4        # QC weight (paper, images: 1e-4)
    device: str = "auto"     # auto | cpu | cuda
    dtype: str = "float32"   # float32 | bf16 (autocast)
    compile: bool = False    # torch.compile the network for U only (no double backward through compile)
    fast_conv: bool = False  # NCSNppConfig.fast_conv: second-order convolution work by convolution_backward
    fast_norm: bool = False  # NCSNppConfig.fast_norm: GroupNorm and softmax as plain ops under autograd
    threads: int = 1         # CPU threads (0: torch's default); 1 gives stable timings on a shared box
    variants: str = "U,C,QC1,QC4,QC1-dvjp,QC1-2pass"  # which steps to time (U is always timed)
    sample_steps: int = 20   # predictor-corrector steps timed for sampler throughput
    lik_tol: float = 1e-5    # RK45 rtol = atol for the likelihood (paper: 1e-5)
    sample_batch: int = 4    # images for the sampler and likelihood timings
    quick: bool = False      # seconds-long smoke run

    def __post_init__(self):
        for key, ok, allowed in [
                ("lik_tol", 0 < self.lik_tol < float("inf"), "a finite tolerance > 0 (0 never lets the ODE "
                 "solver finish)"),
                ("batch_size", self.batch_size >= 1, "at least 1 image"), ("image_size", self.image_size >= 1, "a size >= 1"),
                ("reps", self.reps >= 1, "at least 1 repetition"), ("lam", 0 <= self.lam < float("inf"),
                                                                    "a finite weight >= 0"),
                ("threads", self.threads >= 0, "a thread count >= 0 (0: torch's default)"),
                ("sample_steps", self.sample_steps >= 1, "at least 1 step"),
                ("sample_batch", self.sample_batch >= 1, "at least 1 image")]:
            if not ok:
                raise ValueError(f"--{key}={getattr(self, key)!r} makes no sense: {key} takes {allowed}")


QUICK = dict(model="tiny", batch_size=2, image_size=16, reps=2, sample_steps=3, lik_tol=1e-2, sample_batch=2,
             variants="U,C,QC1,QC4,QC16,QC1-dvjp,QC1-2pass,QC4-rep,QC16-rep,QC1-f1/2,QC1-f1/4,QC1-f1/8")
# init_scale=1: last layers at full scale. score_sde's init (0) starts them near zero, where L_QC and its
# gradient are ~0 and the gradient checks below would compare nothing; the work per step is the same.
MODELS = {"tiny": dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, dropout=0.0, init_scale=1.0),
          "small": dict(nf=32, ch_mult=(1, 2, 2), num_res_blocks=2, dropout=0.1, init_scale=1.0),
          "deep": dict(init_scale=1.0)}  # otherwise NCSNppConfig's defaults: the paper's deep CIFAR-10 model


def parse(argv) -> Config:
    """--key=value for every Config field (--quick alone means --quick=true); quick, then flags."""
    cfg = cli.parse(Config, argv, quick=QUICK)
    for key, val, valid in [("model", cfg.model, MODELS), ("dtype", cfg.dtype, ("float32", "bf16")),
                            ("device", cfg.device, ("auto", "cpu", "cuda"))]:
        if val not in valid:
            raise ValueError(f"unknown {key} {val!r}; valid choices: {', '.join(valid)}")
    for name in cfg.variants.split(","):
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; valid choices: {', '.join(VARIANTS)}")
    return cfg


# ---- Reference formulations of the L_QC traces, beside qcsbm.hutchinson_traces ----
# Each has its signature, (s, x, v) with v of shape (K, *x.shape) -> per-sample estimates of
# (tr(J J^T), tr(J J)), and a variant selects one with qcsbm.training_loss(..., traces=...).

def double_vjp_traces(s, x, v, create_graph=True):
    """J v by the double-VJP trick, d/dw [(J^T w) . v] at w = v (the backward needs third derivatives)."""
    tr_JJt = tr_JJ = 0.0
    for vk in v:
        w = vk.detach().clone().requires_grad_()
        (u,) = torch.autograd.grad(s, x, w, create_graph=True, retain_graph=True)   # J^T v
        (Jv,) = torch.autograd.grad(u, w, vk, create_graph=True)                   # J v
        tr_JJt, tr_JJ = tr_JJt + qcsbm.flat_sum(u * u), tr_JJ + qcsbm.flat_sum(u * Jv)
    return tr_JJt / len(v), tr_JJ / len(v)


class TwoPass:
    """The authors' form (QCSBM.md, "Gradient"): v^T J J v = v . d/dx [sg(J^T v) . s]. The part of
    d/dtheta lost to the stop-gradient sg is restored by a second backward pass through J^T v, which
    `second_pass` runs after the loss's backward (kept with retain_graph)."""

    def __init__(self):
        self.pending = []                                           # (J^T v, its stop-gradient copy)

    def __call__(self, s, x, v, create_graph=True):
        tr_JJt = tr_JJ = 0.0
        for vk in v:
            (u,) = torch.autograd.grad(s, x, vk, create_graph=True, retain_graph=True)   # J^T v
            u_sg = u.detach().requires_grad_()
            (r,) = torch.autograd.grad(s, x, u_sg, create_graph=True, retain_graph=True)  # J^T sg(J^T v)
            self.pending.append((u, u_sg))
            tr_JJt, tr_JJ = tr_JJt + qcsbm.flat_sum(u * u), tr_JJ + qcsbm.flat_sum(vk * r)
        return tr_JJt / len(v), tr_JJ / len(v)

    def second_pass(self):
        torch.autograd.backward([u for u, _ in self.pending], [u_sg.grad for _, u_sg in self.pending])
        self.pending.clear()


def backward(loss, traces):
    """The step's backward: one pass, plus the second one of the two-pass form."""
    two_pass = isinstance(traces, TwoPass)
    loss.backward(retain_graph=two_pass)
    if two_pass:
        traces.second_pass()


LIBRARY = lambda: qcsbm.hutchinson_traces
VARIANTS = {  # name: (param, L_QC probes per sample (0: DSM only), batch repeats, traces formulation,
              #        fraction of the batch that gets L_QC)
    "U": ("u", 0, 1, LIBRARY, 1.0), "C": ("c", 0, 1, LIBRARY, 1.0), "QC1": ("u", 1, 1, LIBRARY, 1.0),
    "QC4": ("u", 4, 1, LIBRARY, 1.0), "QC16": ("u", 16, 1, LIBRARY, 1.0),
    "QC1-dvjp": ("u", 1, 1, lambda: double_vjp_traces, 1.0), "QC1-2pass": ("u", 1, 1, TwoPass, 1.0),
    # The library's K-probe form before this benchmark: every sample repeated K times, one probe each.
    "QC4-rep": ("u", 1, 4, LIBRARY, 1.0), "QC16-rep": ("u", 1, 16, LIBRARY, 1.0),
    # L_QC on a random half / quarter / eighth of the batch (qc_fraction), DSM on every sample.
    "QC1-f1/2": ("u", 1, 1, LIBRARY, 0.5), "QC1-f1/4": ("u", 1, 1, LIBRARY, 0.25),
    "QC1-f1/8": ("u", 1, 1, LIBRARY, 0.125)}


def make_step(f, f_u, opt, x0, sde, cfg, param, slices, repeat, make_traces, qc_fraction, seed=0):
    gen, traces = torch.Generator(x0.device).manual_seed(seed), make_traces()
    x = x0.repeat(repeat, *([1] * (x0.dim() - 1)))

    def step():
        with torch.autocast(x0.device.type, torch.bfloat16, enabled=cfg.dtype == "bf16"):
            net = f_u if slices == 0 and param == "u" else f           # compiled (if asked) for U only
            total, dsm, qc = qcsbm.training_loss(net, x, sde, param=param, lam=cfg.lam if slices else 0.0,
                                                 slices=max(slices, 1), generator=gen, traces=traces,
                                                 qc_fraction=qc_fraction)
        backward(total.mean(), traces)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return qc.detach()
    return step


def peak_memory_mib(step, device) -> float:
    """Peak memory allocated during one step above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    # CPU keeps no allocator statistics, but the profiler records every allocation (+) and free (-) of
    # torch's CPU allocator; their running sum in time order peaks at the step's extra memory.
    with no_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in records), default=0) / 2 ** 20


@contextlib.contextmanager
def no_stderr():
    """Silence the profiler's C++ start/stop lines ("USDT: ... profiler_start"): no setting turns them off,
    so the process's stderr goes to /dev/null while it runs (Python exceptions still propagate)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(null)


class OpCounter(TorchDispatchMode):
    """Counts the ATen calls of a step: all of them, attention's bmm's, and convolution work in units
    of one convolution (a convolution_backward counts once per input or weight gradient it computes)."""

    def __init__(self):
        super().__init__()
        self.counts = {"aten_ops": 0, "conv_units": 0, "bmm": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts["aten_ops"] += 1
        if name == "convolution_backward":  # output_mask: (input, weight, bias); the bias is a sum
            self.counts["conv_units"] += args[-1][0] + args[-1][1]
        self.counts["conv_units"] += name == "convolution"
        self.counts["bmm"] += name == "bmm"
        return func(*args, **(kwargs or {}))


def count_ops(step) -> dict:
    with OpCounter() as counter:
        step()
    return counter.counts


@contextlib.contextmanager
def full_float32():
    """Turn off TF32 (on by default for cuDNN convolutions on a GPU) where float32 is the reference."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


@full_float32()
def grad_rel_err(f, x0, sde, make_traces, lam=1.0) -> float:
    """Relative difference between the parameter gradient of a reference formulation and the library's."""
    grads = []
    for traces in (qcsbm.hutchinson_traces, make_traces()):
        f.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same t, z, v and dropout masks for both
        backward(qcsbm.training_loss(f, x0, sde, lam=lam, traces=traces)[0].mean(), traces)
        grads.append(torch.cat([p.grad.flatten() for p in f.parameters()]))
    f.zero_grad(set_to_none=True)
    return ((grads[1] - grads[0]).norm() / grads[0].norm()).item()


def compiled_step(step, compiling: bool):
    """Run one step; with --compile, a compiler failure (torch's Inductor needs a working C++ toolchain on
    the CPU, a matching Triton on the GPU) ends the run with one line saying so, not a long traceback."""
    if not compiling:
        return step()
    try:
        return step()
    except Exception as e:
        if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"--compile failed here, in torch {torch.__version__}'s compiler ({type(e).__name__}: "
                         f"{first[:200]}); run without --compile (it times the U step only)") from e


def time_steps(steps: dict, reps: int, sync) -> dict:
    """Seconds per call of each step, interleaved, rotating the order each round."""
    names, times = list(steps), {name: [] for name in steps}
    for r in cli.progress(range(reps), desc="interleaved reps"):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            steps[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=()) -> dict:
    cfg, threads, benchmark = parse(argv), torch.get_num_threads(), torch.backends.cudnn.benchmark
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    try:
        torch.manual_seed(0)
        f = qcsbm.NCSNpp(qcsbm.NCSNppConfig(image_size=cfg.image_size, fast_conv=cfg.fast_conv,
                                                fast_norm=cfg.fast_norm, **MODELS[cfg.model])).to(device)
        f_u = torch.compile(f) if cfg.compile else f
        opt, sde = torch.optim.Adam(f.parameters(), lr=2e-4), qcsbm.VESDE()
        x0 = torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
        res = {"config": asdict(cfg), "params": sum(p.numel() for p in f.parameters()), "variants": {},
               "out_dir": cli.run_dir("runs/bench", cfg, quick=QUICK, skip=("reps",)),
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
        chosen = {name: VARIANTS[name] for name in dict.fromkeys(["U", *cfg.variants.split(",")])}
        res["grad_rel_err"] = {name: grad_rel_err(f, x0[:2], sde, make_traces)
                               for name, (*_, make_traces, _) in chosen.items() if make_traces is not LIBRARY}
        steps = {name: make_step(f, f_u, opt, x0, sde, cfg, *v) for name, v in chosen.items()}
        for name, step in list(steps.items()):  # warm-up (Adam state, compilation), then peak memory
            try:
                compiled_step(step, cfg.compile and name == "U")
                res["variants"][name] = {"peak_mib": peak_memory_mib(step, device), **count_ops(step)}
            except torch.OutOfMemoryError:  # report it and time the others (U must fit)
                if name == "U":
                    raise
                del steps[name]
                res["out_of_memory"] = res.get("out_of_memory", []) + [name]
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        times = time_steps(steps, cfg.reps, sync)
        u = statistics.median(times["U"]), res["variants"]["U"]["peak_mib"]
        for name, ts in times.items():
            v = res["variants"][name]
            v |= {"median_s": statistics.median(ts), "spread_s": max(ts) - min(ts)}
            v |= {"images_per_s": cfg.batch_size / v["median_s"], "time_vs_U": v["median_s"] / u[0],
                  "mem_vs_U": v["peak_mib"] / u[1],
                  "conv_units_vs_U": v["conv_units"] / res["variants"]["U"]["conv_units"]}
        if "QC1" in times and "QC1-2pass" in times:
            two_pass, qc1 = res["variants"]["QC1-2pass"]["median_s"], res["variants"]["QC1"]["median_s"]
            res["qc_speedup_vs_two_pass"] = two_pass / qc1
        if cfg.dtype == "bf16":  # L_QC on the same batch (same t, z, v; no dropout) in bf16 and float32
            f.eval()
            with full_float32():
                qc = [make_step(f, f, torch.optim.SGD(f.parameters(), lr=0.0), x0[:8], sde,
                                replace(cfg, dtype=dt), "u", 1, 1, LIBRARY, 1.0, seed=1)() for dt in ("bf16", "float32")]
            res["qc_bf16_rel_diff"] = ((qc[0].float() - qc[1]).norm() / qc[1].norm()).item()
        res |= sampler_speed(f.eval(), sde, cfg, device, sync)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark
    report(res)
    return res


@torch.no_grad()
def sampler_speed(f, sde, cfg, device, sync) -> dict:
    """PC sampler throughput and the likelihood's NFE and time, on sample_batch images."""
    score_fn = lambda x, t: qcsbm.score(f, x, t, sde, "u")
    x = sde.prior_sample((cfg.sample_batch, 3, cfg.image_size, cfg.image_size), device=device)
    sync()
    t0 = time.perf_counter()
    qcsbm.pc_sampler(score_fn, x, sde, cfg.sample_steps)
    sync()
    pc = cfg.sample_steps * cfg.sample_batch / (time.perf_counter() - t0)
    x0 = torch.rand(cfg.sample_batch, 3, cfg.image_size, cfg.image_size, device=device)
    t0 = time.perf_counter()
    _, nfe = qcsbm.bits_per_dim(score_fn, x0, sde, rtol=cfg.lik_tol, atol=cfg.lik_tol)
    return {"sample_steps_per_s_per_image": pc, "likelihood_nfe": nfe,
            "likelihood_s_per_image": (time.perf_counter() - t0) / cfg.sample_batch}


def report(res):
    cfg = res["config"]
    fast = "".join(f", {k}" for k in ("fast_conv", "fast_norm") if cfg.get(k))
    print(f"\n{cfg['model']} NCSN++ ({res['params']:,} params), {cfg['image_size']}x{cfg['image_size']}x3, "
          f"batch {cfg['batch_size']}, {cfg['dtype']}{fast}, {res['device']}, "
          f"threads {cfg['threads'] or 'default'}, "
          f"medians of {cfg['reps']} interleaved reps\n")
    print("| step | median s | spread s | images/s | time / U | peak extra MiB | memory / U |")
    print("|---|---|---|---|---|---|---|")
    for name, v in res["variants"].items():
        print(f"| {name} | {v['median_s']:.3f} | {v['spread_s']:.3f} | {v['images_per_s']:.2f} | "
              f"{v['time_vs_U']:.2f}x | {v['peak_mib']:.1f} | {v['mem_vs_U']:.2f}x |")
    print("\nWork per step (one step, every ATen call counted; conv units: convolution-sized products):\n")
    print("| step | conv units | vs U | bmm | ATen ops |")
    print("|---|---|---|---|---|")
    for name, v in res["variants"].items():
        print(f"| {name} | {v['conv_units']} | {v['conv_units_vs_U']:.2f}x | {v['bmm']} | {v['aten_ops']:,} |")
    if any(n.endswith("-rep") or "-f1/" in n for n in res["variants"]):
        print("(Counts are calls, not rows: a -rep step runs its calls on K times the rows, and a -f step calls the "
              "network twice, on fewer rows each.)")
    if res.get("out_of_memory"):
        print(f"\nOut of memory at this batch (not timed): {', '.join(res['out_of_memory'])}")
    if "qc_speedup_vs_two_pass" in res:
        print(f"\nQC1 is {res['qc_speedup_vs_two_pass']:.2f}x faster than the authors' two-pass form.")
    if res["grad_rel_err"]:
        print("Gradient rel. err of the reference formulations vs the library's: " +
              ", ".join(f"{k} {e:.1e}" for k, e in res["grad_rel_err"].items()))
    if "qc_bf16_rel_diff" in res:
        print(f"L_QC bf16 autocast vs float32, same batch: rel. diff {res['qc_bf16_rel_diff']:.2e}")
    print(f"PC sampler: {res['sample_steps_per_s_per_image']:.2f} steps/s per image; likelihood (rtol=atol="
          f"{cfg['lik_tol']:g}): {res['likelihood_nfe']} NFE, {res['likelihood_s_per_image']:.2f} s/image")
    out = Path(res["out_dir"]) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    cli.run(main)
