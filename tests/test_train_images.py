"""train_images.py: config parsing, bit-identical resume, DDP == one process, faults and interruptions."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import image_io
import qcsbm
import train_images as ti

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny QC run on digits: 49k parameters, batch 16, a 2-step sampler for the grids.
TINY = ["--quick", "--sample_steps=2", "--n_samples=4", "--log_every=1"]



def run(out, *extra):
    return ti.main([*TINY, f"--out_dir={out}", *extra])


def state(path):
    return image_io.load_checkpoint(os.path.join(path, "ckpt.pt"))


def test_parse_config_presets_types_and_errors():
    cfg = ti.parse_config([])
    assert (cfg.preset, cfg.data, cfg.method, cfg.out_dir) == ("digits", "digits", "qc", "runs/digits")
    cfg = ti.parse_config(["--preset=cifar10_qc_finetune", "--lam=2e-4", "--ch_mult=1,2", "--hflip=false"])
    assert (cfg.method, cfg.lam, cfg.ch_mult, cfg.hflip, cfg.steps) == ("qc", 2e-4, (1, 2), False, 700_000)
    assert cfg.init_from == "runs/cifar10/ckpt.pt" and cfg.batch_size == 128 and cfg.warmup == 5000
    assert ti.parse_config(["--quick"]).out_dir == "runs/digits_quick"
    with pytest.raises(ValueError, match="valid keys: .*--lam"):
        ti.parse_config(["--lambda=1"])
    with pytest.raises(ValueError, match="valid choices: .*cifar10_qc_finetune"):
        ti.parse_config(["--preset=cifar"])
    with pytest.raises(ValueError, match="valid choices"):
        ti.parse_config(["--method=qcsbm"])
    with pytest.raises(ValueError, match="--steps takes an integer, got 'many'"):
        ti.parse_config(["--steps=many"])


def test_resume_is_bit_identical(tmp_path, capsys):
    # Dropout and flips on, so every random stream (data, noise, torch's global RNG) must be restored.
    common = ["--dropout=0.1", "--hflip=true", "--snapshot_every=2"]
    run(tmp_path / "once", "--steps=4", *common)
    run(tmp_path / "twice", "--steps=2", *common)
    run(tmp_path / "twice", "--steps=4", *common)
    assert "resumed at step 2" in capsys.readouterr().out
    a, b = state(tmp_path / "once"), state(tmp_path / "twice")
    assert a["step"] == b["step"] == 4
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == 4
    for key, sa, sb in [("model", a["model"], b["model"]), ("ema", a["ema"]["model"], b["ema"]["model"])]:
        for name in sa:
            assert torch.equal(sa[name], sb[name]), (key, name)
    for p, q in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(p["exp_avg_sq"], q["exp_avg_sq"])
    # ... and a run that is not resumed from the same point does differ (the test can fail).
    run(tmp_path / "other", "--steps=4", "--seed=1", *common)
    c = state(tmp_path / "other")
    assert not torch.equal(a["model"]["conv_in.weight"], c["model"]["conv_in.weight"])


def test_checkpoint_contents_and_model_from_checkpoint(tmp_path):
    run(tmp_path, "--steps=2")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt) == {"format", "model", "ema", "optimizer", "step", "config", "model_config", "rng"}
    assert ckpt["step"] == 2 and ckpt["config"]["method"] == "qc" and len(ckpt["rng"]) == 1
    assert ckpt["ema"]["num_updates"] == 2 and ckpt["model_config"]["nf"] == 8
    model, cfg, step = image_io.model_from_checkpoint(str(tmp_path / "ckpt.pt"))
    assert cfg["nf"] == 8 and not model.training and step == 2
    assert torch.equal(model.conv_in.weight, ckpt["ema"]["model"]["conv_in.weight"])
    assert not torch.equal(model.conv_in.weight, ckpt["model"]["conv_in.weight"])
    assert (tmp_path / "samples_0000002.png").exists() and (tmp_path / "config.json").exists()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"loss_qc"' in lines[0] and '"images_per_sec"' in lines[0]


def test_other_model_config_is_refused_and_nothing_overwritten(tmp_path):
    run(tmp_path, "--steps=1")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match="nf: 8 in the checkpoint, 16 now"):
        run(tmp_path, "--steps=2", "--nf=16")
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_init_from_u_checkpoint_for_qc_finetune(tmp_path, capsys):
    run(tmp_path / "u", "--steps=2", "--method=u")
    out = run(tmp_path / "qc", "--steps=3", "--method=qc", f"--init_from={tmp_path / 'u' / 'ckpt.pt'}")
    assert "initialized from" in capsys.readouterr().out and out["step"] == 3
    assert state(tmp_path / "qc")["config"]["method"] == "qc"
    with pytest.raises(ValueError, match="ch_mult"):
        run(tmp_path / "qc2", "--steps=3", "--ch_mult=1,1", f"--init_from={tmp_path / 'u' / 'ckpt.pt'}")


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = qcsbm.training_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        total, dsm, qc = real(*args, **kwargs)
        return (total * float("nan"), dsm, qc) if len(calls) == 3 else (total, dsm, qc)

    monkeypatch.setattr(qcsbm, "training_loss", poisoned)
    with pytest.raises(FloatingPointError, match="at step 3.*ckpt.pt holds the checkpoint of step 2"):
        run(tmp_path, "--steps=6", "--snapshot_every=2")
    ckpt = state(tmp_path)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_sigterm_saves_before_exit(tmp_path, monkeypatch, capsys):
    real, calls = qcsbm.training_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)     # arrives in the middle of step 2
        return real(*args, **kwargs)

    monkeypatch.setattr(qcsbm, "training_loss", interrupted)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--steps=50", "--snapshot_every=50")
    assert e.value.code == 128 + signal.SIGTERM                   # not 0: the run did not finish
    assert state(tmp_path)["step"] == 2
    assert "stopped by SIGTERM at step 2" in capsys.readouterr().out
    assert not (tmp_path / ".lock").exists()                      # the lock is released
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL    # handlers restored


def test_bf16_autocast_trains(tmp_path):
    out = run(tmp_path, "--steps=2", "--dtype=bf16")
    assert out["step"] == 2 and all(torch.isfinite(p).all() for p in out["model"].parameters())


def test_cuda_graph_says_where_it_cannot_apply(tmp_path):
    with pytest.raises(ValueError, match="--cuda_graph needs a CUDA device; this run is on 'cpu'"):
        run(tmp_path, "--device=cpu", "--cuda_graph")
    assert not os.path.exists(tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="--cuda_graph runs one process; under torchrun \\(2 processes\\)"):
        ti.check_cuda_graph(torch.device("cuda", 0), world=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_equal_eager_steps(tmp_path):
    """Steps 1-3 run eagerly, steps 4-6 replay the captured graph; losses and parameter updates match an
    eager run's (TF32 off, so both compute in float32)."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        runs = {mode: run(tmp_path / mode, "--device=cuda", "--steps=6", *extra)
                for mode, extra in [("eager", []), ("graph", ["--cuda_graph"])]}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.manual_seed(0)                                                 # the runs' initialization
    init = torch.cat([p.flatten() for p in qcsbm.NCSNpp(ti.model_config(ti.parse_config(TINY))).parameters()])
    eager, graph = (torch.cat([p.detach().cpu().flatten() for p in runs[m]["model"].parameters()]) - init
                    for m in ("eager", "graph"))
    assert ((graph - eager).norm() / eager.norm()).item() < 1e-4
    losses = {m: [json.loads(line)["loss"] for line in open(tmp_path / m / "log.jsonl")] for m in runs}
    assert len(losses["graph"]) == 6 and losses["graph"] == pytest.approx(losses["eager"], rel=1e-4)


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def test_resume_with_another_objective_is_refused(tmp_path):
    """A run folder holds one run: resuming it with another method or lam is an error that says what
    differs and how to start a new run from its weights; the checkpoint is untouched."""
    run(tmp_path, "--steps=1", "--snapshot_every=1")
    before = state(tmp_path)
    for change, said in [("--method=u", "method='qc' there, method='u' now"), ("--lam=0.5", "lam=")]:
        with pytest.raises(ValueError, match="another objective") as e:
            run(tmp_path, "--steps=2", change)
        assert said in str(e.value) and "--init_from=" in str(e.value) and "another --out_dir" in str(e.value)
    assert state(tmp_path)["step"] == before["step"] == 1
    run(tmp_path / "u", "--steps=2", "--method=u", f"--init_from={tmp_path / 'ckpt.pt'}")   # the way it says


def test_kill_9_leaves_a_complete_checkpoint_and_resume_works(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train_images.py"), *TINY, f"--out_dir={tmp_path}",
           "--steps=10000", "--snapshot_every=1", "--n_samples=1", "--sample_steps=1", "--log_every=100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    deadline = time.time() + 120
    while not (tmp_path / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.5)                                   # a few more checkpoints, then kill -9 mid-step
    proc.kill()
    proc.wait()
    step = state(tmp_path)["step"]                    # a complete checkpoint (maybe a stale .tmp beside it)
    assert step >= 1
    out = run(tmp_path, f"--steps={step + 1}")
    assert out["step"] == step + 1


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    args = [*TINY, "--steps=1", "--batch_size=8", "--lam=0.01", "--grad_clip=0"]
    with socket.socket() as sock:                     # an explicit free port on 127.0.0.1 (as in CI)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={port}",
                          os.path.join(ROOT, "train_images.py"), *args, f"--out_dir={tmp_path}"],
                         env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = state(tmp_path)
    assert len(ddp["rng"]) == 2

    # One process, the concatenated global batch; each half keeps the noise stream of its rank.
    cfg = ti.parse_config(args)
    torch.manual_seed(cfg.seed)
    model = qcsbm.NCSNpp(ti.model_config(cfg))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data = torch.from_numpy(image_io.load_uint8("digits", "", "train"))
    x0 = ti.get_batch(data, 17, torch.Generator().manual_seed(cfg.seed), 8, 0, 1, False)
    total = torch.cat([qcsbm.training_loss(model, half, ti.make_sde(cfg), param="qc", lam=cfg.lam,
                                           generator=torch.Generator().manual_seed(cfg.seed + rank))[0]
                       for rank, half in enumerate(x0.chunk(2))])
    total.mean().backward()
    opt.step()
    # Adam's first step is about lr * sign(g), so compare the gradient itself: exp_avg = (1 - beta1) g,
    # and the parameters wherever the gradient is not numerically zero (there its sign is round-off).
    for (name, p), s in zip(model.named_parameters(), ddp["optimizer"]["state"].values()):
        torch.testing.assert_close(s["exp_avg"], 0.1 * p.grad, rtol=1e-4, atol=1e-8, msg=name)
        live = p.grad.abs() > 1e-6
        torch.testing.assert_close(ddp["model"][name][live], p.detach()[live], rtol=1e-5, atol=1e-6, msg=name)


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path):
    """Missing data: the error names the files, and the run folder it would have used is not left behind."""
    with pytest.raises(Exception, match="no cifar10 data") as e:
        ti.main(["--preset=cifar10", f"--data_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'run'}",
                 "--steps=1", "--nf=8", "--ch_mult=1", "--num_res_blocks=1", "--attn_resolutions=", "--device=cpu"])
    assert "cifar-10-python.tar.gz" in str(e.value)
    assert not (tmp_path / "run").exists()
