"""evaluate.py: Frechet distance against closed forms, PRDC on identical / far-apart sets, IS on known
distributions, the clear messages when the Inception library or its weights are missing, the digits
classifier, an interrupted-then-resumed NLL evaluation, and samples independent of process count."""
import dataclasses
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

import evaluate
import image_io
import qcsbm
import train_images

REPO = Path(__file__).resolve().parents[1]



def random_spd(rng, d):
    A = rng.normal(size=(d, d))
    return A @ A.T + 0.1 * np.eye(d)


# ---- Frechet distance, IS, PRDC ----

def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
    assert evaluate.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]),
                                     np.array([[9.0]])) == pytest.approx(4 + 1, rel=1e-12)
    # Commuting (diagonal) covariances: ||dmu||^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b, mu1, mu2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5), rng.normal(size=5), rng.normal(size=5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # Non-commuting 2x2: for a 2x2 matrix with eigenvalues >= 0, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)),
    # and S1 S2 has the eigenvalues of the PSD matrix S1^1/2 S2 S1^1/2.
    for _ in range(5):
        S1, S2, m1, m2 = random_spd(rng, 2), random_spd(rng, 2), rng.normal(size=2), rng.normal(size=2)
        tr_root = np.sqrt(np.trace(S1 @ S2) + 2 * np.sqrt(np.linalg.det(S1 @ S2)))
        want = ((m1 - m2) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2 * tr_root
        assert evaluate.frechet_distance(m1, S1, m2, S2) == pytest.approx(want, rel=1e-9)
    # 30-D against scipy's general matrix square root; identical Gaussians are at distance 0.
    S1, S2, m1, m2 = random_spd(rng, 30), random_spd(rng, 30), rng.normal(size=30), rng.normal(size=30)
    root = scipy.linalg.sqrtm(S1 @ S2).real
    want = ((m1 - m2) ** 2).sum() + np.trace(S1 + S2 - 2 * root)
    assert evaluate.frechet_distance(m1, S1, m2, S2) == pytest.approx(want, rel=1e-7)
    assert abs(evaluate.frechet_distance(m1, S1, m1, S1)) < 1e-8 * np.trace(S1)


def test_frechet_distance_from_samples_and_singular_covariances():
    rng = np.random.default_rng(1)
    S = random_spd(rng, 4)
    x = rng.multivariate_normal(np.zeros(4), S, size=200_000)
    assert evaluate.frechet_distance(*evaluate.feature_stats(x), np.zeros(4), S) < 0.02 * np.trace(S)
    # Fewer points than dimensions (rank-deficient covariances): still finite and >= 0.
    f1, f2 = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 1
    fd = evaluate.frechet_distance(*evaluate.feature_stats(f1), *evaluate.feature_stats(f2))
    assert np.isfinite(fd) and fd > 64 * 0.5


def test_inception_score_known_distributions():
    assert evaluate.inception_score(np.zeros((100, 1008)))[0] == pytest.approx(1.0)   # p(y|x) uniform
    logits = np.full((1000, 1008), -1e4)
    logits[np.arange(1000), np.arange(1000) % 10] = 0.0                  # sure of one class, 10 classes
    mean, std = evaluate.inception_score(logits, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6


# ---- Feature networks ----

def test_missing_inception_library_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)             # as if not installed
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match="need torch-fidelity.*requirements-fid.txt"):
        evaluate.inception_network("", "cpu")


def test_missing_inception_weights_say_where_the_file_goes(monkeypatch, tmp_path):
    called = []
    fake = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    fake.FeatureExtractorInceptionV3 = lambda *a, **k: called.append(1)
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fake)
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="inception_weights") as e:
        evaluate.inception_network(str(missing), "cpu")
    assert str(missing) in str(e.value) and evaluate.INCEPTION_URL in str(e.value) and not called
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))   # default: the hub cache
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "hub" / "checkpoints")):
        evaluate.inception_network("", "cpu")


def test_digits_classifier_is_accurate_cached_and_deterministic(tmp_path, monkeypatch):
    net, acc = evaluate.digits_classifier(str(tmp_path / "a"))
    assert acc > 0.95                                                    # on 297 held-out digits
    (path,) = (tmp_path / "a").glob("digits_classifier_*.pt")
    mtime = path.stat().st_mtime_ns
    net2, acc2 = evaluate.digits_classifier(str(tmp_path / "a"))         # loaded, not retrained
    assert path.stat().st_mtime_ns == mtime and acc2 == acc
    images = (np.random.default_rng(0).uniform(0, 1, (5, 8, 8, 1)) * 255).astype(np.uint8)
    f, p = evaluate.digits_features(net, images)
    assert f.shape == (5, 64) and p.shape == (5, 10) and np.allclose(p.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(f, evaluate.digits_features(net2, images)[0])
    # Trained twice from scratch (short schedule): bit-identical weights.
    monkeypatch.setattr(evaluate, "DIGITS_CLF", {**evaluate.DIGITS_CLF, "epochs": 20})
    states = [evaluate.digits_classifier(str(tmp_path / d))[0].state_dict() for d in ("b", "c")]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ---- End to end on a tiny digits model ----

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An untrained --quick digits checkpoint (QC, nf 8): enough to exercise the plumbing."""
    torch.manual_seed(0)
    cfg = train_images.parse_config(["--quick"])
    # Full-scale last layers (score_sde's init makes them ~0), so that the scores are worth evaluating.
    arch = dataclasses.replace(train_images.model_config(cfg), init_scale=1.0)
    model = qcsbm.NCSNpp(arch)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    image_io.save_checkpoint(image_io.make_checkpoint(model, qcsbm.EMA(model), torch.optim.Adam(model.parameters()),
                                                      7, dataclasses.asdict(cfg), []), str(path))
    return path


def test_bad_arguments_name_the_valid_choices(ckpt):
    with pytest.raises(ValueError, match="--n_samples"):
        evaluate.main([f"--ckpt={ckpt}", "--nsamples=3"])
    with pytest.raises(ValueError, match="nll, asym, sample, fid"):
        evaluate.main([f"--ckpt={ckpt}", "--eval=nll,bpd"])
    with pytest.raises(ValueError, match="--ckpt"):
        evaluate.main(["--eval=nll"])


def test_nll_is_finite_and_resumes_to_the_same_number(ckpt, tmp_path, monkeypatch):
    args = [f"--ckpt={ckpt}", "--eval=nll", "--nll_n=4", "--batch_size=2", "--tol=1e-2"]
    full = evaluate.main(args + [f"--out_dir={tmp_path / 'full'}"])
    assert np.isfinite(full["nll_bpd"]) and 0 < full["nll_bpd"] < 30 and full["nll_n"] == 4
    assert full["step"] == 7 and (tmp_path / "full" / "results.json").exists()

    real, calls = evaluate.qcsbm.bits_per_dim, []

    def interrupted_on_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluate.qcsbm, "bits_per_dim", interrupted_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(args + [f"--out_dir={tmp_path / 'resumed'}"])
    assert len(list((tmp_path / "resumed" / "parts").glob("nll_*/*.npz"))) == 1   # batch 0 was kept
    calls.clear()
    resumed = evaluate.main(args + [f"--out_dir={tmp_path / 'resumed'}"])
    assert len(calls) == 1                                               # only batch 1 was computed
    assert resumed["nll_bpd"] == full["nll_bpd"] and resumed["nll_bpd_se"] == full["nll_bpd_se"]


def test_asym_exact_and_probe_estimates_agree_on_digits(ckpt, tmp_path):
    r = evaluate.main([f"--ckpt={ckpt}", "--eval=asym", "--asym_n=6", "--batch_size=6", "--slices=256",
                       f"--out_dir={tmp_path}"])
    assert r["asym_method"] == "exact" and r["asym"] == r["asym_exact"] > 0
    assert 0 < r["nasym"] < 1
    # 256 probes per point: the estimate is within a few per cent of the exact value.
    assert r["asym_probe"] == pytest.approx(r["asym_exact"], rel=0.1)
    assert r["nasym_probe"] == pytest.approx(r["nasym_exact"], rel=0.1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_parts(out_dir: Path) -> np.ndarray:
    parts = sorted((out_dir / "parts").glob("sample_*/*.npz"))
    return np.concatenate([np.load(p)["x"] for p in parts])


def test_samples_do_not_depend_on_process_count_or_batch_size(ckpt, tmp_path):
    args = [f"--ckpt={ckpt}", "--eval=sample", "--n_samples=4", "--sample_steps=5", "--seed=3"]
    evaluate.main(args + ["--batch_size=2", f"--out_dir={tmp_path / 'one'}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(REPO / "evaluate.py"), *args, "--batch_size=2",
           f"--out_dir={tmp_path / 'two'}"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = sample_parts(tmp_path / "one"), sample_parts(tmp_path / "two")
    assert one.shape == (4, 1, 8, 8) and np.isfinite(one).all()
    np.testing.assert_array_equal(one, two)                              # gloo, 2 ranks: same samples
    np.testing.assert_array_equal(np.load(tmp_path / "one" / "samples.npz")["samples"],
                                  np.load(tmp_path / "two" / "samples.npz")["samples"])
    # Another batch size regroups the samples, but each keeps its own seed: equal up to round-off.
    evaluate.main(args + ["--batch_size=3", f"--out_dir={tmp_path / 'three'}"])
    np.testing.assert_allclose(sample_parts(tmp_path / "three"), one, atol=1e-4, rtol=1e-4)
    assert not np.allclose(one[0], one[1])                               # different seeds, different samples
    assert (tmp_path / "one" / "samples.png").exists()
