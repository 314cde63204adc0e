"""bench_gpu.py, the prepared GPU session, run on the CPU with the tiny model: it must run end to end, its
exactness checks must hold, and its tables must say what they measured."""
import json

import pytest

import bench_gpu


def test_kernel_classes():
    assert bench_gpu.kernel_class("cutlass_tensorop_s1688fprop_optimized_tf32_64x64") == "convolution"
    assert bench_gpu.kernel_class("sm90_xmma_wgrad_implicit_gemm_tf32f32") == "convolution"
    assert bench_gpu.kernel_class("ampere_sgemm_128x64_nn") == "matmul / bmm"
    assert bench_gpu.kernel_class("void at::native::vectorized_elementwise_kernel<4, silu>") == "elementwise"
    assert bench_gpu.kernel_class("void at::native::reduce_kernel<512, 1>") == "reduction / norm / softmax"
    assert bench_gpu.kernel_class("Memcpy DtoD (Device -> Device)") == "layout copy"


def test_quick_run_on_the_cpu(tmp_path):
    res = bench_gpu.main(["--quick", "--reps=1", "--fractions=0.5", f"--out_dir={tmp_path}"])
    assert res["exactness"]["fast_conv_vs_plain"] < 1e-5          # float32, the same weights
    assert res["exactness"]["fast_conv+norm_vs_plain"] < 1e-5
    assert res["exactness"]["library_vs_two_pass"] < 1e-5
    steps = {(r["dtype"], r["net"], r["step"]) for r in res["steps"]}
    assert {("float32", "fast_conv", "QC1"), ("float32", "fast_conv+norm", "QC1"), ("bf16", "fast_conv+norm", "QC1"),
            ("bf16", "plain", "U"), ("float32", "plain", "QC1-f0.5")} <= steps
    assert ("bf16", "fast_conv", "QC1") not in steps             # skipped to keep the GPU run short
    assert set(res["kernels"]) == {"plain", "fast_conv+norm"}
    assert all(r["mode"] == "eager" for r in res["steps"])       # no graph rows without CUDA
    for split in res["kernels"].values():
        assert split["total_s"] > 0 and split["classes"]["convolution"] > 0
        assert sum(split["classes"].values()) == pytest.approx(split["total_s"])
    md = (tmp_path / "results.md").read_text()
    assert "| float32 | fast_conv+norm | eager | QC1 |" in md and "fast_conv_vs_plain" in md and "convolution" in md
    assert json.loads((tmp_path / "results.json").read_text())["device"] == "cpu"


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="--fractions"):
        bench_gpu.main(["--quick", "--fractions=0,2"])
