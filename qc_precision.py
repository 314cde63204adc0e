"""L_QC under bf16 and float16 autocast against float32, on the same batch, probes and times (issue 15,
item 6; the numbers are in BENCHMARKS.md, "CPU: L_QC under bf16 and float16").

    OMP_NUM_THREADS=1 python qc_precision.py              # the BENCHMARKS.md figures (about a minute)
    python qc_precision.py --batches=1                    # one batch per model

Per model: qcsbm.training_loss's per-sample L_QC for 4 batches, each computed three times with the same
generator (same t, z, probes): float32, bf16 autocast and float16 autocast of the network forward, as
train_images.py autocasts it. Reported: how many samples are finite, the relative difference of the
batch mean, and the median and largest per-sample relative difference.
"""
import sys
import time
from dataclasses import dataclass

import torch

import cli
import image_io
import qcsbm


@dataclass
class Config:
    batches: int = 4                 # batches per model, each with its own t, z and probes


def measure(cfg, data, n=32, seeds=4) -> dict:
    """{"bf16" | "float16": (finite samples, samples, batch-mean rel diff, per-sample median, per-sample max)},
    each against float32 on the same batches, t, z and probes; printed as one line each."""
    torch.manual_seed(0)
    model = qcsbm.NCSNpp(cfg).eval()
    sde = qcsbm.VESDE(0.01, 50.0 if cfg.image_size == 32 else 5.0)
    dtypes = {"float32": torch.float32, "bf16": torch.bfloat16, "float16": torch.float16}
    out = {}
    for name, dtype in dtypes.items():
        def f(x, std):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                return model(x, std).float()
        vals = []
        for s in range(seeds):
            g = torch.Generator().manual_seed(s)
            _, _, qc = qcsbm.training_loss(f, data[s * n:(s + 1) * n], sde, param="qc", lam=1.0, slices=1,
                                           probe="rademacher", weighting="sigma2", generator=g)
            vals.append(qc.detach())
        out[name] = torch.cat(vals)
    ref, stats = out["float32"], {}
    for name in ("bf16", "float16"):
        q = out[name]
        rel = ((q - ref).abs() / ref.abs())
        rel = rel[torch.isfinite(rel)]
        nan = float("nan")
        stats[name] = (int(torch.isfinite(q).sum()), len(q), float((q.mean() - ref.mean()).abs() / ref.abs().mean()),
                       float(rel.median()) if len(rel) else nan, float(rel.max()) if len(rel) else nan)
        finite, total, mean_rel, median, largest = stats[name]
        print(f"  {name}: finite {finite}/{total}; batch-mean rel diff {mean_rel:.2e}; "
              f"per-sample rel diff median {median:.2e} max {largest:.2e}")
    return stats


def main(argv=None):
    cfg = cli.parse(Config, sys.argv[1:] if argv is None else argv)
    if cfg.batches <= 0:
        raise ValueError(f"--batches must be a positive integer, got {cfg.batches}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(cfg)
    finally:
        torch.set_num_threads(threads)


def run(cfg):
    digits = torch.from_numpy(image_io.load_uint8("digits", "", "train")).float() / 16
    if 32 * cfg.batches > len(digits):
        raise ValueError(f"--batches={cfg.batches} needs {32 * cfg.batches} training digits; there are "
                         f"{len(digits)}: use --batches={len(digits) // 32} or fewer")
    t0, results = time.time(), {}
    digits_net = dict(image_size=8, channels=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                      init_scale=1.0)
    print(f"digits 8x8, train_images --quick NCSN++ (nf 8, ch_mult 1,2, 1 block), init_scale 1, "
          f"{cfg.batches}x32 images")
    results["quick"] = measure(qcsbm.NCSNppConfig(nf=8, **digits_net), digits, seeds=cfg.batches)
    print("digits 8x8, digits preset NCSN++ (nf 32, ch_mult 1,2, 1 block), init_scale 1")
    results["digits"] = measure(qcsbm.NCSNppConfig(nf=32, **digits_net), digits, seeds=cfg.batches)
    print(f"32x32x3 uniform noise images, NCSNppConfig.tiny (nf 8, attention at 16), init_scale 1, "
          f"{cfg.batches}x8 images")
    g = torch.Generator().manual_seed(0)
    results["tiny"] = measure(qcsbm.NCSNppConfig.tiny(), torch.rand(8 * cfg.batches, 3, 32, 32, generator=g), n=8,
                              seeds=cfg.batches)
    print(f"{time.time()-t0:.0f} s")
    return results


if __name__ == "__main__":
    cli.run(main)
