"""toy.py: the perturbed Gaussian fields, the data sets, the oracle score, the QC loss, metrics, bad input, --quick."""
import csv
import math
import os

import numpy as np
import pytest
import torch

import qcsbm
import toy


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_quick_end_to_end(tmp_path):
    out = tmp_path / "toy"
    toy.main(["--quick", f"--out_dir={out}"])
    gauss, dens, lam = read_csv(out / "gaussian.csv"), read_csv(out / "density.csv"), read_csv(out / "lambda.csv")
    assert list(gauss[0]) == ["field", "eps", "steps", "asym", "nasym"]
    assert {r["field"] for r in gauss} == {"rotational", "radial"} and len(gauss) == 2 * len(toy.EPSILONS)
    assert list(dens[0]) == ["dataset", "model", "seed", "nll", "nfe", "score_error", "asym", "nasym",
                             "precision", "recall", "train_seconds"]
    assert {(r["dataset"], r["model"]) for r in dens} == {(d, m) for d in toy.DATASETS for m in ("C", "U", "QC")}
    for r in dens:
        assert all(math.isfinite(float(r[k])) for k in ("nll", "score_error", "asym", "nasym"))
        assert 0 <= float(r["precision"]) <= 1 and 0 <= float(r["recall"]) <= 1 and int(r["nfe"]) > 0
        # C is exactly conservative: its Asym is round-off; U's is not.
        if r["model"] == "C":
            assert abs(float(r["asym"])) < 1e-6 * max(float(s["asym"]) for s in dens if s["model"] == "U")
    assert {float(r["lam"]) for r in lam} == {0.0, 1.0}
    for name in ["toy_gaussian_fields.png", "toy_gaussian_steps.png", "toy_lambda.png", "density_table.md",
                 "gaussian_table.md", "lambda_table.md"] + \
            [f"toy_{d}.png" for d in toy.DATASETS]:
        assert (out / name).stat().st_size > 0, name
    for d in toy.DATASETS:
        assert np.load(out / f"data_{d}.npy").shape[1] == 2
        for m in ("c", "u", "qc"):
            assert np.load(out / f"samples_{d}_{m}.npy").shape == (200, 2)
    # --experiment=table writes the same tables again from the CSVs alone, and trains nothing.
    tables = {n: (out / n).read_text() for n in ("density_table.md", "gaussian_table.md", "lambda_table.md")}
    for n in tables:
        (out / n).unlink()
    toy.main(["--quick", "--experiment=table", f"--out_dir={out}"])
    assert {n: (out / n).read_text() for n in tables} == tables


@pytest.mark.parametrize("kind", ["rotational", "radial"])
@pytest.mark.parametrize("eps", [0.5e-3, 2.25e-3])
def test_perturbed_field_has_requested_esm_error(kind, eps):
    """Monte Carlo E_p[0.5 ||s - grad log p||^2] over 2e6 draws from N(0, 0.1^2 I) equals eps (4 std errors)."""
    x = toy.SIGMA_G * torch.randn(2_000_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = 0.5 * (toy.gaussian_field(kind, eps)(x) + x / toy.SIGMA_G ** 2).pow(2).sum(1)
    assert abs(err.mean().item() - eps) < 4 * err.std().item() / math.sqrt(len(x))
    assert abs(err.mean().item() - eps) < 0.05 * eps


def test_radial_field_conservative_rotational_not(tmp_path):
    rows = {(r["field"], r["eps"]): r for r in toy.run_gaussian(toy.parse([f"--out_dir={tmp_path}"]))}
    for eps in toy.EPSILONS:
        assert abs(rows["radial", eps]["asym"]) < 1e-9 and abs(rows["radial", eps]["nasym"]) < 1e-12
        if eps > 0:
            assert rows["rotational", eps]["asym"] > 1e-6 and rows["rotational", eps]["nasym"] > 1e-6
    # The quadrature expectation of Asym agrees with plain Monte Carlo of qcsbm.asymmetry.
    x = toy.SIGMA_G * torch.randn(200_000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    asym, _ = qcsbm.asymmetry(toy.gaussian_field("rotational", 2.25e-3), x)
    assert abs(asym.mean().item() - rows["rotational", 2.25e-3]["asym"]) < 4 * asym.std().item() / math.sqrt(len(x))


def test_datasets_support_and_moments():
    rng, n = np.random.default_rng(0), 200_000
    x = toy.checkerboard(n, rng)
    assert np.abs(x).max() <= 6 and ((np.floor(x[:, 0] / 3) + np.floor(x[:, 1] / 3)) % 2 == 0).all()
    np.testing.assert_allclose(x.mean(0), 0, atol=0.03)
    np.testing.assert_allclose(x.var(0), 12, rtol=0.02)                # 9 * (var of column 1.25 + 1/12)
    x = toy.gaussians8(n, rng)
    np.testing.assert_allclose(x.mean(0), 0, atol=0.03)
    np.testing.assert_allclose(x.var(0), 16.5, rtol=0.02)              # 32 / 2 + 1 / 2 per axis
    r = np.linalg.norm(x[:, None] - 4 * math.sqrt(2) * np.array([[math.cos(a), math.sin(a)] for a in
                                                                 np.arange(8) * np.pi / 4])[None], axis=2).min(1)
    assert np.quantile(r, 0.99) < 3.1 / math.sqrt(2) + 0.2             # every point near one of the 8 centres
    x = toy.spirals2(n, rng)
    np.testing.assert_allclose(x.mean(0), 0, atol=0.03)
    assert np.linalg.norm(x, axis=1).max() < (3 * np.pi + 0.5 * math.sqrt(2)) * 2.3 / 3
    x = toy.moons(n, rng)
    np.testing.assert_allclose(x.mean(0), 0, atol=0.03)
    # half-widths (1.5, 0.75) * 3, plus the Gaussian noise (std 0.15): 4 std at the 99.99% level.
    assert np.quantile(np.abs(x[:, 0]), 0.9999) < 4.5 + 0.6 and np.quantile(np.abs(x[:, 1]), 0.9999) < 2.25 + 0.6


def test_oracle_score_is_gradient_of_log_density():
    rng = np.random.default_rng(0)
    ref = torch.from_numpy(toy.checkerboard(500, rng)).double()
    x = torch.from_numpy(toy.checkerboard(20, rng)).double() + 0.3 * torch.randn(20, 2, dtype=torch.float64)
    for std in (0.2, 1.0, 5.0):
        log_q = lambda y: torch.logsumexp(-torch.cdist(y, ref).pow(2) / (2 * std ** 2), dim=1)
        h, e = 1e-5, torch.eye(2, dtype=torch.float64)
        fd = torch.stack([(log_q(x + h * e[i]) - log_q(x - h * e[i])) / (2 * h) for i in range(2)], 1)
        torch.testing.assert_close(toy.oracle_score(x, ref, std, chunk=7), fd, rtol=1e-6, atol=1e-6)


def test_qc_loss_is_dsm_plus_exact_asym():
    """loss(QC) - loss(U) = lam std^2 (tr(J J^T) - tr(J J)) with J the brute-force Jacobian at x_t."""
    torch.manual_seed(0)
    f, sde, x0, lam = qcsbm.MLP().double(), qcsbm.VESDE(0.05, 10.0), torch.randn(64, 2, dtype=torch.float64), 0.3
    torch.manual_seed(1)
    qc = toy.loss_fn(f, x0, sde, "qc", lam)
    torch.manual_seed(1)
    u = toy.loss_fn(f, x0, sde, "u", 0.0)
    torch.manual_seed(1)
    t = sde.eps + (sde.T - sde.eps) * torch.rand(64, dtype=torch.float64)
    x_t = x0 + sde.std(t)[:, None] * torch.randn(64, 2, dtype=torch.float64)
    asym, _ = qcsbm.asymmetry(lambda y: qcsbm.score(f, y, t, sde, "u"), x_t)
    torch.testing.assert_close(qc - u, lam * sde.std(t) ** 2 * asym)


@pytest.mark.parametrize("argv, words", [
    (["--datasets=checkerboard,swissroll"], ["swissroll", "checkerboard", "8gaussians", "2spirals", "moons"]),
    (["--experiment=images"], ["images", "gaussian", "density", "lambda"]),
    (["--batch_size=0"], ["batch_size", "positive"]),
    (["--steps=-5"], ["steps", "positive"]),
    (["--preset=fast"], ["fast", "paper"]),
    (["--lr_typo=1"], ["lr_typo", "--lr"]),
    (["--experiment=table"], ["no gaussian.csv", "finished run", "--out_dir"]),
])
def test_bad_input_names_valid_choices(argv, words, tmp_path):
    with pytest.raises(ValueError) as e:
        toy.main(argv + [f"--out_dir={tmp_path}"])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_unwritable_output_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        toy.main(["--quick", f"--out_dir={blocker / 'sub'}"])
    assert not os.path.exists(blocker / "sub")


def test_runs_with_other_settings_get_their_own_folder(tmp_path):
    """A quick or non-default run never writes into the default run's folder (runs/toy); the folders are
    relative to the working directory, which for every test is its tmp_path (conftest.py)."""
    outs = [toy.parse(a).out_dir for a in ([], ["--quick"], ["--preset=paper"], ["--seeds=1"], ["--experiment=gaussian"])]
    assert outs == ["runs/toy", "runs/toy_quick", "runs/toy_paper", "runs/toy_seeds-1", "runs/toy"]
    assert (tmp_path / "runs" / "toy_quick").is_dir()


def test_tables_print_zero_for_round_off_and_no_spread_for_one_seed():
    row = dict(dataset="moons", nll=2.5, score_error=0.004, precision=0.9, recall=0.95)
    rows = [dict(row, model="C", seed=s, asym=a, nasym=-1e-10) for s, a in enumerate((-3e-8, 2e-8))]
    rows += [dict(row, model="U", seed=s, asym=a, nasym=0.004) for s, a in enumerate((0.9, 1.1))]
    lines = toy.density_table(rows).splitlines()
    assert lines[2].split(" | ")[4:6] == ["0", "0"] and "-0" not in lines[2]      # C: round-off prints 0
    assert lines[3].split(" | ")[4] == "1 ± 0.1"
    one_seed = toy.density_table([r for r in rows if r["seed"] == 0]).splitlines()
    assert "±" not in "".join(one_seed) and one_seed[3].split(" | ")[4] == "0.9"
