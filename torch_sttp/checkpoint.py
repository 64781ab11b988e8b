"""Crash-safe checkpoints of plain data, and training state that resumes bit for bit.

    >>> save_training_state("run/ckpt.pt", model, optimizer, step)          # atomic: old file or new file
    >>> state = load_training_state("run/ckpt.pt", model, optimizer)        # restores params, optimizer, RNGs
    >>> state.step

Files are written by :func:`torch.save` and read by ``torch.load(..., weights_only=True)``: they hold only tensors,
dicts, lists, tuples, strings, numbers, booleans and None, so reading one never runs code from the file — a file
with pickled objects (e.g. one whose ``__reduce__`` would call a function) is refused before anything in it runs.

Writing is atomic: the data goes to a temporary file in the destination's directory, is flushed and fsync'ed, and
then renamed over the destination (``os.replace``), so a crash or a kill during a save leaves the previous file
intact. Each file carries a SHA-256 digest of its contents, because a ``torch.save`` archive is not checked on
reading (a flipped byte in a tensor would otherwise load silently); a truncated or corrupted file raises
:class:`CheckpointError`.

``load_checkpoint(path, legacy=True)`` also reads the files the recipes wrote before this format (a plain
``torch.save`` of plain data, without the header and its digest), under the same weights-only unpickler; the only
extra types it admits are numeric numpy arrays (numpy's RNG state was saved as one). :func:`set_rng_state` restores
the RNG states of those files too.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import random
import struct
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, IO, Mapping

import torch

__all__ = [
    "CheckpointError",
    "open_safetensors",
    "unshared_tensors",
    "UnsafeCheckpointError",
    "TrainingState",
    "atomic_write",
    "save_checkpoint",
    "load_checkpoint",
    "save_training_state",
    "load_training_state",
    "rng_state",
    "set_rng_state",
]

FORMAT = "torch_sttp.checkpoint"
FORMAT_VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format
_PLAIN_LEAVES = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read back: truncated, corrupted, or not written by :func:`save_checkpoint`."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holding pickled objects other than plain data; it was not unpickled."""


# ---------------------------------------------------------------------------------------------------- writing
def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is plain data that ``torch.load(weights_only=True)`` reads back."""
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter) or value.layout != torch.strided:
            raise TypeError(f"save_checkpoint: {where} is a {type(value).__name__} with layout {value.layout}; "
                            "only plain dense tensors can be saved")
        return
    if type(value) in _PLAIN_LEAVES:  # exact types: an IntEnum or a numpy scalar would pickle as an object
        return
    if type(value) in (dict, OrderedDict):  # state_dicts are OrderedDicts
        for k, v in value.items():
            if type(k) not in (str, int, float, bool, type(None)):
                raise TypeError(f"save_checkpoint: {where} has a key of type {type(k).__name__}; keys must be "
                                "strings or numbers")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"save_checkpoint: {where} is a {type(value).__module__}.{type(value).__qualname__}; only "
                    "tensors, dicts, lists, tuples, strings, numbers, booleans and None can be saved (convert it, "
                    "e.g. a numpy array with torch.from_numpy, an object with its state_dict())")


def _digest(value: Any) -> str:
    """SHA-256 of a plain-data tree: types, keys, shapes, dtypes and the bytes of every tensor."""
    h = hashlib.sha256()

    def walk(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(v, dict):
            h.update(f"D{len(v)}|".encode())
            for k, item in v.items():
                h.update(f"{type(k).__name__}:{k!r}=".encode())
                walk(item)
        elif isinstance(v, (list, tuple)):
            h.update(f"{'L' if isinstance(v, list) else 'U'}{len(v)}|".encode())
            for item in v:
                walk(item)
        elif isinstance(v, float):
            h.update(b"F" + struct.pack("<d", v))
        elif isinstance(v, bytes):
            h.update(f"B{len(v)}|".encode() + v)
        else:
            h.update(f"{type(v).__name__}:{v!r}|".encode())

    walk(value)
    return h.hexdigest()


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o777  # keep the permissions of the file being replaced
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def save_checkpoint(path: str | os.PathLike, **state: Any) -> None:
    """Write ``state`` (plain tensors, dicts, lists, tuples, strings, numbers) to ``path`` atomically.

    The file is written next to ``path`` under a temporary name, flushed and fsync'ed, then renamed over ``path``:
    readers see either the previous file or the complete new one, also after a crash or a kill. Raises TypeError
    (before writing anything) for values that ``load_checkpoint`` could not read back without unpickling objects.
    """
    path = os.fspath(path)
    for key, value in state.items():
        _check_plain(value, repr(key))
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "sha256": _digest(state), "state": state}
    atomic_write(path, lambda f: torch.save(payload, f))


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    Readers see the previous file or the complete new one, also after a crash or a kill; on an error the temporary
    file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


# ---------------------------------------------------------------------------------------------------- reading
def _damaged(path: str, detail: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path!r} is truncated or corrupted and cannot be loaded ({detail}). It was probably cut short "
        "by a full disk or a copy that did not finish, or damaged in storage; if you keep rotating checkpoints, "
        "load the previous one instead."
    )


def unshared_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, detached and contiguous, with each one that shares storage with an earlier one cloned:
    safetensors refuses tensors that share memory (tied weights), and a tied pair loads back as two equal entries
    (copied into the one tied parameter twice)."""
    seen, out = set(), {}
    for k, t in tensors.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.device)
        out[k] = t.clone().contiguous() if key in seen else t.contiguous()
        seen.add(key)
    return out


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike):
    """``safetensors.safe_open(path, framework="pt")``, where a damaged or foreign file (its header, or a tensor
    read in the block) raises :class:`CheckpointError` naming the file instead of safetensors' own error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except Exception as e:  # safetensors' error class is not part of its public API: matched by name
        if type(e).__name__ != "SafetensorError":
            raise
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e}): it is damaged or truncated, "
                              "or not a safetensors file at all; write it again, or give another file") from None


def _numeric_numpy_globals() -> list:
    """The pickle globals of a numeric numpy array (no object arrays), for reading legacy files."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    kinds = ("Bool", "Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Long", "ULong",
             "LongLong", "ULongLong", "Float16", "Float32", "Float64", "Complex64", "Complex128")
    dtypes = getattr(np, "dtypes", None)
    classes = [getattr(dtypes, f"{k}DType") for k in kinds if dtypes is not None and hasattr(dtypes, f"{k}DType")]
    return [(reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, *classes]


def _unsafe(path: str, error: Exception) -> UnsafeCheckpointError:
    first = str(error).strip().splitlines()
    detail = next((line for line in first if "global" in line.lower() or "build" in line.lower()),
                  first[0] if first else "")
    return UnsafeCheckpointError(
        f"refusing to load checkpoint {path!r}: it contains pickled objects that are not plain data "
        f"({detail.strip()[:300]}). Such a file can run arbitrary code when unpickled, so nothing in it "
        "was executed. It was not written by torch_sttp.checkpoint.save_checkpoint — or it is corrupted; "
        "if you keep rotating checkpoints, load the previous one instead."
    )


def _read(path: str, map_location, legacy: bool) -> Any:
    """``torch.load(path, weights_only=True)`` (numeric numpy arrays admitted when ``legacy``), errors classified."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
        if head != _ZIP_MAGIC and _ZIP_MAGIC.startswith(head):  # save_checkpoint writes zip archives
            raise _damaged(path, f"the file is only {len(head)} bytes long")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numeric_numpy_globals() if legacy else []):
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")  # a damaged protocol byte warns first
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e).lower() or "weights only" in str(e).lower():
            raise _unsafe(path, e) from None
        raise _damaged(path, f"{type(e).__name__}: {e}") from None
    except (OSError, MemoryError) as e:
        if isinstance(e, (PermissionError, IsADirectoryError)):
            raise
        raise _damaged(path, f"{type(e).__name__}: {e}") from None
    except Exception as e:  # zip reader errors, EOFError, UnicodeDecodeError, ValueError, … from a damaged archive
        raise _damaged(path, f"{type(e).__name__}: {str(e).strip()[:300]}") from None


def load_checkpoint(path: str | os.PathLike, map_location=None, legacy: bool = False) -> dict[str, Any]:
    """The state saved by :func:`save_checkpoint` at ``path`` (a dict of the keyword arguments it was given).

    Reads with ``torch.load(..., weights_only=True)``: nothing in the file is executed. Raises
    :class:`UnsafeCheckpointError` for a file with pickled objects other than plain data (refused unread),
    :class:`CheckpointError` for a truncated or corrupted file (its integrity digest does not match), and
    FileNotFoundError for a missing one. With ``legacy``, a file without the header (a plain ``torch.save`` of a
    dict of plain data and numeric numpy arrays, as the recipes wrote before this format) is returned as it is:
    it was read by the same weights-only unpickler, but it carries no digest to verify.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    payload = _read(path, map_location, legacy)
    if legacy and isinstance(payload, dict) and "format" not in payload:
        return payload
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise _damaged(path, "no torch_sttp checkpoint header; a file not written by save_checkpoint, or a "
                             "damaged header")
    if not isinstance(payload.get("version"), int) or payload["version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {payload.get('version')!r}, newer than this "
                              f"torch_sttp reads ({FORMAT_VERSION}); upgrade torch_sttp to load it")
    state = payload.get("state")
    if not isinstance(state, dict) or payload.get("sha256") != _digest(state):
        raise _damaged(path, "its contents do not match the SHA-256 digest recorded when it was written")
    return state


# ------------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy (legacy global) and python ``random`` generator states, as plain data."""
    version, mt, gauss_next = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return out
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return out


def _python_state(py) -> tuple:
    """``random.setstate``'s argument from :func:`rng_state`'s entry, or from ``random.getstate()`` itself."""
    if isinstance(py, Mapping):
        return int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]
    version, mt, gauss_next = py
    return int(version), tuple(int(v) for v in mt), gauss_next


def _numpy_state(st) -> tuple:
    """``np.random.set_state``'s argument from :func:`rng_state`'s entry, the ``{"key", "state", …}`` form of the
    classification recipe's old checkpoints, or ``np.random.get_state()`` itself (the GAN recipe's)."""
    import numpy as np

    if isinstance(st, Mapping):
        kind, keys = (st["kind"], st["keys"]) if "kind" in st else (st["key"], st["state"])
        pos, has_gauss, cached = st["pos"], st["has_gauss"], st["cached_gaussian"]
    else:
        kind, keys, pos, has_gauss, cached = st
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    return str(kind), keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generator states captured by :func:`rng_state` (entries that are absent are left alone).

    The entries of older recipe checkpoints (python's and numpy's states as their own ``getstate`` tuples) are
    accepted too.
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu().to(torch.uint8) for t in state["cuda"]])
    if "python" in state:
        random.setstate(_python_state(state["python"]))
    if "numpy" in state:
        import numpy as np

        np.random.set_state(_numpy_state(state["numpy"]))


# --------------------------------------------------------------------------------------------- training state
@dataclass
class TrainingState:
    """What :func:`load_training_state` returns besides restoring the model, the optimizer and the RNGs."""

    step: int
    extra: Any = None


def save_training_state(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                        step: int, rng: bool = True, extra: Any = None) -> None:
    """Atomically save ``model``'s and ``optimizer``'s state dicts, ``step``, the RNG states (``rng``) and
    ``extra`` (plain data) to ``path``; :func:`load_training_state` then continues bit for bit on CPU."""
    state: dict[str, Any] = {
        "kind": "training_state",
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra,
    }
    if rng:
        state["rng"] = rng_state()
    save_checkpoint(path, **state)


def load_training_state(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                        map_location=None, strict: bool = True, restore_rng: bool = True) -> TrainingState:
    """Load a file written by :func:`save_training_state` into ``model`` and ``optimizer`` (in place) and restore
    the RNG states; returns the saved step and ``extra``. Raises :class:`CheckpointError` for a damaged file."""
    state = load_checkpoint(path, map_location=map_location)
    if state.get("kind") != "training_state" or "model" not in state:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is not a training state (it was written by "
                              "save_checkpoint, not save_training_state); use load_checkpoint to read it")
    model.load_state_dict(state["model"], strict=strict)
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {os.fspath(path)!r} holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if restore_rng and state.get("rng") is not None:
        set_rng_state(state["rng"])
    return TrainingState(step=int(state["step"]), extra=state.get("extra"))
