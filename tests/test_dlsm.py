"""dlsm.py: the oracle posterior and likelihood scores against finite differences of the exact log-densities, the
classifier's likelihood score, the DLSM loss, the five methods' wiring, the labelled moons, --quick end to end."""
import csv

import numpy as np
import pytest
import torch

import dlsm
import qcsbm


def central_difference(f, x, h=1e-5):
    e = torch.eye(x.shape[1], dtype=x.dtype)
    return torch.stack([(f(x + h * e[i]) - f(x - h * e[i])) / (2 * h) for i in range(x.shape[1])], 1)


def test_oracle_scores_are_gradients_of_exact_log_densities():
    """p_t(x | y) = mean over class-y points of N(x; r, std^2 I); p_t(y | x) = N_y p_t(x | y) / (N p_t(x))."""
    rng = np.random.default_rng(0)
    x_ref, y_ref = dlsm.labelled_moons(400, rng)
    ref, ref_y = torch.from_numpy(x_ref).double(), torch.from_numpy(y_ref)
    sde = qcsbm.VESDE(0.05, 10.0)
    x = torch.from_numpy(dlsm.labelled_moons(30, rng)[0]).double() + 0.4 * torch.randn(30, 2, dtype=torch.float64)
    y = torch.arange(30) % 2
    for t in (0.2, 0.5, 0.8):
        std = float(sde.std(torch.tensor(t)))
        log_mix = lambda z, pts: torch.logsumexp(-torch.cdist(z, pts).pow(2) / (2 * std ** 2), 1)
        log_cond = lambda z: torch.where(y == 0, log_mix(z, ref[ref_y == 0]), log_mix(z, ref[ref_y == 1]))
        post, lik = dlsm.oracle_scores(x, torch.full((30,), t, dtype=torch.float64), y, ref, ref_y, sde)
        torch.testing.assert_close(post, central_difference(log_cond, x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lik, central_difference(lambda z: log_cond(z) - log_mix(z, ref), x),
                                   rtol=1e-6, atol=1e-6)
        post_only, none = dlsm.oracle_scores(x, torch.full((30,), t, dtype=torch.float64), y, ref, ref_y, sde,
                                             likelihood=False)                    # what sampling asks for
        assert none is None and torch.equal(post_only, post)


def test_likelihood_score_is_gradient_of_log_softmax():
    torch.manual_seed(0)
    clf, sde = dlsm.Net(2).double(), qcsbm.VESDE(0.05, 10.0)
    x, t, y = torch.randn(20, 2, dtype=torch.float64), torch.rand(20, dtype=torch.float64), torch.arange(20) % 2
    log_p = lambda z: torch.log_softmax(clf(z, sde.std(t)), 1).gather(1, y[:, None])[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(dlsm.likelihood_score(clf, x, t, y, sde), central_difference(log_p, x),
                                   rtol=1e-6, atol=1e-8)


def test_dlsm_loss_is_ce_plus_posterior_dsm():
    """loss(dlsm) - CE = lam * 0.5 std^2 ||s(x_t) + grad log p(y | x_t) + z / std||^2 at the same (t, z)."""
    torch.manual_seed(0)
    sde, lam = qcsbm.VESDE(0.05, 10.0), 0.7
    nets = {"score": qcsbm.MLP().double(), "dlsm": dlsm.Net(2).double()}
    x0, y = torch.randn(32, 2, dtype=torch.float64), torch.arange(32) % 2
    torch.manual_seed(1)
    loss = dlsm.loss_fn("dlsm", nets, x0, y, sde, lam)
    torch.manual_seed(1)
    x_t, t, z, std, _ = qcsbm.perturb(x0, sde)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(nets["dlsm"](x_t, std), y, reduction="none")
        post = qcsbm.score(nets["score"], x_t, t, sde, "u") + dlsm.likelihood_score(nets["dlsm"], x_t, t, y, sde)
    torch.testing.assert_close(loss.detach(), ce + lam * 0.5 * std ** 2 * (post + z / std[:, None]).pow(2).sum(1))


def test_methods_share_their_parts(tmp_path):
    """(b) is (a) with the likelihood score times `scale`; (a) and (c) differ only in the classifier; (d) and (e)
    return posterior = score + likelihood part with the same unconditional score."""
    torch.manual_seed(0)
    cfg = dlsm.parse(["--quick", "--scale=3", f"--out_dir={tmp_path}"])
    nets = {"score": qcsbm.MLP(), "ce": dlsm.Net(2), "dlsm": dlsm.Net(2), "cond": dlsm.Net(2, classes=2)}
    ref = torch.randn(50, 2, dtype=torch.float64), torch.arange(50) % 2
    sde = qcsbm.VESDE(0.05, 10.0)
    fns = dlsm.posterior_fns(cfg, nets, sde, *ref)
    x, t, y = torch.randn(16, 2), torch.rand(16), torch.arange(16) % 2
    (pa, la), (pb, lb) = fns["a"](x, t, y), fns["b"](x, t, y)
    torch.testing.assert_close(lb, 3 * la)
    torch.testing.assert_close(pb - lb, pa - la)
    nets["dlsm"].load_state_dict(nets["ce"].state_dict())
    torch.testing.assert_close(fns["c"](x, t, y)[0], pa)
    pd, ld = fns["d"](x, t, y)
    torch.testing.assert_close(pd - ld, pa - la)


def test_labelled_moons():
    x, y = dlsm.labelled_moons(20000, np.random.default_rng(0))
    assert x.dtype == np.float32 and set(np.unique(y)) == {0, 1}
    assert abs(y.mean() - 0.5) < 0.01
    assert x[y == 0, 1].mean() > 1 > -1 > x[y == 1, 1].mean()              # class 0 is the upper moon


def test_quick_end_to_end(tmp_path):
    rows = dlsm.main(["--quick", f"--out_dir={tmp_path}"])
    saved = list(csv.DictReader(open(tmp_path / "dlsm.csv")))
    assert [r["method"] for r in saved] == list(dlsm.METHODS) == [r["method"] for r in rows]
    for r in rows:
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert (r["posterior_error"] == 0) == (r["method"] == "e") and r["likelihood_error"] >= 0
    oracle = rows[-1]
    assert oracle["precision"] > 0.8 and oracle["recall"] > 0.8            # exact scores give good samples
    assert (tmp_path / "dlsm_moons.png").stat().st_size > 0
    table = (tmp_path / "dlsm_table.md").read_text()
    assert "(c) CE + DLSM classifier" in table and "| (e) oracle |" in table
    assert "±" not in table                                                 # one seed: no spread
    (tmp_path / "dlsm_table.md").unlink()                                   # the table again from the CSV alone
    dlsm.main(["--experiment=table", f"--out_dir={tmp_path}"])
    assert (tmp_path / "dlsm_table.md").read_text() == table


def test_table_prints_exact_zero_without_spread():
    rows = [dict(method=m, seed=s, precision=0.9 + s / 100, recall=0.9, posterior_error=0.0 if m == "e" else 0.1 + s,
                 likelihood_error=0.0 if m == "e" else 0.2) for m in dlsm.METHODS for s in range(3)]
    lines = dlsm.markdown_table(rows).splitlines()
    assert lines[-1] == "| (e) oracle | 0.91 ± 0.0082 | 0.9 ± 0 | 0 | 0 |", lines[-1]


@pytest.mark.parametrize("argv, words", [(["--steps=0"], ["steps", "positive"]),
                                         (["--schedule=step"], ["step", "cosine", "constant"]),
                                         (["--lamda=1"], ["lamda", "--lam"])])
def test_bad_input_names_valid_choices(argv, words, tmp_path):
    with pytest.raises(ValueError) as e:
        dlsm.main(argv + [f"--out_dir={tmp_path}"])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_seeds_in_worker_processes_give_the_same_rows(tmp_path):
    """--workers=2 runs the seeds in two spawned processes: the same numbers as one process, in seed order."""
    one = dlsm.main(["--quick", "--seeds=2", "--workers=1", f"--out_dir={tmp_path / 'one'}"])
    two = dlsm.main(["--quick", "--seeds=2", "--workers=2", f"--out_dir={tmp_path / 'two'}"])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]
    assert [r["seed"] for r in two] == [0] * 5 + [1] * 5
    assert drop(one) == drop(two)
    assert (tmp_path / "two" / "dlsm_moons.png").stat().st_size > 0
