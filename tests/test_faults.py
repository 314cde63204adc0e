"""Faults and bad input (issue 15): each one gets a clear error or a safe result. Readers, checkpoint
writes and the folder lock here; the scripts' own faults are at the end."""
import errno
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

import image_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- 14: the CIFAR reader never runs code from a data file ----

class CallsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def cifar_archive(root, payload):
    path = os.path.join(root, "cifar-10-python.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for m in [f"data_batch_{i}" for i in range(1, 6)]:
            blob = pickle.dumps(payload, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{m}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_cifar_pickle_calling_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    cifar_archive(str(tmp_path), {b"data": CallsSystem(str(marker)), b"labels": [0]})
    with pytest.raises(ValueError, match="refused to load the global posix.system"):
        image_io.load_uint8("cifar10", str(tmp_path), "train")
    assert not marker.exists()                       # the command never ran


def test_safe_unpickler_reads_what_cifar_holds():
    x = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    obj = {b"data": x, b"labels": [1, 2], b"batch_label": b"training batch 1 of 5", b"filenames": [b"a.png"],
           "n": 2, "t": (1, "s")}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        back = image_io.safe_unpickle(pickle.dumps(obj, protocol=protocol))
        assert np.array_equal(back[b"data"], x) and back[b"labels"] == [1, 2] and back["t"] == (1, "s")
    for bad in (eval, __import__, np.load):          # any other global is refused
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            image_io.safe_unpickle(pickle.dumps(bad, protocol=2))


# ---- 5: ImageNet npz files of another resolution ----

@pytest.mark.parametrize("side", [64, 16])
def test_imagenet_npz_of_another_resolution_is_refused(tmp_path, side):
    ok = np.zeros((2, 3072), np.uint8)
    for i in range(1, 11):
        np.savez(tmp_path / f"train_data_batch_{i}.npz", data=ok, labels=np.ones(2))
    bad = np.zeros((2, 3 * side * side), np.uint8)  # one batch file of the wrong download, among good ones
    np.savez(tmp_path / "train_data_batch_7.npz", data=bad, labels=np.ones(2))
    with pytest.raises(ValueError, match=f"train_data_batch_7.npz holds {side}x{side} images"):
        image_io.load_uint8("imagenet32", str(tmp_path), "train")
    np.savez(tmp_path / "train_data_batch_7.npz", data=ok, labels=np.ones(2))
    assert image_io.load_uint8("imagenet32", str(tmp_path), "train").shape == (20, 3, 32, 32)


# ---- 10: a full disk ----

def test_full_disk_gives_one_message_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    image_io.save_checkpoint({"step": 1}, path)
    real = torch.save

    def full(obj, fh, *a, **k):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(image_io.RunError) as e:
        image_io.save_checkpoint({"step": 2}, path, "the checkpoint of step 2")
    msg = str(e.value)
    assert path in msg and "the checkpoint of step 2" in msg and "No space left" in msg and "intact" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__   # one message, no chain
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]                          # no .tmp left behind


# ---- 3: the folder lock ----

def test_lock_refuses_a_second_run_and_is_released(tmp_path):
    with image_io.DirLock(str(tmp_path), "training run"):
        held = json.loads((tmp_path / ".lock").read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(image_io.RunError, match=f"another training run .*pid {os.getpid()} on"):
            image_io.DirLock(str(tmp_path), "training run").acquire()
    assert not (tmp_path / ".lock").exists()
    with image_io.DirLock(str(tmp_path), "training run"):              # free again
        pass


def test_lock_held_by_another_live_process_is_refused(tmp_path):
    code = ("import sys, time, image_io; l = image_io.DirLock(sys.argv[1], 'training run').acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(image_io.RunError, match=f"pid {proc.pid} on {socket.gethostname()}"):
            image_io.DirLock(str(tmp_path), "training run").acquire()
    finally:
        proc.kill()
        proc.wait()
    # killed (-9): its lock file stays, but is stale; the next run takes it over and says so
    assert (tmp_path / ".lock").exists()
    said = []
    with image_io.DirLock(str(tmp_path), "training run", say=said.append):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over the lock of pid {proc.pid}" in said[0] and "no longer running" in said[0]


def test_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()                                                          # a pid that is surely dead
    (tmp_path / ".lock").write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(),
                                                "started": "2026-01-01 00:00:00", "argv": ["x"]}))
    said = []
    image_io.DirLock(str(tmp_path), "evaluation", say=said.append).acquire().release()
    assert "taking over" in said[0]
    # a lock naming a live process on this host (one that could not flock) is not taken over
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                "started": "2026-01-01 00:00:00", "argv": ["x"]}))
    with pytest.raises(image_io.RunError, match=f"pid {os.getppid()}"):
        image_io.DirLock(str(tmp_path), "evaluation").acquire()


# ---- train_images.py ----

import qcsbm  # noqa: E402
import train_images as ti  # noqa: E402

TINY = ["--quick", "--sample_steps=2", "--n_samples=4", "--log_every=1"]


def train(out, *extra):
    return ti.main([*TINY, f"--out_dir={out}", *extra])


@pytest.mark.parametrize("arg, allowed", [
    ("--grad_clip=-1", "0 to turn clipping off"),            # 2: gradient ascent
    ("--steps=0", "positive number"), ("--steps=-5", "positive number"),
    ("--ema_decay=1", r"\[0, 1\)"), ("--ema_decay=-0.1", r"\[0, 1\)"),
    ("--num_res_blocks=0", "at least 1"), ("--ch_mult=", "one positive integer per resolution"),
    ("--ch_mult=1,0", "one positive integer"), ("--slices=0", "at least 1 probe"),
    ("--log_every=0", "at least 1 step"), ("--snapshot_every=0", "at least 1 step"),
    ("--lr=inf", "finite positive"), ("--lam=nan", "finite weight"), ("--batch_size=0", "positive"),
    ("--dtype=fp16", "float16 overflows"), ("--sigma_min=0", "0 < sigma_min < sigma_max"),
])
def test_train_images_refuses_values_that_make_no_sense(arg, allowed):
    with pytest.raises(ValueError, match=allowed) as e:
        ti.parse_config([arg])
    assert arg.split("=")[0] in str(e.value)


def test_train_images_refuses_cuda_without_cuda_and_an_out_dir_it_cannot_create(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device=cuda, but this machine has no CUDA device"):
        ti.parse_config(["--device=cuda"])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="--out_dir=.*cannot be created: .*a_file is a file"):
        ti.parse_config([f"--out_dir={tmp_path / 'a_file' / 'run'}"])
    assert ti.parse_config([f"--out_dir={tmp_path / 'new' / 'run'}"]).out_dir   # creatable: fine
    assert not (tmp_path / "new").exists()                                    # parsing creates nothing


def test_item8_non_finite_weights_are_never_written_and_the_message_says_what_is_on_disk(tmp_path, monkeypatch):
    real, calls = qcsbm.EMA.update, []

    def poison(self, model):                       # the weights go non-finite after the 3rd update
        real(self, model)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))

    monkeypatch.setattr(qcsbm.EMA, "update", poison)
    with pytest.raises(FloatingPointError, match="non-finite weights at step 3 .*not saved; .*ckpt.pt holds "
                                                 "the checkpoint of step 2"):
        train(tmp_path, "--steps=6", "--snapshot_every=1")
    assert image_io.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 2
    # With no checkpoint yet, the message says so instead of promising a "last good checkpoint".
    calls.clear()
    with pytest.raises(FloatingPointError, match="no checkpoint has been written to .*ckpt.pt"):
        train(tmp_path / "fresh", "--steps=6", "--snapshot_every=3")
    assert not (tmp_path / "fresh" / "ckpt.pt").exists()


def test_item3_a_second_training_run_in_the_same_out_dir_is_refused(tmp_path):
    with image_io.DirLock(str(tmp_path), "training run"):
        with pytest.raises(image_io.RunError, match=f"another training run .*pid {os.getpid()}"):
            train(tmp_path, "--steps=1")
    assert not (tmp_path / "ckpt.pt").exists()
    train(tmp_path, "--steps=1")                                          # released: runs
    assert not (tmp_path / ".lock").exists()


def test_item9_sigterm_exits_143_after_saving(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train_images.py"), *TINY, f"--out_dir={tmp_path}",
           "--steps=100000", "--snapshot_every=100000", "--log_every=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    for line in proc.stdout:                                          # wait for the first training step
        if "step       1" in line:
            break
    proc.terminate()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + 15, out[-2000:]
    assert "stopped by SIGTERM" in out
    assert image_io.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] >= 1


def test_item10_full_disk_during_training_is_one_message(tmp_path, monkeypatch):
    train(tmp_path, "--steps=1")
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(image_io.RunError, match=r"could not write the checkpoint of step 2 to .*ckpt.pt: No "
                                                r"space left on device .*previous file there is intact"):
        train(tmp_path, "--steps=2")
    monkeypatch.undo()
    assert image_io.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 1


# ---- evaluate.py ----

import dataclasses  # noqa: E402

import evaluate  # noqa: E402


def write_ckpt(path, seed, step=7):
    """An untrained --quick digits checkpoint (full-scale last layers), weights from `seed`."""
    torch.manual_seed(seed)
    cfg = ti.parse_config(["--quick", f"--out_dir={os.path.dirname(path)}"])
    arch = dataclasses.replace(ti.model_config(cfg), init_scale=1.0)
    model = qcsbm.NCSNpp(arch)
    image_io.save_checkpoint({"format": image_io.CHECKPOINT_FORMAT, "model": model.state_dict(),
                              "ema": qcsbm.EMA(model).state_dict(),
                              "optimizer": torch.optim.Adam(model.parameters()).state_dict(), "step": step,
                              "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(arch),
                              "rng": []}, str(path))
    return path


NLL = ["--eval=nll", "--nll_n=2", "--batch_size=2", "--tol=1e-2"]


def test_item1_a_replaced_checkpoint_of_the_same_step_is_evaluated_again(tmp_path):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", seed=0)
    first = evaluate.main([f"--ckpt={ckpt}", *NLL, f"--out_dir={tmp_path / 'eval'}"])
    write_ckpt(tmp_path / "ckpt.pt", seed=1)                      # a retrain: same path, same step
    second = evaluate.main([f"--ckpt={ckpt}", *NLL, f"--out_dir={tmp_path / 'eval'}"])
    fresh = evaluate.main([f"--ckpt={ckpt}", *NLL, f"--out_dir={tmp_path / 'fresh'}"])
    assert second["nll_bpd"] == fresh["nll_bpd"] != first["nll_bpd"]
    assert second["weights_sha256"] != first["weights_sha256"]
    # other evaluation settings get their own parts too
    other = evaluate.main([f"--ckpt={ckpt}", *NLL, "--seed=5", f"--out_dir={tmp_path / 'eval'}"])
    assert other["nll_bpd"] != second["nll_bpd"]


def test_item4_results_json_keeps_one_entry_per_checkpoint_and_is_written_atomically(tmp_path, monkeypatch):
    a, b = write_ckpt(tmp_path / "a.pt", seed=0), write_ckpt(tmp_path / "b.pt", seed=1)
    out = tmp_path / "eval"
    ra = evaluate.main([f"--ckpt={a}", *NLL, f"--out_dir={out}"])
    rb = evaluate.main([f"--ckpt={b}", *NLL, f"--out_dir={out}"])
    table = json.loads((out / "results.json").read_text())
    assert len(table) == 2
    by_ckpt = {e["ckpt"]: e for e in table.values()}
    assert by_ckpt[str(a)]["nll_bpd"] == ra["nll_bpd"] and by_ckpt[str(b)]["nll_bpd"] == rb["nll_bpd"]
    assert any(k.startswith(ra["weights_sha256"][:16]) and "a.pt" in k for k in table)   # keyed by identity
    # a crash while writing leaves the previous file whole
    before = (out / "results.json").read_text()

    def crash(fd):
        raise OSError(errno.EIO, "crash")

    monkeypatch.setattr(evaluate.os, "fsync", crash)
    with pytest.raises(OSError):
        evaluate.main([f"--ckpt={a}", *NLL, "--seed=1", f"--out_dir={out}"])
    assert (out / "results.json").read_text() == before
    # a results.json of the earlier, unkeyed layout is kept as one entry beside the new ones
    monkeypatch.undo()
    (out / "results.json").write_text(json.dumps({"ckpt": "old.pt", "step": 3, "nll_bpd": 9.9}))
    evaluate.main([f"--ckpt={a}", *NLL, f"--out_dir={out}"])
    table = json.loads((out / "results.json").read_text())
    assert len(table) == 2 and any(e.get("nll_bpd") == 9.9 for e in table.values())


def test_item3_two_evaluations_writing_the_same_results_are_refused(tmp_path):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", seed=0)
    with image_io.DirLock(str(tmp_path / "eval"), "evaluation"):
        with pytest.raises(image_io.RunError, match=f"another evaluation .*pid {os.getpid()}"):
            evaluate.main([f"--ckpt={ckpt}", *NLL, f"--out_dir={tmp_path / 'eval'}"])
    assert not (tmp_path / "eval" / "results.json").exists()


def test_item13_a_truncated_part_is_recomputed_with_a_warning(tmp_path, capsys):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", seed=0)
    args = [f"--ckpt={ckpt}", "--eval=nll", "--nll_n=4", "--batch_size=2", "--tol=1e-2", f"--out_dir={tmp_path / 'e'}"]
    full = evaluate.main(args)
    part = sorted((tmp_path / "e" / "parts").glob("nll_*/000001.npz"))[0]
    part.write_bytes(part.read_bytes()[:40])                      # cut short
    again = evaluate.main(args)
    assert "is damaged" in capsys.readouterr().err
    assert again["nll_bpd"] == full["nll_bpd"]


@pytest.mark.parametrize("arg, allowed", [
    ("--tol=0", "finite tolerance > 0"), ("--tol=-1e-5", "finite tolerance > 0"),   # 7: a hang
    ("--nll_n=-1", ">= 0"), ("--slices=0", "at least 1 probe"), ("--batch_size=0", "at least 1"),
    ("--sample_steps=0", "at least 1"), ("--asym_n=0", "at least 1"),
])
def test_evaluate_refuses_values_that_make_no_sense(tmp_path, arg, allowed):
    with pytest.raises(ValueError, match=allowed) as e:
        evaluate.main([f"--ckpt={tmp_path / 'never_read.pt'}", arg])
    assert arg.split("=")[0] in str(e.value)


def test_item11_a_non_checkpoint_is_refused_without_suggesting_weights_only_false(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(CallsSystem(str(tmp_path / "pwned")), path)       # a pickle that would run a command
    with pytest.raises(ValueError) as e:
        evaluate.main([f"--ckpt={path}", *NLL])
    assert "not a checkpoint" in str(e.value) and "weights_only" not in str(e.value)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot read .*notes.txt"):
        evaluate.main([f"--ckpt={tmp_path / 'notes.txt'}", *NLL])


# ---- toy.py, autoencoder.py, bench.py ----

import autoencoder  # noqa: E402
import bench  # noqa: E402
import toy  # noqa: E402


@pytest.mark.parametrize("parse, arg, allowed", [
    (toy.parse, "--rtol=0", "finite tolerance > 0"),                 # 7: hangs
    (bench.parse, "--lik_tol=0", "finite tolerance > 0"),
    (bench.parse, "--lik_tol=-1", "finite tolerance > 0"),
    (toy.parse, "--lams=-1", "finite weights >= 0"), (toy.parse, "--lams=0,nan", "finite weights >= 0"),
    (toy.parse, "--levels=0", r"in \(0, 1\]"), (toy.parse, "--levels=0.5,1.5", r"in \(0, 1\]"),
    (autoencoder.parse, "--clip=-1", "0 to turn clipping off"),      # 2: gradient ascent
    (autoencoder.parse, "--sigma=0", "noise level > 0"), (autoencoder.parse, "--batch_size=0", "at least 1"),
    (autoencoder.parse, "--grid=0", "at least 1 point"), (autoencoder.parse, "--steps=0", "at least 1"),
])
def test_scripts_refuse_values_that_make_no_sense(tmp_path, monkeypatch, parse, arg, allowed):
    monkeypatch.chdir(tmp_path)                                       # toy.parse checks its out folder
    with pytest.raises(ValueError, match=allowed) as e:
        parse([arg, f"--out_dir={tmp_path}"] if parse is not bench.parse else [arg])
    assert arg.split("=")[0] in str(e.value)


def test_autoencoder_clip_0_means_off(tmp_path, monkeypatch):
    seen, real = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m: seen.append(m) or real(p, m))
    autoencoder.main(["--quick", "--clip=0", "--steps=3", "--log_every=1", f"--out_dir={tmp_path}"])
    assert seen and all(m == float("inf") for m in seen)         # not 0, which would zero every gradient
