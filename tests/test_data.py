"""Data readers (image_io.py): tiny files in each official format, written here and read back."""
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from scipy.io import savemat

import image_io
import train_images as ti


def images(n, seed):  # uint8 images (n, 3, 32, 32), distinct per call
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def cifar_files(root, name, archive):
    """The CIFAR python-version layout; returns {split: expected uint8 images}."""
    _, folder, train, test = image_io.CIFAR[name]
    label = b"labels" if name == "cifar10" else b"fine_labels"
    blobs, want = {}, {"train": [], "test": []}
    for i, member in enumerate(train + test):
        x = images(3, i)
        want["train" if member in train else "test"].append(x)
        # The official files are Python 2 pickles of {b'data': (N, 3072) uint8 in CHW order, labels}.
        blobs[member] = pickle.dumps({b"data": x.reshape(3, -1), label: [0, 1, 2]}, protocol=2)
    if archive:
        with tarfile.open(os.path.join(root, image_io.CIFAR[name][0]), "w:gz") as tar:
            for member, blob in blobs.items():
                info = tarfile.TarInfo(f"{folder}/{member}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        os.makedirs(os.path.join(root, folder))
        for member, blob in blobs.items():
            with open(os.path.join(root, folder, member), "wb") as fh:
                fh.write(blob)
    return {k: np.concatenate(v) for k, v in want.items()}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("archive", [True, False])
def test_cifar_archive_and_folder(tmp_path, name, archive):
    want = cifar_files(str(tmp_path), name, archive)
    for split in ("train", "test"):
        x = image_io.load_dataset(name, str(tmp_path), split)
        assert x.dtype == torch.float32 and x.shape == want[split].shape
        assert torch.equal(x, torch.from_numpy(want[split]).float() / 255)
    assert len(want["train"]) == 3 * (5 if name == "cifar10" else 1)


def test_svhn_mat(tmp_path):
    want = {split: images(4, i) for i, split in enumerate(("train", "test"))}
    for split, x in want.items():  # the official layout is (32, 32, 3, N), HWC per image
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": np.ones((4, 1))})
    for split, x in want.items():
        assert torch.equal(image_io.load_dataset("svhn", str(tmp_path), split), torch.from_numpy(x).float() / 255)


def test_imagenet32_npz(tmp_path):
    want = {"train": images(20, 0), "test": images(2, 1)}
    for i, chunk in enumerate(np.split(want["train"], 10)):
        np.savez(tmp_path / f"train_data_batch_{i + 1}.npz", data=chunk.reshape(2, -1), labels=[1, 2])
    np.savez(tmp_path / "val_data.npz", data=want["test"].reshape(2, -1), labels=[1, 2])
    for split, x in want.items():
        assert torch.equal(image_io.load_dataset("imagenet32", str(tmp_path), split), torch.from_numpy(x).float() / 255)
    os.remove(tmp_path / "train_data_batch_7.npz")
    with pytest.raises(FileNotFoundError, match="train_data_batch_7.npz"):
        image_io.load_dataset("imagenet32", str(tmp_path), "train")


def test_digits_default_needs_nothing():
    train, test = image_io.load_dataset("digits", "nowhere", "train"), image_io.load_dataset("digits", "nowhere", "test")
    assert train.shape == (1500, 1, 8, 8) and test.shape == (297, 1, 8, 8)
    assert train.min() == 0 and train.max() == 1 and len(torch.unique(train)) == 17   # values k / 16


@pytest.mark.parametrize("name, expected", [("cifar10", "cifar-10-python.tar.gz"),
                                            ("cifar100", "cifar-100-python.tar.gz"),
                                            ("svhn", "train_32x32.mat"),
                                            ("imagenet32", "train_data_batch_1.npz")])
def test_missing_files_name_what_is_expected(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError, match=expected.replace(".", r"\.")):
        image_io.load_dataset(name, str(tmp_path), "train")


def test_incomplete_folder_names_missing_batches(tmp_path):
    cifar_files(str(tmp_path), "cifar10", archive=False)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        image_io.load_dataset("cifar10", str(tmp_path), "train")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad pickle"])
def test_corrupt_archive_is_a_clear_error(tmp_path, damage):
    cifar_files(str(tmp_path), "cifar10", archive=True)
    path = tmp_path / "cifar-10-python.tar.gz"
    if damage == "garbage":
        path.write_bytes(b"this is not a gzip file" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:  # a valid archive whose member holds broken pickle bytes
        with tarfile.open(path, "w:gz") as tar:
            for m in image_io.CIFAR["cifar10"][2]:
                info = tarfile.TarInfo(f"cifar-10-batches-py/{m}")
                info.size = 9
                tar.addfile(info, io.BytesIO(b"\x80\x02}q\x00garb"))
    with pytest.raises(ValueError, match="corrupt or not the official file.*cs.toronto.edu") as err:
        image_io.load_dataset("cifar10", str(tmp_path), "train")
    assert err.value.__cause__ is None and err.value.__suppress_context__      # no pickle traceback


def test_corrupt_svhn_and_npz(tmp_path):
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB? no")
    with pytest.raises(ValueError, match="train_32x32.mat is corrupt"):
        image_io.load_dataset("svhn", str(tmp_path), "train")
    (tmp_path / "val_data.npz").write_bytes(b"PK\x03\x04broken")
    with pytest.raises(ValueError, match="val_data.npz is corrupt"):
        image_io.load_dataset("imagenet32", str(tmp_path), "test")


def test_global_batch_split_across_ranks_and_flips():
    data = torch.arange(50 * 4, dtype=torch.uint8).view(50, 1, 2, 2)
    one = ti.get_batch(data, 256, torch.Generator().manual_seed(3), 8, 0, 1, hflip=True)
    two = [ti.get_batch(data, 256, torch.Generator().manual_seed(3), 8, r, 2, hflip=True) for r in (0, 1)]
    assert torch.equal(one, torch.cat(two))                    # ranks see the slices of one global batch
    plain = ti.get_batch(data, 256, torch.Generator().manual_seed(3), 8, 0, 1, hflip=False)
    flipped = (one != plain).flatten(1).any(1)
    assert 0 < flipped.sum() < 8 and torch.equal(one[flipped], plain[flipped].flip(3))
