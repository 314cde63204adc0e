"""FID, IS and precision / recall of evaluate.py on 32x32 images, end to end, against torch-fidelity's
own calculate_metrics with the same weights file. The real Inception weights cannot be fetched here, so
the tests write a stand-in: torch-fidelity's network class, randomly initialised, saved in the format of
the real file (a plain {name: tensor} dict, no BatchNorm step counters). Tests that need torch-fidelity
skip where it cannot be imported, unless QCSBM_REQUIRE_FID=1 (CI sets it where it installs it)."""
import builtins
import dataclasses
import os
import sys
import types

import numpy as np
import pytest
import torch
from scipy.io import savemat

import evaluate
import image_io
import qcsbm
import train_images

SIZE = 75   # the network's input size in these tests (299 for real; 75 is the least it accepts): 16x faster


def fidelity():
    """torch_fidelity, or skip (fail under QCSBM_REQUIRE_FID=1) where it or its torchvision cannot load."""
    try:
        import torch_fidelity
        return torch_fidelity
    except (ImportError, RuntimeError) as e:                  # RuntimeError: a torchvision of another torch
        if os.environ.get("QCSBM_REQUIRE_FID") == "1":
            raise
        pytest.skip(f"torch-fidelity cannot be imported ({type(e).__name__}: {e}); see requirements-fid.txt")


def standin_weights(path, seed: int):
    """Write torch-fidelity's FID Inception network, randomly initialised, as the real weights file is
    written: torch.save of a plain dict of its conv / BatchNorm / fc tensors."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Fresh(FeatureExtractorInceptionV3):          # keeps its fresh layers instead of loading weights
        def load_state_dict(self, *a, **k):
            pass

    torch.save({}, path)
    torch.manual_seed(seed)
    net = Fresh("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):             # He init: activations neither vanish nor explode
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):      # near-identity BatchNorm with random statistics
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.8, 1.2)
            m.weight.data.uniform_(0.8, 1.2), m.bias.data.normal_(0, 0.1)
    # The fc layer sees pool features that differ little between images around a large common mean; keep
    # it orthogonal to that mean so that the logits differ between images and IS is well above 1.
    with torch.no_grad():
        f = net(torch.from_numpy(blocks(16, seed + 100)).permute(0, 3, 1, 2).contiguous())[0]
    u = f.mean(0) / f.mean(0).norm()
    W = torch.randn(1008, 2048) / f.std(0).mean() / 2048 ** 0.5
    net.fc.weight.data = 3 * (W - (W @ u)[:, None] * u)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)


def blocks(n: int, seed: int) -> np.ndarray:
    """uint8 (n, 32, 32, 3): 8x8 random colours, each a 4x4 block, so blurring changes them."""
    x = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return x.repeat(4, 1).repeat(4, 2)


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (std sigma pixels, reflected borders) of uint8 (N, H, W, C) images."""
    r = np.arange(-6, 7)
    k = torch.tensor(np.exp(-r ** 2 / (2 * sigma ** 2)) / np.exp(-r ** 2 / (2 * sigma ** 2)).sum()).float()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().reshape(-1, 1, 32, 32)
    x = torch.nn.functional.pad(x, (6, 6, 6, 6), mode="reflect")
    x = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return x.reshape(len(images), 3, 32, 32).permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


def svhn_files(data_dir, train: np.ndarray, test: np.ndarray):
    """The SVHN .mat layout, (32, 32, 3, N), which image_io.load_dataset reads."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, x in (("train", train), ("test", test)):
        savemat(data_dir / f"{split}_32x32.mat", {"X": x.transpose(1, 2, 3, 0), "y": np.ones((len(x), 1))})


class Images(torch.utils.data.Dataset):
    """uint8 (N, H, W, C) as the uint8 (C, H, W) tensors torch-fidelity reads."""

    def __init__(self, x):
        self.x = torch.from_numpy(x).permute(0, 3, 1, 2)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@pytest.fixture
def small_inception(monkeypatch):
    tf = fidelity()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", SIZE)   # ours and torch-fidelity's
    return tf


def fid_for(tmp_path, weights, data="data"):
    cfg = evaluate.EvalConfig(data_dir=str(tmp_path / data), cache_dir=str(tmp_path / "cache"),
                              inception_weights=str(weights))
    fid = evaluate.fid_setup(cfg, "svhn", "cpu")
    counted = []                                                          # images through the network
    features = fid.features
    fid.features = lambda ims: (counted.append(len(ims)), features(ims))[1]
    return cfg, fid, counted


def test_fid_is_precision_recall_match_torch_fidelity(tmp_path, small_inception):
    train = blocks(200, 0)
    svhn_files(tmp_path / "data", train, blocks(10, 1))
    standin_weights(tmp_path / "w.pth", seed=0)
    cfg, fid, counted = fid_for(tmp_path, tmp_path / "w.pth")
    ev = types.SimpleNamespace(dataset="svhn", test=None)
    ours = [evaluate.eval_fid(cfg, ev, x, fid) for x in [train] + [blur(train, s) for s in (0.5, 1.0, 2.0)]]
    assert counted == [200] * 5               # the training set once (then cached), and each set of samples
    assert len(list((tmp_path / "cache").glob("ref_svhn_*.npz"))) == 1
    # A set against itself: 0 up to round-off; blurring moves it away, more with each level.
    fids = [r["fid"] for r in ours]
    assert abs(fids[0]) < 1e-6 * fids[1] and fids[1] < fids[2] < fids[3]
    assert (ours[0]["precision"], ours[0]["recall"]) == (1.0, 1.0)
    # torch-fidelity on the same images with the same weights file: its own loader, feature extraction,
    # uint8 handling, statistics and Frechet distance (eigenvalues of the 2048 x 2048 S1 S2; ours, with 200
    # points: of a 200 x 200 matrix, see evaluate.frechet_distance_to).
    theirs = small_inception.calculate_metrics(
        input1=Images(blur(train, 1.0)), input2=Images(train), cuda=False, isc=True, fid=True, prc=True,
        isc_splits=1, prc_neighborhood=3, batch_size=100, feature_extractor="inception-v3-compat",
        feature_layer_prc="2048",                                         # its default for PR is VGG-16
        feature_extractor_weights_path=str(tmp_path / "w.pth"), cache=False, save_cpu_ram=True, verbose=False)
    assert ours[2]["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours[2]["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-3)
    # Ball membership (k = 3) in float64 here, float32 there: a point on a ball's edge may flip.
    assert ours[2]["precision"] == pytest.approx(theirs["precision"], abs=2 / 200)
    assert ours[2]["recall"] == pytest.approx(theirs["recall"], abs=2 / 200)
    assert ours[2]["is"] > 1.5 and ours[3]["precision"] < ours[1]["precision"]


def test_frechet_distance_from_fewer_points_than_dimensions():
    rng = np.random.default_rng(0)
    for n, d in ((5, 30), (29, 30), (40, 30)):                          # N < d uses the N x N form
        feats, ref = rng.normal(size=(n, d)), rng.normal(size=(50, d)) * 2 + 1
        mu, sigma = evaluate.feature_stats(ref)
        want = evaluate.frechet_distance(*evaluate.feature_stats(feats), mu, sigma)
        assert evaluate.frechet_distance_to(feats, mu, sigma) == pytest.approx(want, rel=1e-6)


def test_reference_cache_is_keyed_by_data_and_weights(tmp_path, small_inception):
    train, samples = blocks(24, 0), blocks(8, 5)
    svhn_files(tmp_path / "data", train, blocks(4, 1))
    standin_weights(tmp_path / "a.pth", seed=0)
    standin_weights(tmp_path / "b.pth", seed=1)
    ev = types.SimpleNamespace(dataset="svhn", test=None)
    cfg, fid, counted = fid_for(tmp_path, tmp_path / "a.pth")
    first = evaluate.eval_fid(cfg, ev, samples, fid)
    again = evaluate.eval_fid(cfg, ev, samples, fid)
    assert counted == [24, 8, 8] and again["fid"] == first["fid"]       # computed once, then reused
    (cached,) = (tmp_path / "cache").glob("ref_svhn_*.npz")
    assert first["fid_ref"] == str(cached)
    cfg, fid, counted = fid_for(tmp_path, tmp_path / "b.pth")             # other weights: computed anew
    other_weights = evaluate.eval_fid(cfg, ev, samples, fid)
    assert counted == [24, 8] and other_weights["fid"] != first["fid"]
    changed = train.copy()
    changed[3, 0, 0, 0] ^= 1                                             # one pixel of one image
    svhn_files(tmp_path / "data2", changed, blocks(4, 1))
    cfg, fid, counted = fid_for(tmp_path, tmp_path / "a.pth", data="data2")   # other data: computed anew
    evaluate.eval_fid(cfg, ev, samples, fid)
    assert counted == [24, 8] and len(list((tmp_path / "cache").glob("ref_svhn_*.npz"))) == 3


def test_pytorch_fid_statistics_file(tmp_path, small_inception):
    train, samples = blocks(24, 0), blocks(8, 5)
    svhn_files(tmp_path / "data", train, blocks(4, 1))
    standin_weights(tmp_path / "w.pth", seed=0)
    ev = types.SimpleNamespace(dataset="svhn", test=None)
    cfg, fid, _ = fid_for(tmp_path, tmp_path / "w.pth")
    own = evaluate.eval_fid(cfg, ev, samples, fid)
    # The training set's statistics written as pytorch-fid writes them (float32 mu, sigma) give the same FID.
    f = fid.features(train)[0].astype(np.float64)
    mu, sigma = f.mean(0).astype(np.float32), np.cov(f, rowvar=False).astype(np.float32)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    cfg.fid_stats = str(tmp_path / "stats.npz")
    ext = evaluate.eval_fid(cfg, ev, samples, evaluate.fid_setup(cfg, "svhn", "cpu"))
    assert ext["fid"] == pytest.approx(own["fid"], rel=1e-3) and ext["fid_ref"] == cfg.fid_stats
    np.savez(tmp_path / "stats768.npz", mu=np.zeros(768), sigma=np.eye(768))   # pytorch-fid --dims=768
    cfg.fid_stats = str(tmp_path / "stats768.npz")
    with pytest.raises(ValueError, match="768-d features .*ours are 2048-d"):
        evaluate.fid_setup(cfg, "svhn", "cpu")


def test_weights_of_the_wrong_format_are_a_clear_error(tmp_path, small_inception):
    standin_weights(tmp_path / "w.pth", seed=0)
    state = torch.load(tmp_path / "w.pth", weights_only=True)
    state["fc.weight"] = state["fc.weight"][:1000]                       # a 1000-class ImageNet head
    torch.save(state, tmp_path / "head.pth")
    with pytest.raises(ValueError, match="does not hold the FID Inception weights.*fc.weight"):
        evaluate.inception_network(str(tmp_path / "head.pth"), "cpu")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not hold the FID Inception weights.*Missing key"):
        evaluate.inception_network(str(tmp_path / "other.pth"), "cpu")
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(ValueError, match="is not a PyTorch weights file"):
        evaluate.inception_network(str(tmp_path / "text.pth"), "cpu")
    net, sha = evaluate.inception_network(str(tmp_path / "w.pth"), "cpu")
    assert len(sha) == 64 and not sha.startswith(evaluate.INCEPTION_SHA256)   # a stand-in, and it says so


# ---- Without torch-fidelity: what fails before any work, and digits ----

def checkpoint(tmp_path, data: str):
    """An untrained --quick checkpoint (NCSN++ nf 8) for `data`."""
    cfg = train_images.parse_config(["--quick", f"--data={data}", f"--data_dir={tmp_path / 'data'}"])
    model = qcsbm.NCSNpp(train_images.model_config(cfg))
    path = tmp_path / f"{data}.pt"
    image_io.save_checkpoint(image_io.make_checkpoint(model, qcsbm.EMA(model), torch.optim.Adam(model.parameters()),
                                                      1, dataclasses.asdict(cfg), []), str(path))
    return path


def test_fid_problems_are_reported_before_any_sampling(tmp_path, monkeypatch):
    svhn_files(tmp_path / "data", blocks(8, 0), blocks(4, 1))
    args = [f"--ckpt={checkpoint(tmp_path, 'svhn')}", "--eval=nll,sample,fid", "--quick",
            f"--out_dir={tmp_path / 'eval'}", f"--cache_dir={tmp_path / 'cache'}"]
    work = []
    monkeypatch.setitem(evaluate.qcsbm.SAMPLERS, "pc", lambda *a, **k: work.append("sample"))
    monkeypatch.setattr(evaluate.qcsbm, "bits_per_dim", lambda *a, **k: work.append("nll"))
    real_import = builtins.__import__

    def importing(error):
        def imp(name, *a, **k):
            if name.startswith("torch_fidelity"):
                raise error
            return real_import(name, *a, **k)
        return imp

    monkeypatch.setattr(builtins, "__import__", importing(ModuleNotFoundError("no", name="torch_fidelity")))
    with pytest.raises(ImportError, match="need torch-fidelity, which is not installed.*requirements-fid"):
        evaluate.main(args)
    monkeypatch.setattr(builtins, "__import__", importing(ModuleNotFoundError("no", name="torchvision")))
    with pytest.raises(ImportError, match="need torchvision .*built for your torch"):
        evaluate.main(args)
    monkeypatch.setattr(builtins, "__import__", importing(RuntimeError("operator torchvision::nms missing")))
    with pytest.raises(ImportError, match="torchvision cannot load beside torch .*nms.*built for another"):
        evaluate.main(args)
    monkeypatch.setattr(builtins, "__import__", real_import)
    fake = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")   # the library, without weights
    fake.FeatureExtractorInceptionV3 = None
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fake)
    with pytest.raises(FileNotFoundError, match="nowhere.pth.*--inception_weights"):
        evaluate.main(args + [f"--inception_weights={tmp_path / 'nowhere.pth'}"])
    (tmp_path / "bad.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="bad.pth is not a PyTorch weights file"):
        evaluate.main(args + [f"--inception_weights={tmp_path / 'bad.pth'}"])
    assert work == []                                                    # no NLL, no sampling was started


def test_digits_fid_uses_its_own_classifier_and_says_so(tmp_path, capsys):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))   # Inception statistics
    args = [f"--ckpt={checkpoint(tmp_path, 'digits')}", "--eval=fid", "--quick", "--inception_weights=/no.pth",
            f"--out_dir={tmp_path / 'eval'}", f"--cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(ValueError, match="stats.npz holds statistics of 2048-d features .*ours are 64-d"):
        evaluate.main(args + [f"--fid_stats={tmp_path / 'stats.npz'}"])
    r = evaluate.main(args)
    out = capsys.readouterr().out
    assert "digits-FID, NOT comparable with Inception FID" in out and "digits-FID (NOT Inception FID)" in out
    assert "fid" not in r and "is" not in r and np.isfinite(r["digits_fid"]) and r["fid_n"] == 8
    assert r["classifier_test_acc"] > 0.95                               # its own classifier, trained here
