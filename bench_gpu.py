"""Issue 14's GPU measurements in one run: the U and QC1 training steps of the deep NCSN++ at batch 128,
float32 and bf16, eager and replayed from one CUDA graph, for the plain network, with NCSNppConfig.fast_conv,
and with fast_conv and fast_norm; the step at part of the batch (--qc_fraction); the exactness checks (TF32
off); and where a QC1 step's kernel time goes, by class of kernel. bench.py is the general, interleaved
benchmark; this file is the one prepared GPU session, so that a short loan of a GPU measures everything at once.

    python bench_gpu.py              # one CUDA GPU: the paper's deep model, batch 128 (~6 min on an H200, estimated)
    python bench_gpu.py --quick      # tiny model, batch 2, any device (CPU: no graph rows): checks this file

Writes results.json and results.md (the tables, ready for BENCHMARKS.md) to runs/bench_gpu (or
runs/bench_gpu_<what differs>, or --out_dir).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch.profiler import ProfilerActivity, profile

import bench
import cli
import qcsbm
from train_images import GraphedStep, make_capturable


@dataclass
class Config:
    model: str = "deep"            # tiny | small | deep (bench.py's MODELS; deep = the paper's CIFAR-10 model)
    batch_size: int = 128          # images per step (paper: 128)
    reps: int = 5                  # timed steps per row after the warm-up; medians reported
    lam: float = 1e-4              # weight of L_QC (paper, images: 1e-4)
    fractions: str = "0.5,0.25"    # --qc_fraction values timed (float32, eager)
    exact_batch: int = 8           # batch of the exactness checks (float32, TF32 off)
    device: str = "auto"           # auto | cpu | cuda
    out_dir: str = ""              # '' = runs/bench_gpu, or runs/bench_gpu_<what differs>
    quick: bool = False            # tiny model, batch 2: the whole script in seconds, CPU included


QUICK = dict(model="tiny", batch_size=2, reps=2, exact_batch=2)
# Kernel (GPU) or ATen operator (CPU) names -> class, first match wins. cuDNN's convolution kernels carry
# fprop / dgrad / wgrad (or "conv") in their names, even where they are implicit GEMMs.
CLASSES = [("convolution", r"conv|fprop|dgrad|wgrad|implicit|winograd"),
           ("matmul / bmm", r"gemm|bmm|matmul|addmm|\bmm\b|aten::mm"),
           ("reduction / norm / softmax", r"reduce|norm|moment|softmax|sum|mean|var|std"),
           ("layout copy", r"copy|memcpy|memset|nchw|nhwc|transpose|permute|contiguous|clone|cat"),
           ("elementwise", r"elementwise|vectorized|unrolled|aten::|kernel")]


def kernel_class(name: str) -> str:
    return next((c for c, pattern in CLASSES if re.search(pattern, name, re.I)), "other")


# The networks compared: the same parameters and function, different derivative kernels (NCSNppConfig).
NETS = {"plain": {}, "fast_conv": dict(fast_conv=True), "fast_conv+norm": dict(fast_conv=True, fast_norm=True)}


def build(cfg: Config, device, net: str = "plain", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return qcsbm.NCSNpp(qcsbm.NCSNppConfig(**NETS[net], **bench.MODELS[cfg.model])).to(device)


def make_step(f, opt, sde, x0, dtype: str, lam: float, qc_fraction: float = 1.0, graph: bool = False):
    """One training step (loss, backward, Adam; gradients reset before it) as a function of the batch."""
    gen = torch.Generator(x0.device).manual_seed(0)

    def net(x, std):  # bf16 autocasts the forward only; a CUDA graph cannot hold autocast's cast cache
        with torch.autocast(x.device.type, torch.bfloat16, enabled=dtype == "bf16", cache_enabled=not graph):
            return f(x, std).float()

    def step(x):
        total, _, qc = qcsbm.training_loss(net, x, sde, lam=lam, generator=gen, qc_fraction=qc_fraction)
        total.mean().backward()
        opt.step()
        return total

    if graph:
        make_capturable(opt, x0.device)
        return GraphedStep(step, opt, [gen])

    def eager(x):
        opt.zero_grad(set_to_none=True)
        return step(x)
    return eager


def time_row(step, x0, reps: int, sync) -> dict:
    """Seconds per step (median of `reps` after 4 warm-up calls, which also capture a graph) and peak memory."""
    for _ in range(4):
        step(x0)
    sync()
    if x0.is_cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(x0)
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if x0.is_cuda else float("nan")
    return {"median_s": statistics.median(times), "spread_s": max(times) - min(times),
            "images_per_s": len(x0) / statistics.median(times), "peak_gib": peak}


def save(out_dir: str, res: dict, name: str = "results.json"):
    """Write what has been measured so far, so that a crash late in a short GPU loan keeps the rest."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), "w") as fh:
        json.dump(res, fh, indent=1)


def step_rows(cfg: Config, device, sync, out_dir: str) -> list:
    """Every timed row: (dtype, net, mode, step) -> time, images/s, peak memory. bf16 and the fraction rows
    skip the fast_conv-only network, to keep the whole run short."""
    rows, sde = [], qcsbm.VESDE()
    x0 = torch.rand(cfg.batch_size, 3, 32, 32, device=device, generator=torch.Generator(device).manual_seed(1))
    modes = ("eager", "graph") if device.type == "cuda" else ("eager",)
    plan = [(dt, net, mode, name, frac) for dt in ("float32", "bf16") for net in NETS for mode in modes
            for name, frac in [("U", None), ("QC1", 1.0)] if dt == "float32" or net != "fast_conv"]
    plan += [("float32", net, "eager", f"QC1-f{frac:g}", frac) for net in ("plain", "fast_conv+norm")
             for frac in map(float, cli_list(cfg.fractions))]
    plan.sort(key=lambda p: p[1] == "fast_conv+norm" and p[2] == "graph")   # the largest captures last
    for dt, net, mode, name, frac in cli.progress(plan, desc="step rows"):
        f = build(cfg, device, net)
        opt = torch.optim.Adam(f.parameters(), lr=2e-4)
        step = make_step(f, opt, sde, x0, dt, cfg.lam if frac else 0.0, frac or 1.0, graph=mode == "graph")
        row = dict(dtype=dt, net=net, mode=mode, step=name)
        try:
            row |= time_row(step, x0, cfg.reps, sync)
        except torch.OutOfMemoryError:
            row |= {"median_s": float("nan"), "out_of_memory": True}
        except RuntimeError as e:       # on a GPU, a capture that runs out of memory can surface as another error
            if device.type != "cuda":
                raise
            row |= {"median_s": float("nan"), "error": str(e).splitlines()[0][:200]}
        rows.append(row)
        save(out_dir, {"steps": rows}, "steps_partial.json")
        print(" ", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        del f, opt, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:  # against the U step of the same dtype, network and mode
        u = next(r for r in rows if r["step"] == "U" and all(r[k] == row[k] for k in ("dtype", "net", "mode")))
        row["time_vs_U"] = row["median_s"] / u["median_s"]
    return rows


def cli_list(s: str) -> list:
    return [v for v in s.split(",") if v]


def grad_of(f, x0, sde, lam, traces=qcsbm.hutchinson_traces) -> torch.Tensor:
    f.zero_grad(set_to_none=True)
    torch.manual_seed(0)                                  # the same t, z, v and dropout masks every time
    gen = torch.Generator(x0.device).manual_seed(0)
    bench.backward(qcsbm.training_loss(f, x0, sde, lam=lam, generator=gen, traces=traces)[0].mean(), traces)
    return torch.cat([p.grad.flatten() for p in f.parameters()])


@bench.full_float32()
def exactness(cfg: Config, device) -> dict:
    """Relative differences, float32 with TF32 off: the fast networks' QC1 gradients against the plain
    network's (same weights), the library's QC1 gradient against the authors' two-pass form, and (CUDA) the
    parameters after graphed steps against eager ones."""
    sde, lam = qcsbm.VESDE(), 1.0                         # lam 1: the L_QC part is not lost in the DSM part
    x0 = torch.rand(cfg.exact_batch, 3, 32, 32, device=device, generator=torch.Generator(device).manual_seed(2))
    plain = build(cfg, device)
    ref = grad_of(plain, x0, sde, lam)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    out = {}
    for net in ("fast_conv", "fast_conv+norm"):
        fast = build(cfg, device, net)
        fast.load_state_dict(plain.state_dict())
        out[f"{net}_vs_plain"] = rel(grad_of(fast, x0, sde, lam), ref)
        del fast
    out["library_vs_two_pass"] = rel(ref, grad_of(plain, x0, sde, lam, bench.TwoPass()))
    if device.type == "cuda":
        finals = []
        for graph in (False, True):                       # 3 eager warm-up steps, then 3 (graphed) steps
            f = build(cfg, device)
            opt = torch.optim.Adam(f.parameters(), lr=2e-4)
            step = make_step(f, opt, sde, x0, "float32", cfg.lam, graph=graph)
            torch.manual_seed(3)
            for _ in range(6):
                step(x0)
            torch.cuda.synchronize()
            finals.append(torch.cat([p.detach().flatten() for p in f.parameters()]))
            del f, opt, step
        init = torch.cat([p.detach().flatten() for p in build(cfg, device).parameters()])
        out["graph_vs_eager_update"] = rel(finals[1] - init, finals[0] - init)
    return out


def kernel_split(cfg: Config, device, sync) -> dict:
    """Self time of one eager float32 QC1 step's GPU kernels (CPU: ATen operators) by class, for the plain
    network ("before") and fast_conv+norm ("after"), with the largest kernels, so that the classes can be checked
    by eye."""
    out, sde = {}, qcsbm.VESDE()
    x0 = torch.rand(cfg.batch_size, 3, 32, 32, device=device, generator=torch.Generator(device).manual_seed(1))
    cuda = device.type == "cuda"
    for net in ("plain", "fast_conv+norm"):
        f = build(cfg, device, net)
        step = make_step(f, torch.optim.Adam(f.parameters(), lr=2e-4), sde, x0, "float32", cfg.lam)
        step(x0), step(x0)
        sync()
        activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
        with bench.no_stderr(), profile(activities=activities) as prof:
            step(x0)
            sync()
        events = [e for e in prof.key_averages()
                  if (e.device_type.name == "CUDA" if cuda else e.key.startswith("aten::"))]
        own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
        classes, count = {}, 0
        for e in events:
            classes[kernel_class(e.key)] = classes.get(kernel_class(e.key), 0.0) + own(e) / 1e6
            count += e.count
        top = sorted(events, key=own, reverse=True)[:8]
        out[net] = {
            "total_s": sum(classes.values()), "kernels": count, "classes": classes,
            "top": [(e.key[:90], kernel_class(e.key), own(e) / 1e6, e.count) for e in top]}
        del f, step
        if cuda:
            torch.cuda.empty_cache()
    return out


def peak(row: dict) -> str:
    """Peak GPU memory of a row; a CPU run does not measure it here (bench.py does)."""
    gib = row.get("peak_gib", float("nan"))
    return "n/a (CPU)" if gib != gib else f"{gib:.1f}"


def markdown(res: dict) -> str:
    cfg, lines = res["config"], []
    lines += [f"{res['device']}, torch {res['torch']}, {cfg['model']} NCSN++ ({res['params']:,} parameters), "
              f"batch {cfg['batch_size']}, 32x32x3, lam {cfg['lam']:g}, one probe; medians of {cfg['reps']} steps "
              f"after 4 warm-up steps (a graph row captures at the 4th); peak memory above the model and Adam state.",
              "", "| dtype | network | mode | step | s / step | images/s | time / U | peak GiB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["steps"]:
        lines.append(f"| {r['dtype']} | {r['net']} | {r['mode']} | {r['step']} | "
                     f"{r['median_s']:.3f} | {r.get('images_per_s', float('nan')):.1f} | {r['time_vs_U']:.2f}x | "
                     f"{peak(r)} |" + (" out of memory |" if r.get("out_of_memory") else "")
                     + (f" failed: {r['error']} |" if r.get("error") else ""))
    lines += ["", "Exactness (float32, TF32 off, batch " + str(cfg["exact_batch"]) + "): relative differences",
              "", "| check | rel. diff |", "|---|---|"]
    lines += [f"| {k} | {v:.2e} |" for k, v in res["exactness"].items()]
    lines += ["", "Kernel classes are read from kernel names: fast_norm's composite GroupNorm and softmax run as "
              "elementwise and reduction kernels, so compare the two networks' totals, not their norm/softmax shares."]
    for which, split in res["kernels"].items():
        lines += ["", f"One eager float32 QC1 step, {which} network: "
                  f"{split['total_s']:.3f} s of {'kernel' if res['device'] != 'cpu' else 'operator'} time, "
                  f"{split['kernels']:,} calls", "", "| class | s | share |", "|---|---|---|"]
        lines += [f"| {c} | {s:.3f} | {s / split['total_s']:.0%} |"
                  for c, s in sorted(split["classes"].items(), key=lambda kv: -kv[1])]
        lines += ["", "| largest | class | s | calls |", "|---|---|---|---|"]
        lines += [f"| `{name}` | {c} | {s:.3f} | {n} |" for name, c, s, n in split["top"]]
    return "\n".join(lines) + "\n"


def main(argv=()) -> dict:
    cfg = cli.parse(Config, argv, quick=QUICK)
    if cfg.model not in bench.MODELS or cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--model takes one of {', '.join(bench.MODELS)} and --device one of auto, cpu, cuda; "
                         f"got {cfg.model!r}, {cfg.device!r}")
    if cfg.batch_size < 1 or cfg.reps < 1 or cfg.exact_batch < 1:
        raise ValueError("--batch_size, --reps and --exact_batch take integers >= 1")
    if not all(0 < float(v) <= 1 for v in cli_list(cfg.fractions)):
        raise ValueError(f"--fractions takes comma-separated numbers in (0, 1], got {cfg.fractions!r}")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    out_dir = cfg.out_dir or cli.run_dir("runs/bench_gpu", cfg, quick=QUICK, skip=("reps",))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    res = {"config": asdict(cfg), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "params": sum(p.numel() for p in build(cfg, "cpu").parameters())}
    res["exactness"] = exactness(cfg, device)
    print("exactness: " + ", ".join(f"{k} {v:.2e}" for k, v in res["exactness"].items()))
    save(out_dir, res)
    res["steps"] = step_rows(cfg, device, sync, out_dir)
    save(out_dir, res)
    res["kernels"] = kernel_split(cfg, device, sync)
    res["seconds"] = time.perf_counter() - start
    save(out_dir, res)
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write(markdown(res))
    print(markdown(res) + f"\ndone in {res['seconds']:.0f} s; {out_dir}/results.md and results.json")
    return res


if __name__ == "__main__":
    cli.run(main)
