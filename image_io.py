"""The image side shared by train_images.py and evaluate.py: the data sets' official files, checkpoints
(ours, and score_sde's format, in which the published U-NCSN++ checkpoints come), and the set-up of
one process or many (torchrun).

Our checkpoint format (train_images.py writes it): a dict with `format` (CHECKPOINT_FORMAT), `model`
(state dict), `ema` (qcsbm.EMA.state_dict()), `optimizer` (Adam), `step`, `config`
(train_images.Config as a dict), `model_config` (qcsbm.NCSNppConfig as a dict) and `rng` (one entry
per rank).

score_sde's format (`utils.save_checkpoint` there; the QCSBM authors' files are the same without `step`):
    model      state dict of the DataParallel-wrapped NCSNpp: keys `module.all_modules.<i>.<name>`, the
               network's modules numbered in the order they run, plus `module.sigmas` (1000 discrete noise
               levels, unused by continuous models) and `module.all_modules.0.W` (the fixed Fourier
               frequencies, a parameter with requires_grad=False);
    ema        {decay, num_updates, shadow_params}: shadow_params lists the trainable parameters only,
               in model.parameters() order (so without W);
    optimizer  Adam's state dict, parameters numbered in model.parameters() order (W included);
    step       the training step (absent from the QCSBM authors' files).

qcsbm.NCSNpp holds exactly the same tensors under readable names, its modules kept in score_sde's order,
so the conversion is a renaming (`score_sde_names`). The network's shape (width, levels, blocks,
attention) is read from the tensors; the image size cannot be, so the caller gives it.
"""
from __future__ import annotations

import dataclasses
import errno
import glob
import io
import json
import math
import os
import pickle
import re
import socket
import sys
import tarfile
import time

import numpy as np
import torch
import torch.distributed as dist

import cli
import qcsbm
from cli import RunError

# ---- Data: the official files, read without TensorFlow, torchvision or downloads ----
# Each reader returns uint8 images (N, C, H, W); `load_dataset` scales them to [0, 1] (VE SDE, not
# centered, as the paper). Training keeps uint8 in memory and converts one batch at a time.

DATASETS = {"digits": (1, 8, 17), "cifar10": (3, 32, 256), "cifar100": (3, 32, 256),  # (C, size, levels)
            "svhn": (3, 32, 256), "imagenet32": (3, 32, 256)}
CIFAR = {"cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                     [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
         "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], ["test"])}
SOURCES = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html (CIFAR-10 python version)",
           "cifar100": "https://www.cs.toronto.edu/~kriz/cifar.html (CIFAR-100 python version)",
           "svhn": "http://ufldl.stanford.edu/housenumbers/ (format 2, cropped digits)",
           "imagenet32": "https://image-net.org/download-images (Imagenet32_train_npz.zip, Imagenet32_val_npz.zip)"}


def corrupt(path, err, name):
    return ValueError(f"{path} is corrupt or not the official file ({type(err).__name__}: {err}); "
                      f"download it again from {SOURCES[name]}")


class SafeUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch files without running their code: only the builtin containers, bytes,
    str and int (opcodes, no globals), and numpy's array reconstruction are allowed. Any other global a
    pickle names (os.system, eval, a class to build) is refused before it is looked up."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),  # protocol 5
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}    # how Python 3 writes bytes at pickle protocol 2 (latin-1 text)

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load the global {module}.{name}: a data file holds "
                                         f"only arrays, lists, dicts, bytes, str and int")
        return super().find_class(module, name)


def safe_unpickle(blob: bytes):
    """pickle.loads(blob, encoding='bytes') through SafeUnpickler."""
    return SafeUnpickler(io.BytesIO(blob), encoding="bytes").load()


def read_cifar(name, data_dir, split):
    archive, folder, train, test = CIFAR[name]
    members = train if split == "train" else test
    folder_path, archive_path = os.path.join(data_dir, folder), os.path.join(data_dir, archive)
    source = folder_path if os.path.isdir(folder_path) else archive_path
    if os.path.isdir(folder_path):
        missing = [m for m in members if not os.path.isfile(os.path.join(folder_path, m))]
        if missing:
            raise FileNotFoundError(f"{folder_path} is incomplete: missing {missing}; extract {archive} "
                                    f"again, from {SOURCES[name]}")
        blobs = {m: open(os.path.join(folder_path, m), "rb").read() for m in members}
    elif os.path.isfile(archive_path):
        try:
            with tarfile.open(archive_path, "r:gz") as tar:
                blobs = {m: tar.extractfile(f"{folder}/{m}").read() for m in members}
        except Exception as e:  # tarfile, gzip, zlib and a missing member all fail differently
            raise corrupt(archive_path, e, name) from None
    else:
        raise FileNotFoundError(f"no {name} data in {data_dir!r}: expected the archive {archive} or its "
                                f"extracted folder {folder}/ ({', '.join(train + test)}), from {SOURCES[name]}")
    arrays = []
    for m, blob in blobs.items():
        try:
            arrays.append(np.asarray(safe_unpickle(blob)[b"data"], np.uint8).reshape(-1, 3, 32, 32))
        except pickle.UnpicklingError as e:
            if "refused to load the global" in str(e):
                raise ValueError(f"{source}: {m} is not a plain CIFAR data file and was not loaded: {e}. "
                                 f"Download it again from {SOURCES[name]}") from None
            raise corrupt(f"{source}: {m}", e, name) from None
        except Exception as e:  # unpickling damaged bytes can raise almost anything
            raise corrupt(f"{source}: {m}", e, name) from None
    return np.concatenate(arrays)


def read_svhn(data_dir, split):
    from scipy.io import loadmat
    path = os.path.join(data_dir, f"{split}_32x32.mat")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SVHN {split} split in {data_dir!r}: expected train_32x32.mat and "
                                f"test_32x32.mat, from {SOURCES['svhn']}")
    try:
        X = loadmat(path, variable_names=["X"])["X"]                     # (32, 32, 3, N)
        return np.ascontiguousarray(X.transpose(3, 2, 0, 1), dtype=np.uint8).reshape(-1, 3, 32, 32)
    except Exception as e:
        raise corrupt(path, e, "svhn") from None


def read_imagenet32(data_dir, split):
    names = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
    paths = [next((p for p in (os.path.join(data_dir, n + ".npz"), os.path.join(data_dir, n))
                   if os.path.isfile(p)), None) for n in names]
    missing = [n + ".npz" for n, p in zip(names, paths) if p is None]
    if missing:
        raise FileNotFoundError(f"ImageNet 32x32 {split} files missing from {data_dir!r}: {missing} (expected "
                                f"train_data_batch_1..10.npz and val_data.npz, from {SOURCES['imagenet32']})")
    arrays = []
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as npz:
                data = npz["data"]
        except Exception as e:
            raise corrupt(p, e, "imagenet32") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:       # rows are R, G, B planes of 32x32
            side = math.isqrt(data.shape[1] // 3) if data.ndim == 2 and data.shape[1] % 3 == 0 else 0
            found = (f"{side}x{side} images ({data.shape[1]} values per row)" if side * side * 3 == data.shape[1]
                     and side else f"an array of shape {data.shape}")
            raise ValueError(f"{p} holds {found}, not ImageNet 32x32 (3072 values per row): the 64x64 and "
                             f"16x16 downsampled ImageNet files have the same names; use the Imagenet32 "
                             f"ones, from {SOURCES['imagenet32']}")
        arrays.append(np.asarray(data, np.uint8).reshape(-1, 3, 32, 32))
    return np.concatenate(arrays)


def load_uint8(name: str, data_dir: str, split: str) -> np.ndarray:
    """uint8 images (N, C, H, W) with DATASETS[name][2] levels each."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; valid choices: 'train', 'test'")
    match name:
        case "digits":  # 1797 8x8 images with values 0..16; the last 297 are our test split
            from sklearn.datasets import load_digits
            x = load_digits().images.astype(np.uint8)[:, None]
            return x[:1500] if split == "train" else x[1500:]
        case "cifar10" | "cifar100":
            return read_cifar(name, data_dir, split)
        case "svhn":
            return read_svhn(data_dir, split)
        case "imagenet32":
            return read_imagenet32(data_dir, split)
    raise ValueError(f"unknown data set {name!r}; valid choices: {', '.join(DATASETS)}")


def load_dataset(name: str, data_dir: str, split: str) -> torch.Tensor:
    """float32 images (N, C, H, W) in [0, 1]."""
    x = load_uint8(name, data_dir, split)
    return torch.from_numpy(x).float() / (DATASETS[name][2] - 1)


CHECKPOINT_FORMAT = 2     # 2: score_sde's exact NCSN++ (December 2026); 1 was our earlier NCSN++


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [0, 1], (N, C, H, W) float -> (N, H, W, C) uint8, the layout FID tools expect."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path, size: int = 512):
    """A PNG of uint8 images (N, H, W, C) in a square grid, 1-pixel white gaps, upscaled (nearest) to
    about `size` pixels."""
    import matplotlib.pyplot as plt
    n = math.ceil(math.sqrt(len(images)))
    H, W, C = images.shape[1:]
    grid = np.full((n * (H + 1) + 1, n * (W + 1) + 1, C), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, n)
        grid[1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W] = im
    scale = max(1, size // len(grid))
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    plt.imsave(path, grid[..., 0] if C == 1 else grid, cmap="gray", vmin=0, vmax=255)


# ---- Our own format ----

def load_checkpoint(path: str) -> dict:
    """Our checkpoint dict (see the module docstring). Refuses other files with a message saying what
    they are; reads nothing but tensors and plain Python (weights_only)."""
    return check_ours(read_file(path), path)


def check_ours(obj, path: str) -> dict:
    """`obj`, read from `path`, if it is one of our checkpoints in the current format."""
    if is_score_sde(obj):
        raise ValueError(f"{path} is a score_sde-format checkpoint, not one of train_images.py's; load it "
                         f"with image_io.load_score_sde, or pass it as --init_from / --ckpt")
    if not isinstance(obj, dict) or "config" not in obj or "model" not in obj:
        raise ValueError(f"{path} is not a checkpoint written by train_images.py (found "
                         f"{_describe(obj)})")
    if obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} was written by an earlier version of qcsbm (checkpoint format "
                         f"{obj.get('format', 1)}, now {CHECKPOINT_FORMAT}): its NCSN++ is not score_sde's "
                         f"network (attention, resampling shortcuts, progressive input, input centering "
                         f"all changed), so its weights cannot be used; train again")
    return obj


def make_checkpoint(model: qcsbm.NCSNpp, ema: qcsbm.EMA, optimizer: torch.optim.Optimizer, step: int,
                    config: dict, rng: list) -> dict:
    """Our checkpoint dict, in the format of the module docstring."""
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "step": step, "config": config,
            "model_config": dataclasses.asdict(model.cfg), "rng": rng}


def save_checkpoint(obj: dict, path: str, what: str = "the checkpoint"):
    """Write to a temporary file, flush it to disk, then rename: the file at `path` is always complete.
    A failed write (a full disk, a quota, an I/O error) removes the temporary file and raises one
    RunError naming `path`, what was not written, and what `path` still holds."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        reason = os.strerror(e.errno) if e.errno else str(e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            reason += " (free some space, then run the same command again to continue)"
        kept = ("the previous file there is intact" if os.path.isfile(path) else "nothing was there before")
        raise RunError(f"could not write {what} to {path}: {reason}; {kept}") from None


def read_file(path: str):
    """torch.load with weights_only=True, its failures turned into one clear message."""
    if not os.path.isfile(path):
        found = sorted(glob.glob(os.path.join("runs", "*", "ckpt.pt")))[:8]
        raise FileNotFoundError(f"no checkpoint at {path}" + (f"; checkpoints under runs/: {', '.join(found)}" if found
                                                               else " (train_images.py writes runs/<preset>/ckpt.pt)"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e).strip()
        found = re.search(r"GLOBAL (\S+)", text)
        if found:
            raise ValueError(f"{path} is not a checkpoint that qcsbm reads: it names the Python object "
                             f"{found.group(1)[:200]}, and files that hold more than tensors and plain "
                             f"containers are never loaded here, since loading them could run code") from None
        # Never pass on torch's advice to load with weights_only=False: that runs the file's code.
        first = ("not a file written by torch.save" if "weights_only" in text or "Weights only" in text
                 else text.splitlines()[0] if text else "")
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint (truncated, damaged, or not a "
                         f"checkpoint): {type(e).__name__}: {first[:200]}") from None


def _describe(obj) -> str:
    if isinstance(obj, dict):
        keys = list(obj)
        return f"a dict with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
    return f"a {type(obj).__name__}"


def model_from_checkpoint(path: str, use_ema: bool = True, data: str = ""):
    """(model in eval mode, training settings as a dict, step) from one of our checkpoints, or from a
    score_sde-format one, which does not say what it was trained on: `data` names the data set, and the
    settings are the paper's (VE SDE 0.01 -> 50, method U); its step is None where the file has none."""
    obj = read_file(path)
    if is_score_sde(obj):
        if data not in DATASETS:
            raise ValueError(f"{path} is a score_sde-format checkpoint, which does not record its data set: "
                             f"pass --data=NAME, one of {', '.join(DATASETS)}")
        ckpt = from_score_sde(obj, DATASETS[data][1], path)
        train = {"data": data, "data_dir": "data", "method": "u", "sigma_min": 0.01, "sigma_max": 50.0}
        arch, weights, step = ckpt["config"], ckpt["ema" if use_ema else "model"], ckpt["step"]
    else:
        ckpt = check_ours(obj, path)
        train, step = ckpt["config"], ckpt["step"]
        arch, weights = qcsbm.NCSNppConfig(**ckpt["model_config"]), ckpt["ema"]["model"] if use_ema else ckpt["model"]
    with torch.random.fork_rng():
        model = qcsbm.NCSNpp(arch)
    model.load_state_dict(weights, strict=True)
    return model.eval(), train, step


# ---- score_sde's format ----

def is_score_sde(obj) -> bool:
    """True for a dict in score_sde's checkpoint layout (our own files have a `config` entry)."""
    return (isinstance(obj, dict) and "config" not in obj and isinstance(obj.get("model"), dict)
            and isinstance(obj.get("ema"), dict) and "shadow_params" in obj["ema"])


def score_sde_names(model: qcsbm.NCSNpp) -> dict[str, str]:
    """{our state-dict key: score_sde's key without `module.`}, in score_sde's parameter order (the order
    of model.parameters() there): W, the time embedding, then every module in the order it runs."""
    local = {qcsbm.ResBlock: {"norm0": "GroupNorm_0", "conv0": "Conv_0", "temb": "Dense_0",
                              "norm1": "GroupNorm_1", "conv1": "Conv_1", "skip": "Conv_2"},
             qcsbm.Attention: {"norm": "GroupNorm_0", "q": "NIN_0", "k": "NIN_1", "v": "NIN_2", "out": "NIN_3"},
             qcsbm.PyramidDown: {"conv": "Conv2d_0"}}
    prefix = {id(m): name for name, m in model.named_modules()}
    modules = [model.temb[0], model.temb[2], model.conv_in, *model.down, *model.mid, *model.up,
               model.norm_out, model.conv_out]
    names = {"freqs": "all_modules.0.W"}
    for i, m in enumerate(modules, start=1):
        for name, _ in m.named_parameters():
            part, _, leaf = name.rpartition(".")                     # e.g. ("norm0", "weight")
            theirs = f"{local[type(m)][part]}.{leaf}" if part else leaf
            names[f"{prefix[id(m)]}.{name}"] = f"all_modules.{i}.{theirs}"
    return names


def _module_kinds(state: dict) -> list[tuple[str, dict]]:
    """score_sde's all_modules, in order, as (kind, {local name: shape}); kind is one of res (a residual
    block), attn, pyramid (the progressive input's downsampling), norm, conv, linear or '?'."""
    groups: dict[int, dict] = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] == "all_modules" and parts[1].isdigit():
            groups.setdefault(int(parts[1]), {})[".".join(parts[2:])] = tuple(value.shape)
    out = []
    for i in range(max(groups, default=-1) + 1):
        g = groups.get(i, {})
        kind = ("res" if "Conv_0.weight" in g and "Dense_0.weight" in g else
                "attn" if "NIN_0.W" in g else
                "pyramid" if set(g) == {"Conv2d_0.weight", "Conv2d_0.bias"} else
                "conv" if len(g.get("weight", ())) == 4 else
                "linear" if len(g.get("weight", ())) == 2 else
                "norm" if len(g.get("weight", ())) == 1 and "bias" in g else "?")
        out.append((kind, g))
    return out


def infer_config(state: dict, image_size: int) -> qcsbm.NCSNppConfig:
    """The NCSNppConfig of a score_sde NCSN++ state dict (keys without `module.`), from its tensors.
    Dropout and the Fourier scale leave no trace in them: they keep the paper's values (the Fourier
    frequencies themselves are loaded)."""
    if "all_modules.0.W" not in state:
        raise ValueError("no Gaussian Fourier features (all_modules.0.W): not a continuous-time NCSN++ of "
                         "score_sde's VE configs (a DDPM++, VP, or discrete-time model?); expected the "
                         "network of configs/ve/cifar10_ncsnpp_deep_continuous.py")
    kinds = _module_kinds(state)
    summary = " ".join(k for k, _ in kinds)
    expect = lambda cond, what: cond or _raise(
        f"{what}; found the modules: {summary[:400]}{' ...' if len(summary) > 400 else ''}")
    nf = state["all_modules.0.W"].shape[0]
    expect(len(kinds) > 4 and [k for k, _ in kinds[1:4]] == ["linear", "linear", "conv"],
           "expected the time embedding (two dense layers) and an input convolution after W")
    conv_in = kinds[3][1]["weight"]
    expect(conv_in[0] == nf and conv_in[2:] == (3, 3), f"expected the input convolution to have {nf} "
           f"output channels (the Fourier features' count) and a 3x3 kernel, found {conv_in}")
    channels = conv_in[1]
    n_res, n_levels = sum(k == "res" for k, _ in kinds), sum(k == "pyramid" for k, _ in kinds) + 1
    expect((n_res - 3 * n_levels) % (2 * n_levels) == 0 and n_res > 3 * n_levels,
           f"{n_res} residual blocks cannot make an NCSN++ with {n_levels} levels and residual progressive "
           f"input (2 L R + 3 L blocks for L levels of R blocks)")
    n_blocks = (n_res - 3 * n_levels) // (2 * n_levels)
    if image_size % 2 ** (n_levels - 1):
        raise ValueError(f"this NCSN++ has {n_levels} resolution levels, so its images halve "
                         f"{n_levels - 1} times; image_size={image_size} cannot be halved that often. Was it "
                         f"trained at another resolution? Pass the image size it was trained at")
    ch_mult, attn, i = [], [], 4
    for lev in range(n_levels):
        for _ in range(n_blocks):
            expect(kinds[i][0] == "res", f"expected a residual block at all_modules.{i} (level {lev})")
            out_ch = kinds[i][1]["Conv_0.weight"][0]
            i += 1
            if kinds[i][0] == "attn":
                res = image_size // 2 ** lev
                attn += [] if res in attn else [res]
                i += 1
        expect(out_ch % nf == 0, f"level {lev} has {out_ch} channels, not a multiple of nf = {nf}")
        ch_mult.append(out_ch // nf)
        if lev < n_levels - 1:
            expect([k for k, _ in kinds[i:i + 2]] == ["res", "pyramid"],
                   f"expected a downsampling block and the progressive input at all_modules.{i}")
            i += 2
    return qcsbm.NCSNppConfig(image_size=image_size, channels=channels, nf=nf, ch_mult=tuple(ch_mult),
                              num_res_blocks=n_blocks, attn_resolutions=tuple(attn))


def _raise(msg):
    raise ValueError(msg)


def read_score_sde(path: str, image_size: int) -> dict:
    """A score_sde-format checkpoint in our terms: {config (NCSNppConfig), model and ema (our state dicts),
    ema_num_updates, ema_decay, optimizer (our Adam state dict), step (None if absent)}. Every tensor is
    mapped and its shape checked; anything missing or left over is an error that names it."""
    return from_score_sde(read_file(path), image_size, path)


def from_score_sde(obj, image_size: int, path: str) -> dict:
    """read_score_sde of `obj`, already read from `path`."""
    if not is_score_sde(obj):
        raise ValueError(f"{path} is not a score_sde-format checkpoint (expected a dict with 'model', 'ema' "
                         f"with 'shadow_params', 'optimizer'; found {_describe(obj)})")
    theirs = {k.removeprefix("module."): v for k, v in obj["model"].items()}
    try:
        cfg = infer_config(theirs, image_size)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    with torch.random.fork_rng():                            # building the model draws random weights
        model = qcsbm.NCSNpp(cfg)
    names, ours = score_sde_names(model), model.state_dict()
    expected = {theirs_key: ours[our_key].shape for our_key, theirs_key in names.items()}
    missing = [k for k in expected if k not in theirs]
    extra = [k for k in theirs if k not in expected and k != "sigmas"]
    wrong = [f"{k}: {tuple(theirs[k].shape)} in the file, {tuple(s)} expected" for k, s in expected.items()
             if k in theirs and theirs[k].shape != s]
    if missing or extra or wrong:
        raise ValueError(f"{path} does not hold the NCSN++ its tensors suggest ({_cfg_str(cfg)}): "
                         + "; ".join(f"{what} {items[:6]}{' ...' if len(items) > 6 else ''}"
                                     for what, items in [("missing", missing), ("unexpected", extra),
                                                         ("wrong shape", wrong)] if items))
    live = {our_key: theirs[theirs_key].float() for our_key, theirs_key in names.items()}
    trainable = [k for k in names if k != "freqs"]           # score_sde's shadow_params, in order
    shadow = obj["ema"]["shadow_params"]
    if len(shadow) != len(trainable) or any(s.shape != live[k].shape for s, k in zip(shadow, trainable)):
        raise ValueError(f"{path}: the EMA holds {len(shadow)} tensors that do not match the model's "
                         f"{len(trainable)} trainable parameters in order")
    ema = dict(live) | {k: s.float() for k, s in zip(trainable, shadow)}
    order = list(names)                                       # score_sde's parameter numbering
    ours_order = [k for k, _ in model.named_parameters()]
    optimizer = _renumber_adam(obj.get("optimizer"), [order.index(k) for k in ours_order], path)
    step = obj.get("step")
    return {"config": cfg, "model": live, "ema": ema, "ema_num_updates": int(obj["ema"].get("num_updates") or 0),
            "ema_decay": obj["ema"].get("decay"), "optimizer": optimizer,
            "step": None if step is None else int(step)}


def _renumber_adam(state: dict | None, old_index: list[int | None], path: str) -> dict | None:
    """Adam's state dict with parameter i of the new numbering taken from old_index[i] (None: no state)."""
    if state is None:
        return None
    if not isinstance(state, dict) or len(state.get("param_groups", ())) != 1:
        raise ValueError(f"{path}: 'optimizer' is not the state of a one-group Adam optimizer")
    group = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
    old = state["param_groups"][0]["params"]
    new_state = {i: state["state"][old[j]] for i, j in enumerate(old_index)
                 if j is not None and old[j] in state["state"]}
    return {"state": new_state, "param_groups": [group | {"params": list(range(len(old_index)))}]}


def _cfg_str(cfg: qcsbm.NCSNppConfig) -> str:
    return (f"nf {cfg.nf}, ch_mult {cfg.ch_mult}, {cfg.num_res_blocks} blocks per resolution, "
            f"attention at {cfg.attn_resolutions}, {cfg.channels} channels, {cfg.image_size}x{cfg.image_size}")


def load_score_sde(path: str, image_size: int, ema: bool = True) -> qcsbm.NCSNpp:
    """Our NCSNpp (eval mode) with the weights of a score_sde-format checkpoint: the EMA weights (what
    score_sde evaluates and samples with) or, with ema=False, the live ones."""
    ckpt = read_score_sde(path, image_size)
    with torch.random.fork_rng():
        model = qcsbm.NCSNpp(ckpt["config"])
    model.load_state_dict(ckpt["ema" if ema else "model"], strict=True)
    return model.eval()


def to_score_sde(model: qcsbm.NCSNpp, ema_state: dict | None = None, ema_num_updates: int = 0,
                 ema_decay: float = 0.999, optimizer: dict | None = None, step: int | None = None,
                 sigma_min: float = 0.01, sigma_max: float = 50.0, num_scales: int = 1000) -> dict:
    """The score_sde-format dict of `model` (its live weights), `ema_state` (the EMA model's state dict;
    default: the live weights) and Adam state `optimizer` (numbered as model.parameters()). `sigmas` is
    filled as score_sde fills it (geometric from sigma_max to sigma_min), though nothing reads it."""
    names, live = score_sde_names(model), model.state_dict()
    ema_state = live if ema_state is None else ema_state
    sd = {"module.sigmas": torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales,
                                                    dtype=torch.float64))}
    sd |= {f"module.{theirs}": live[ours].detach().clone() for ours, theirs in names.items()}
    trainable = [k for k in names if k != "freqs"]
    ours_order = [k for k, _ in model.named_parameters()]
    out = {"model": sd,
           "ema": {"decay": ema_decay, "num_updates": ema_num_updates,
                   "shadow_params": [ema_state[k].detach().clone() for k in trainable]}}
    if optimizer is not None:
        out["optimizer"] = _renumber_adam(optimizer, [None] + [ours_order.index(k) for k in trainable],
                                          "the optimizer state")
    if step is not None:
        out["step"] = step
    return out


def export_score_sde(ckpt_path: str, out_path: str) -> dict:
    """Write one of our checkpoints in score_sde's format to out_path (atomically); returns the dict."""
    ckpt = load_checkpoint(ckpt_path)
    with torch.random.fork_rng():
        model = qcsbm.NCSNpp(qcsbm.NCSNppConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"], strict=True)
    ema = ckpt["ema"]
    out = to_score_sde(model, ema["model"], ema["num_updates"], ema["decay"], ckpt["optimizer"], ckpt["step"],
                       ckpt["config"]["sigma_min"], ckpt["config"]["sigma_max"])
    save_checkpoint(out, out_path)
    return out


# ---- One run per folder ----

class DirLock:
    """An exclusive lock on a folder for one run: `<folder>/.lock`, holding the pid, host and start time of
    its holder, kept locked (flock) while the run lasts and removed when it ends. A second run on the folder
    is refused with a message naming the first. A lock file left by a run that died (no process holds the
    flock: the kernel releases it with the process, kill -9 included) is taken over with a message."""

    def __init__(self, folder: str, what: str, say=print):
        self.path, self.what, self.say, self.fh = os.path.join(folder, ".lock"), what, say, None

    def acquire(self):
        import fcntl
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                self._refuse()
            except OSError:         # a file system without flock: the pid and host in the file decide
                pass
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:            # its holder ended and removed it between our open and flock: again
                fh.close()
                continue
            break
        fh.seek(0)
        old = fh.read().strip()
        if _alive_elsewhere(old):   # a holder that did not flock (no flock on this file system) and lives
            fh.close()
            self._refuse()
        if old:
            self.say(f"{self.path}: taking over the lock of {_describe_holder(old)}, which is no longer "
                     f"running (it did not end cleanly)")
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}))
        fh.flush()
        self.fh = fh
        return self

    def _refuse(self):
        raise RunError(f"another {self.what} is using {os.path.dirname(self.path)}: {_read_lock(self.path)} "
                       f"holds {self.path}. Wait for it to end, stop it, or use another folder (if it is no longer "
                       f"running, e.g. it ran on another host that went down, delete {self.path})")

    def release(self):
        if self.fh is not None:
            try:
                os.remove(self.path)
            except OSError:
                pass
            self.fh.close()                               # closing releases the flock
            self.fh = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} (started {h['started']}: {' '.join(h.get('argv', []))})"
    except (ValueError, KeyError, TypeError):
        return f"an unknown process (lock file contents {text[:80]!r})"


def _alive_elsewhere(text: str) -> bool:
    """True if the lock file text names another process: on this host one that is running, on another
    host any (it cannot be checked from here)."""
    try:
        h = json.loads(text)
        pid, host = int(h["pid"]), h["host"]
    except (ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # it exists, under another user
        return True
    return True


def _read_lock(path: str) -> str:
    try:
        with open(path) as fh:
            return _describe_holder(fh.read().strip())
    except OSError:
        return "an unknown process"


def lock_folder(folder: str, what: str, rank: int, world: int, say=print) -> DirLock | None:
    """Rank 0 takes DirLock(folder); under torchrun every rank learns whether it did, and all of them raise
    the same RunError if not (so no rank waits at a collective for one that stopped). Returns the lock on
    rank 0, None on the others."""
    lock, err = None, None
    if rank == 0:
        try:
            lock = DirLock(folder, what, say).acquire()
        except RunError as e:
            err = str(e)
    if world > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise RunError(err)
    return lock


# ---- One process or many ----

def setup_distributed(device: str = "auto"):
    """(rank, world_size, local_rank, device). Under torchrun (RANK in the environment) join the process
    group: NCCL on GPUs, gloo on CPU. Otherwise one process."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device(device)
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, local_rank, dev


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- Command line: export ----

@dataclasses.dataclass
class ExportConfig:
    export: str = ""        # one of our checkpoints (a train_images.py ckpt.pt)
    to: str = ""            # the file to write, in score_sde's format


def main(argv: list[str] | None = None):
    """python image_io.py --export=runs/cifar10_qc_finetune/ckpt.pt --to=checkpoint_score_sde.pth"""
    cfg = cli.parse(ExportConfig, sys.argv[1:] if argv is None else argv)
    if not cfg.export or not cfg.to:
        raise ValueError("usage: python image_io.py --export=CKPT --to=OUT (writes CKPT in score_sde's format)")
    out = export_score_sde(cfg.export, cfg.to)
    print(f"wrote {cfg.to}: score_sde format, step {out.get('step')}, {len(out['model']) - 1} model tensors, "
          f"{len(out['ema']['shadow_params'])} EMA tensors")


if __name__ == "__main__":
    cli.run(main)
