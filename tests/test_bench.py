"""bench.py: the quick run end to end, the work each step does, the reference L_QC formulations against
the library's gradient, the CPU peak-memory measurement against a known allocation, and bad options."""
import json
import os

import pytest
import torch

import bench
import qcsbm


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run (tiny model, every variant), in a temporary directory."""
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(tmp_path_factory.mktemp("bench"))
    try:
        res = bench.main(["--quick"])
        saved = json.loads(open("runs/bench_quick/results.json").read())
    finally:
        os.chdir(cwd)
    assert torch.get_num_threads() == threads, "bench.main must restore the thread count"
    return res, saved


def test_quick_run_times_and_measures_every_variant(quick):
    res, saved = quick
    assert list(res["variants"]) == list(bench.VARIANTS)
    for name, v in res["variants"].items():
        assert v["median_s"] > 0 and v["spread_s"] >= 0 and v["peak_mib"] > 0, name
    u, qc1, qc4 = (res["variants"][k] for k in ("U", "QC1", "QC4"))
    assert u["time_vs_U"] == 1.0
    # L_QC keeps two VJP graphs on top of the forward graph; four probes keep eight VJP graphs on the one
    # forward graph, less than four repeated batches do.
    assert qc1["peak_mib"] > 1.5 * u["peak_mib"]
    assert 2.0 * qc1["peak_mib"] < qc4["peak_mib"] < res["variants"]["QC4-rep"]["peak_mib"]
    assert res["qc_speedup_vs_two_pass"] > 0
    assert res["sample_steps_per_s_per_image"] > 0 and res["likelihood_nfe"] > 0
    assert saved["variants"].keys() == res["variants"].keys()


def test_reference_formulations_give_the_library_gradient(quick):
    res, _ = quick
    assert set(res["grad_rel_err"]) == {"QC1-dvjp", "QC1-2pass"}
    assert all(err < 1e-4 for err in res["grad_rel_err"].values()), res["grad_rel_err"]  # float32


def test_work_per_step_matches_the_pass_count(quick):
    """A QC step runs each convolution 3x as often as a U step (forward, two VJPs, one backward through
    three graphs: 9 units against 3), attention's bilinear products 5x, and the two-pass form adds one
    more backward through a VJP graph and the forward graph (13 units against 9). A regression such
    as PyTorch's per-channel double backward of the FIR convolutions would show here."""
    v = quick[0]["variants"]
    conv = {k: v[k]["conv_units"] for k in v}
    assert 2.9 < conv["QC1"] / conv["U"] < 3.2, conv
    assert v["QC1"]["bmm"] == 5 * v["U"]["bmm"] and v["QC1-dvjp"]["bmm"] == v["QC1"]["bmm"]
    assert 1.35 < conv["QC1-2pass"] / conv["QC1"] < 1.5, conv
    # K probes on one forward pass: 3 + 6K units (QC4 27, QC16 99 against QC1's 9); repeating the batch
    # K times (the earlier form) runs QC1's calls on K times the rows.
    assert 2.8 < conv["QC4"] / conv["QC1"] < 3.2 and 10.5 < conv["QC16"] / conv["QC1"] < 11.5, conv
    assert conv["QC4-rep"] == conv["QC16-rep"] == conv["QC1"], conv


def test_reference_formulations_exact_in_float64():
    """The authors' two-pass form and the double-VJP form against the library's, to float64 precision
    (three formulations that share only the first VJP), on the 2-D MLP (NCSN++: float32, above)."""
    torch.manual_seed(0)
    f = qcsbm.MLP(dim=2).double()
    x0 = torch.randn(16, 2, dtype=torch.float64)
    for name in ("QC1-dvjp", "QC1-2pass"):
        assert bench.grad_rel_err(f, x0, qcsbm.VESDE(0.1, 3.0), bench.VARIANTS[name][3]) < 1e-10, name
    two_pass = bench.TwoPass()                                     # and with several probes at once
    torch.manual_seed(1)
    loss = qcsbm.training_loss(f, x0, qcsbm.VESDE(0.1, 3.0), lam=1.0, slices=3, traces=two_pass)[0].mean()
    bench.backward(loss, two_pass)
    ours = [p.grad.clone() for p in f.parameters()]
    f.zero_grad()
    torch.manual_seed(1)
    qcsbm.training_loss(f, x0, qcsbm.VESDE(0.1, 3.0), lam=1.0, slices=3)[0].mean().backward()
    assert all(torch.allclose(a, p.grad, rtol=1e-10, atol=1e-12) for a, p in zip(ours, f.parameters()))
    assert not two_pass.pending


def test_cpu_peak_memory_sees_a_known_transient_allocation():
    n = 2 ** 21                                                    # 2M float32 = 8 MiB

    def step():
        a = torch.ones(n)
        b = a * 2                                                  # 16 MiB live at once
        del a, b
    assert 15.9 < bench.peak_memory_mib(step, torch.device("cpu")) < 17.0


def test_bf16_quick_reports_the_qc_difference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = bench.main(["--quick", "--dtype=bf16", "--variants=QC1", "--sample_steps=1", "--lik_tol=0.1"])
    assert list(res["variants"]) == ["U", "QC1"]
    assert 0 < res["qc_bf16_rel_diff"] < 1                        # bf16 differs, but not wildly


@pytest.mark.parametrize("argv, words", [
    (["--modle=tiny"], ["--model", "--batch_size"]),
    (["--model=huge"], ["tiny", "small", "deep"]),
    (["--dtype=fp16"], ["float32", "bf16"]),
    (["--variants=U,QC2"], ["QC1", "QC1-2pass"]),
    (["--batch_size=eight"], ["--batch_size", "integer"]),
    (["--compile=maybe"], ["--compile", "true or false"]),
])
def test_bad_options_name_the_valid_ones(argv, words):
    with pytest.raises(ValueError) as err:
        bench.parse(argv)
    assert all(w in str(err.value) for w in words)


def test_a_variant_that_runs_out_of_memory_is_reported_and_the_others_timed(tmp_path, monkeypatch):
    """On a GPU the paper's batch of 128 does not fit a QC step: bench.py must say so, not crash."""
    def too_big(s, x, v, create_graph=True):
        if len(x) > 2:                                             # the gradient check (2 images) fits
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return qcsbm.hutchinson_traces(s, x, v, create_graph)
    monkeypatch.setitem(bench.VARIANTS, "QC1-2pass", ("u", 1, 1, lambda: too_big, 1.0))
    monkeypatch.chdir(tmp_path)
    res = bench.main(["--quick", "--batch_size=3", "--variants=QC1,QC1-2pass", "--sample_steps=1", "--lik_tol=0.1"])
    assert res["out_of_memory"] == ["QC1-2pass"]
    assert list(res["variants"]) == ["U", "QC1"] and "qc_speedup_vs_two_pass" not in res


def test_a_compiler_failure_is_one_clear_error(monkeypatch):
    """torch.compile's failures (InductorError, BackendCompilerFailed) become one line naming --compile."""
    from torch._inductor.exc import InductorError

    def broken(*args, **kwargs):
        raise InductorError(RuntimeError("C++ compile error"), None)
    with pytest.raises(ValueError, match="--compile failed here.*InductorError.*without --compile"):
        bench.compiled_step(broken, compiling=True)
    with pytest.raises(ZeroDivisionError):                              # other errors pass through
        bench.compiled_step(lambda: 1 / 0, compiling=True)
    assert bench.compiled_step(lambda: 7, compiling=False) == 7


def test_fast_conv_does_the_same_convolution_work(tmp_path, monkeypatch):
    """With NCSNppConfig.fast_conv the QC step still runs 3x U's convolution units: the VJPs compute no
    weight gradients (without input_grads_only they would, 11 units against 9)."""
    monkeypatch.chdir(tmp_path)
    v = bench.main(["--quick", "--fast_conv", "--variants=U,QC1", "--reps=1"])["variants"]
    assert 2.9 < v["QC1"]["conv_units"] / v["U"]["conv_units"] < 3.2, v


def test_qc_precision_script_runs_and_bf16_stays_close_to_float32(capsys):
    """qc_precision.py (BENCHMARKS.md's bf16 / float16 table), one batch per model: bf16 L_QC is finite
    everywhere and its batch mean within a few percent of float32's (measured: at most 1.3e-2)."""
    import qc_precision
    results = qc_precision.main(["--batches=1"])
    assert set(results) == {"quick", "digits", "tiny"}
    for stats in results.values():
        finite, total, mean_rel, median, largest = stats["bf16"]
        assert finite == total and mean_rel < 0.05 and median <= largest < 0.2
    assert "float16: finite" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--batches must be a positive integer"):
        qc_precision.main(["--batches=0"])
    with pytest.raises(ValueError, match="needs 3200 training digits"):
        qc_precision.main(["--batches=100"])
