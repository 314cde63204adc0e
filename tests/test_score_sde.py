"""Parity with score_sde's NCSN++ and its checkpoint format.

The judge is ../shared/fixtures/score_sde_ncsnpp/: a small NCSN++ built, saved and evaluated by
score_sde's own code (its README says how), in score_sde's file layout and in the QCSBM authors' one
(no `step`). Our own round trips (export, import, fine-tune) come after that."""
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import image_io
import qcsbm
import train_images as ti

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "score_sde_ncsnpp"
FILES = ["checkpoint_score_sde.pth", "checkpoint_authors.pth"]
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"no score_sde fixtures at {FIXTURES}")


def rel_err(ours, ref):
    """Largest error relative to each sample's largest |score| (sigma spans 0.01 to 50)."""
    scale = ref.abs().flatten(1).max(1).values
    return ((ours - ref).abs().flatten(1).max(1).values / scale).max().item()


# ---- Against score_sde's own outputs ----

@needs_fixtures
@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("ema", [True, False], ids=["ema", "live"])
def test_scores_match_score_sde(name, ema):
    io = torch.load(FIXTURES / "io.pt", weights_only=True)
    model = image_io.load_score_sde(str(FIXTURES / name), image_size=16, ema=ema)
    assert not model.training
    tag = "ema" if ema else "live"
    for dtype, sigma, tol in [(torch.float64, io["sigma"], 1e-10), (torch.float32, io["sigma_f32"], 2e-4)]:
        m, x, sigma = model.to(dtype), io["x"].to(dtype), sigma.to(dtype)
        with torch.no_grad():
            s = (x - m(x, sigma)) / sigma[:, None, None, None]         # s_U, qcsbm.score's formula
        ref = io[f"score_{tag}_f{64 if dtype == torch.float64 else 32}"]
        assert rel_err(s, ref) < tol, (dtype, rel_err(s, ref))
    # The same through the library's score() and VE SDE at the fixture's times.
    s = qcsbm.score(model.double(), io["x"].double(), io["t"], qcsbm.VESDE(0.01, 50.0), "u")
    assert rel_err(s.detach(), io[f"score_{tag}_f64"]) < 1e-10


@needs_fixtures
def test_architecture_parameter_count_and_key_order():
    cfg = json.loads((FIXTURES / "config.json").read_text())
    ckpt = image_io.read_score_sde(str(FIXTURES / FILES[0]), image_size=16)
    arch, m = ckpt["config"], cfg["model"]
    assert (arch.nf, list(arch.ch_mult), arch.num_res_blocks, list(arch.attn_resolutions), arch.channels) == \
        (m["nf"], m["ch_mult"], m["num_res_blocks"], m["attn_resolutions"], cfg["data"]["num_channels"])
    assert ckpt["step"] == 600_000 and ckpt["ema_num_updates"] == 600_000 and ckpt["ema_decay"] == 0.9999
    model = qcsbm.NCSNpp(arch)
    assert sum(p.numel() for p in model.parameters()) == cfg["num_params"] == 447_987
    # Our names, in score_sde's parameter order, are exactly the file's keys in the file's order.
    keys = [line.split("\t")[0].removeprefix("module.")
            for line in (FIXTURES / "keys.txt").read_text().splitlines()]
    assert list(image_io.score_sde_names(model).values()) == [k for k in keys if k != "sigmas"]
    assert image_io.read_score_sde(str(FIXTURES / FILES[1]), 16)["step"] is None    # the authors' layout


def test_paper_deep_model_has_score_sde_parameter_count():
    with torch.random.fork_rng():
        model = qcsbm.NCSNpp(qcsbm.NCSNppConfig())                       # the paper's deep CIFAR-10 model
    assert sum(p.numel() for p in model.parameters()) == 107_586_947    # trainable, as score_sde builds it
    assert sum(p.numel() for p in model.parameters()) + model.freqs.numel() == 107_587_075  # with W


def test_score_sde_initialization():
    """DDPM init: uniform, variance scale / fan_avg; near-zero last layers; zero biases."""
    torch.manual_seed(0)
    model = qcsbm.NCSNpp(qcsbm.NCSNppConfig(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(32,)))
    block, attention = model.down[0], model.down[1]
    bound = (3 / ((32 + 32) / 2 * 9)) ** 0.5                              # Conv_0 32 -> 32, 3x3, scale 1
    assert block.conv0.weight.abs().max() <= bound and block.conv0.weight.abs().max() > 0.9 * bound
    assert block.conv1.weight.abs().max() < 1e-5 and model.conv_out.weight.abs().max() < 1e-5
    w = attention.q.W                                                    # NIN_0 32 -> 32: scale 0.1
    assert w.abs().max() <= (3 * 0.1 / 32) ** 0.5 and w.abs().max() > 0.9 * (3 * 0.1 / 32) ** 0.5
    assert attention.out.W.abs().max() < 1e-5                            # NIN_3: init_scale
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


# ---- Round trips through score_sde's format ----

def trained_tiny(size=8, channels=1, steps=2, **arch):
    """A tiny NCSN++ after a few Adam steps, with an EMA: every piece of a checkpoint is non-trivial."""
    torch.manual_seed(0)
    model = qcsbm.NCSNpp(dataclasses.replace(qcsbm.NCSNppConfig.tiny(size, channels), dropout=0.1, **arch))
    ema, opt = qcsbm.EMA(model, 0.9), torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.rand(4, channels, size, size)
        loss = qcsbm.training_loss(model, x, qcsbm.VESDE(), lam=0.1)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    return model, ema, opt


def test_export_then_import_is_exact(tmp_path):
    model, ema, opt = trained_tiny()
    out = image_io.to_score_sde(model, ema.model.state_dict(), ema.num_updates, ema.decay, opt.state_dict(),
                                step=600_000)
    torch.save(out, tmp_path / "c.pth")
    assert out["model"]["module.sigmas"].dtype == torch.float64 and len(out["model"]["module.sigmas"]) == 1000
    assert out["optimizer"]["param_groups"][0]["params"][0] == 0 and 0 not in out["optimizer"]["state"]  # W
    back = image_io.read_score_sde(str(tmp_path / "c.pth"), image_size=8)
    arch = lambda c: (c.image_size, c.channels, c.nf, c.ch_mult, c.num_res_blocks, c.attn_resolutions)
    assert arch(back["config"]) == arch(model.cfg)
    assert back["step"] == 600_000 and back["ema_num_updates"] == 2 and back["ema_decay"] == 0.9
    for ours, theirs in [(model.state_dict(), back["model"]), (ema.model.state_dict(), back["ema"])]:
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    a, b = opt.state_dict(), back["optimizer"]
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


def test_export_command_writes_a_checkpoint_that_imports_to_the_same_model(tmp_path):
    ti.main(["--quick", "--steps=2", "--sample_steps=2", "--n_samples=4", f"--out_dir={tmp_path}"])
    image_io.main([f"--export={tmp_path / 'ckpt.pt'}", f"--to={tmp_path / 'score_sde.pth'}"])
    ours = image_io.load_checkpoint(str(tmp_path / "ckpt.pt"))
    for ema, ref in [(True, ours["ema"]["model"]), (False, ours["model"])]:
        model = image_io.load_score_sde(str(tmp_path / "score_sde.pth"), image_size=8, ema=ema)
        assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    theirs = torch.load(tmp_path / "score_sde.pth", weights_only=True)
    assert theirs["step"] == 2 and theirs["ema"]["num_updates"] == 2
    assert all(k.startswith("module.") for k in theirs["model"])


# ---- Fine-tuning from a score_sde-format file ----

def write_score_sde(path, step=600_000, size=8, channels=1):
    """A score_sde-format file of the --quick digits network (nf 8, ch_mult 1,2, one block)."""
    model, ema, opt = trained_tiny(size, channels, attn_resolutions=())
    cfg = ti.parse_config(["--quick"])
    assert dataclasses.astuple(ti.model_config(cfg))[:6] == dataclasses.astuple(model.cfg)[:6]
    torch.save(image_io.to_score_sde(model, ema.model.state_dict(), 600_000, 0.9999, opt.state_dict(), step),
               path)
    return model, ema


TINY = ["--quick", "--sample_steps=2", "--n_samples=4", "--snapshot_every=1000"]


@pytest.mark.parametrize("layout", ["score_sde", "authors"])
def test_finetune_from_score_sde_file_resumes_at_its_step(tmp_path, capsys, layout):
    src = tmp_path / "u.pth"
    model, ema = write_score_sde(src, step=600_000 if layout == "score_sde" else None)
    args = [*TINY, f"--init_from={src}", "--steps=600002", f"--out_dir={tmp_path / 'qc'}"]
    if layout == "authors":
        with pytest.raises(ValueError, match="--init_step"):                  # no step in the file
            ti.main(args)
        args.append("--init_step=600000")
    out = ti.main(args)
    said = capsys.readouterr().out
    assert "initialized from the score_sde-format checkpoint" in said and "Adam state" in said
    assert out["step"] == 600_002
    ckpt = image_io.load_checkpoint(str(tmp_path / "qc" / "ckpt.pt"))
    assert ckpt["step"] == 600_002 and ckpt["ema"]["num_updates"] == 600_002
    assert all(s["step"] == 2 + 2 for s in ckpt["optimizer"]["state"].values())  # Adam went on counting
    # The two steps started from the file's weights: small moves away from them, not a fresh network.
    start = model.state_dict()
    moved = max((ckpt["model"][k] - start[k]).abs().max().item() for k in start)
    assert 0 < moved < 0.05
    # A second start in the same out_dir resumes that run and says --init_from is ignored.
    ti.main([a for a in args if not a.startswith("--steps=")] + ["--steps=600003"])
    said = capsys.readouterr().out
    assert "resuming that run" in said and "is ignored" in said and "resumed at step 600002" in said


def test_evaluate_reads_score_sde_files_directly(tmp_path):
    import evaluate
    src = tmp_path / "u.pth"
    model, ema = write_score_sde(src)
    with pytest.raises(ValueError, match="--data"):
        evaluate.main([f"--ckpt={src}", "--eval=asym", "--quick"])
    r = evaluate.main([f"--ckpt={src}", "--data=digits", "--eval=asym", "--quick", f"--out_dir={tmp_path / 'e'}"])
    assert r["step"] == 600_000 and r["method"] == "u" and r["asym"] > 0


# ---- Bad input ----

def state_of(path):
    return {k.removeprefix("module."): v for k, v in torch.load(path, weights_only=True)["model"].items()}


def save_with(tmp_path, state, name="bad.pth"):
    src = torch.load(FIXTURES / FILES[0], weights_only=True)
    src["model"] = {"module." + k: v for k, v in state.items()}
    torch.save(src, tmp_path / name)
    return str(tmp_path / name)


@needs_fixtures
def test_other_architectures_are_refused_with_what_was_found(tmp_path):
    state = state_of(FIXTURES / FILES[0])
    no_fourier = {k: v for k, v in state.items() if k != "all_modules.0.W"}    # DDPM++ / VP / discrete
    with pytest.raises(ValueError, match="not a continuous-time NCSN\\+\\+"):
        image_io.read_score_sde(save_with(tmp_path, no_fourier), 16)
    # One residual block fewer (modules renumbered): no number of blocks per level explains the tensors.
    drop = 5
    fewer = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "all_modules" and int(parts[1]) >= drop:
            if int(parts[1]) == drop:
                continue
            parts[1] = str(int(parts[1]) - 1)
        fewer[".".join(parts)] = v
    with pytest.raises(ValueError, match="residual blocks cannot make an NCSN\\+\\+"):
        image_io.read_score_sde(save_with(tmp_path, fewer), 16)
    wrong = dict(state) | {"all_modules.5.Conv_1.weight": torch.zeros(16, 16, 1, 1)}
    with pytest.raises(ValueError, match="wrong shape .*all_modules.5.Conv_1.weight"):
        image_io.read_score_sde(save_with(tmp_path, wrong), 16)
    extra = dict(state) | {"all_modules.5.NIN_0.W": torch.zeros(16, 16)}
    with pytest.raises(ValueError, match="unexpected .*all_modules.5.NIN_0.W"):
        image_io.read_score_sde(save_with(tmp_path, extra), 16)
    missing = {k: v for k, v in state.items() if k != "all_modules.6.Conv_2.bias"}
    with pytest.raises(ValueError, match="missing .*all_modules.6.Conv_2.bias"):
        image_io.read_score_sde(save_with(tmp_path, missing), 16)
    with pytest.raises(ValueError, match="image_size=10 cannot be halved"):   # 3 levels: 16 -> 8 -> 4
        image_io.read_score_sde(str(FIXTURES / FILES[0]), 10)


def test_a_64x64_model_loaded_as_32_is_refused(tmp_path):
    with torch.random.fork_rng():
        model = qcsbm.NCSNpp(qcsbm.NCSNppConfig(image_size=64, nf=8, ch_mult=(1,) * 7, num_res_blocks=1,
                                                attn_resolutions=(16,)))
    torch.save(image_io.to_score_sde(model), tmp_path / "m64.pth")
    with pytest.raises(ValueError, match="7 resolution levels.*image_size=32"):
        image_io.load_score_sde(str(tmp_path / "m64.pth"), 32)
    assert image_io.read_score_sde(str(tmp_path / "m64.pth"), 64)["config"].attn_resolutions == (16,)


@needs_fixtures
def test_damaged_or_foreign_files_give_clear_errors_and_are_not_modified(tmp_path):
    blob = (FIXTURES / FILES[0]).read_bytes()
    cases = {"truncated.pth": blob[: len(blob) // 2], "text.pth": b"not a checkpoint\n", "empty.pth": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="cannot read .* as a PyTorch checkpoint") as e:
            image_io.load_score_sde(str(tmp_path / name), 16)
        assert "weights_only=False" not in str(e.value)
        assert (tmp_path / name).read_bytes() == data
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a score_sde-format checkpoint.*'weights'"):
        image_io.read_score_sde(str(tmp_path / "other.pth"), 16)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        image_io.read_score_sde(str(tmp_path / "nowhere.pth"), 16)
    with pytest.raises(ValueError, match="score_sde-format checkpoint, not one of train_images"):
        image_io.load_checkpoint(str(FIXTURES / FILES[0]))


def test_our_earlier_checkpoint_format_is_refused_naming_the_change(tmp_path):
    torch.save({"model": {}, "ema": {}, "optimizer": {}, "step": 3, "config": {}, "rng": []}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="checkpoint format 1, now 2.*not score_sde's network"):
        image_io.load_checkpoint(str(tmp_path / "old.pt"))
