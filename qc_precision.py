"""L_QC under bf16 and float16 autocast against float32, on the same batch, probes and times (issue 15,
item 6; the numbers are in BENCHMARKS.md, "CPU: L_QC under bf16 and float16").

    OMP_NUM_THREADS=1 python qc_precision.py

Per model: qcsbm.training_loss's per-sample L_QC for 4 batches, each computed three times with the same
generator (same t, z, probes): float32, bf16 autocast and float16 autocast of the network forward, as
train_images.py autocasts it. Reported: how many samples are finite, the relative difference of the
batch mean, and the median and largest per-sample relative difference.
"""
import sys
import time

import torch

import image_io
import qcsbm


def measure(cfg, data, n=32, seeds=4):
    torch.manual_seed(0)
    model = qcsbm.NCSNpp(cfg).eval()
    sde = qcsbm.VESDE(0.01, 50.0 if cfg.image_size == 32 else 5.0)
    out = {}
    for dt in ("fp32", "bf16", "fp16"):
        vals = []
        for s in range(seeds):
            def f(x, std):
                with torch.autocast("cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(dt, torch.float32), enabled=dt != "fp32"):
                    return model(x, std).float()
            g = torch.Generator().manual_seed(s)
            _, _, qc = qcsbm.training_loss(f, data[s * n:(s + 1) * n], sde, "qc", 1.0, 1, "rademacher", "sigma2", g)
            vals.append(qc.detach())
        out[dt] = torch.cat(vals)
    ref = out["fp32"]
    for dt in ("bf16", "fp16"):
        q = out[dt]
        rel = (q - ref).abs() / ref.abs()
        print(f"  {dt}: finite {int(torch.isfinite(q).sum())}/{len(q)}; batch-mean rel diff "
              f"{((q.mean() - ref.mean()).abs() / ref.abs().mean()).item():.2e}; per-sample rel diff median "
              f"{rel[torch.isfinite(rel)].median().item() if torch.isfinite(rel).any() else float('nan'):.2e} max {rel[torch.isfinite(rel)].max().item() if torch.isfinite(rel).any() else float('nan'):.2e}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    digits = torch.from_numpy(image_io.load_uint8("digits", "", "train")).float() / 16
    t0 = time.time()
    print("digits 8x8, train_images --quick NCSN++ (nf 8, ch_mult 1,2, 1 block), init_scale 1, 4x32 images")
    measure(qcsbm.NCSNppConfig(image_size=8, channels=1, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, init_scale=1.0), digits)
    print("digits 8x8, digits preset NCSN++ (nf 32, ch_mult 1,2, 1 block), init_scale 1")
    measure(qcsbm.NCSNppConfig(image_size=8, channels=1, nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, init_scale=1.0), digits)
    print("32x32x3 uniform noise images, NCSNppConfig.tiny (nf 8, attention at 16), init_scale 1, 4x8 images")
    g = torch.Generator().manual_seed(0)
    measure(qcsbm.NCSNppConfig.tiny(), torch.rand(32, 3, 32, 32, generator=g), n=8)
    print(f"{time.time()-t0:.0f} s")
