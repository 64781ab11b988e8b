"""The recipe runner: what the training recipes (:mod:`.classify`, :mod:`.gan`) share around their own steps.

A recipe is a sequence of named steps (build, restore, train steps, evaluation, checkpoint, summary) over one run
folder. This module owns everything in it that is not particular to one recipe:

* **settings** — :func:`resolve_settings`: the recipe's defaults < a YAML/JSON file (``--config``) < flags or keyword
  arguments, unknown names refused (the keys the ``sttp`` CLI adds to its namespace are not settings); the
  ``check_*`` functions validate one setting each before any work starts, with a message naming the flag and the
  config key (ranks with :func:`torch_sttp.options.check_rank`, the API's message); :func:`check_resumable`
  compares the settings of a run with those its checkpoint was written with;
* **the run folder** — :class:`MetricsLog` (``metrics.csv``: a fixed header, rows appended as the run goes, rows
  logged after the last checkpoint dropped on resume) and :func:`write_text` (atomic, folder created);
* **checkpoints** — :func:`save_state` / :func:`load_state` through :mod:`torch_sttp.checkpoint`: written atomically
  with a SHA-256 digest, read with ``torch.load(weights_only=True)``, the torch/numpy/python RNG states captured by
  :func:`torch_sttp.checkpoint.rng_state` and restored by :func:`torch_sttp.checkpoint.set_rng_state`. Files that the
  recipes wrote before this format (no header) are read as well, by the same weights-only unpickler, so a planted
  file with pickled code is refused without running it;
* **the machine** — :func:`select_device` and :func:`num_threads`; :func:`explain_missing_data` turns a data set whose
  files are missing into one message saying where to put them;
* **the loop** — :func:`mix_seed` and :func:`epoch_order` (the data stream as a fixed function of seed, epoch
  and step, so a resumed run needs no saved data state), :func:`lr_factor` (the schedules), :func:`train_loop`
  (steps, log rows, checkpoints, the progress bar, stop requests) over a recipe's run object;
* **the loop's edges** — :class:`StopRequest` (SIGINT/SIGTERM become "stop after this step"),
  :func:`progress_bar`, and :class:`RunSummary`, what a recipe returns.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import operator
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .. import checkpoint
from ..options import check_rank

__all__ = [
    "CLI_KEYS",
    "RUN_DEFAULTS",
    "RUN_RESUMABLE",
    "USER_ERRORS",
    "one_line",
    "RunSummary",
    "rank_literal",
    "check_integer",
    "check_number",
    "check_rank_setting",
    "check_choice",
    "check_bool",
    "check_device",
    "explain_missing_data",
    "read_config_file",
    "given_settings",
    "check_known",
    "resolve_settings",
    "check_resumable",
    "jsonable",
    "MetricsLog",
    "write_text",
    "save_state",
    "load_state",
    "select_device",
    "num_threads",
    "StopRequest",
    "progress_bar",
    "mix_seed",
    "epoch_order",
    "lr_factor",
    "train_loop",
    "steps_or_epochs",
    "RecipeRun",
    "add_run_arguments",
    "add_length_arguments",
    "check_length",
    "recipe_main",
]

#: Names the ``sttp`` command line adds to a recipe's namespace (sub-command names, the handler, --debug): not settings.
CLI_KEYS = ("func", "command", "recipe", "cmd", "subcommand", "debug")

#: The settings of a step-based recipe's run (:func:`add_run_arguments`, :class:`RecipeRun`) and their defaults.
RUN_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "threads": None,
    "out": None,
    "eval_every": None,  # None: once per epoch
    "checkpoint_every": None,  # None: once per epoch
    "resume": True,
    "stop_at": None,
    "progress": True,
}

#: The settings that may differ between a checkpoint and the run resuming it, in every step-based recipe.
RUN_RESUMABLE = frozenset({"steps", "epochs", "device", "threads", "out", "eval_every", "checkpoint_every", "resume",
                           "stop_at", "progress", "eval_batch"})

#: Exceptions that mean "the arguments are wrong" (a bad value, a missing file, settings that do not fit, a refused
#: checkpoint, a missing optional package): a command line reports them in one line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, checkpoint.CheckpointError, ImportError)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line."""
    return " ".join(str(error).split()) or type(error).__name__


# ----------------------------------------------------------------------------------------------------------- settings
def _normalized(settings: Mapping) -> dict:
    return {str(k).replace("-", "_"): v for k, v in settings.items()}


def read_config_file(path, known: Iterable[str] | None = None) -> dict:
    """Settings from a ``.yaml``/``.yml`` or ``.json`` file holding a mapping (``-`` in keys read as ``_``).

    With ``known``, names outside it (other than ``_``-prefixed ones) raise ValueError naming them.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist; check the path given to --config")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - pyyaml is in the experiments extra
            raise ImportError("reading a YAML config needs pyyaml (pip install pyyaml), or use a .json file") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    data = _normalized(data)
    if known is not None:
        check_known(data, known, f"config file {path}")
    return data


def given_settings(args=None, overrides: Mapping | None = None) -> dict:
    """The settings given to a recipe: a namespace or mapping ``args`` updated by ``overrides``, ``-`` read as
    ``_``, without the keys the command line adds (:data:`CLI_KEYS`)."""
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    given.update(overrides or {})
    given = _normalized(given)
    for key in CLI_KEYS:
        given.pop(key, None)
    return given


def check_known(settings: Mapping, known: Iterable[str], where: str) -> None:
    """Raise ValueError for names in ``settings`` that are not in ``known`` (``_``-prefixed names are private)."""
    known = set(known)
    unknown = sorted(k for k in set(settings) - known if not str(k).startswith("_"))
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}; valid: {sorted(known)}")


def _update(cfg: dict, layer: Mapping) -> None:
    cfg.update(layer)


def resolve_settings(defaults: Mapping, args=None, overrides: Mapping | None = None, where: str = "settings",
                     apply: Callable[[dict, Mapping], None] = _update) -> tuple[dict, str | None]:
    """``(settings, config file)``: ``defaults`` < the ``config`` file named in ``args``/``overrides`` < the other
    given settings. ``apply(cfg, layer)`` puts one layer on top (default ``dict.update``); unknown names raise."""
    given = given_settings(args, overrides)
    path = given.pop("config", None)
    check_known(given, defaults, where)
    cfg = dict(defaults)
    if path:
        apply(cfg, read_config_file(path, known=defaults))
    apply(cfg, given)
    return cfg, (str(path) if path else None)


def steps_or_epochs(cfg: dict, settings: Mapping) -> None:
    """Put one layer of settings on top of ``cfg`` (an ``apply`` of :func:`resolve_settings`): a layer that sets
    ``steps`` clears ``epochs`` and the other way round; both in one layer raise ValueError."""
    settings = dict(settings)
    if settings.get("steps") is not None and settings.get("epochs") is not None:
        raise ValueError("give either steps or epochs, not both")
    if settings.get("steps") is not None:
        cfg["epochs"] = None
    if settings.get("epochs") is not None:
        cfg["steps"] = None
    cfg.update(settings)


def _names(key: str) -> str:
    return f"(flag --{key.replace('_', '-')}, config key {key})"


def rank_literal(text: str):
    """A command-line rank: an integer literal as an int, anything else as it is written (a float for ``2.5``,
    ``4.0``), for :func:`torch_sttp.options.check_rank` to accept or refuse with the API's message."""
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def check_integer(cfg: dict, key: str, minimum: int | None = None, optional: bool = False) -> None:
    """``cfg[key]`` must be an integer (``operator.index``: 2.5 and 4.0 are refused, never truncated) ≥ ``minimum``
    (None allowed when ``optional``)."""
    value = cfg[key]
    if value is None and optional:
        return
    bound = f" ≥ {minimum}" if minimum is not None else ""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{key} must be an integer{bound}, got {value!r} {_names(key)}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{key} must be an integer{bound}, got {value!r} {_names(key)}")
    cfg[key] = number


def check_number(cfg: dict, key: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """``cfg[key]`` must be a finite number in the interval from ``low`` to ``high`` (open ends where asked); a
    numeric string (YAML reads ``1e-4`` as one) is read as a float."""
    value = cfg[key]
    if value is None and optional:
        return
    if high is None:
        interval = "" if low is None else f"{'>' if low_open else '≥'} {low:g}"
    else:
        interval = (f"in {'(' if low_open else '['}{'-inf' if low is None else f'{low:g}'}, {high:g}"
                    f"{')' if high_open else ']'}")
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = float(value)
    except ValueError:
        raise ValueError(f"{key} must be a number {interval}, got {value!r} {_names(key)}") from None
    inside = math.isfinite(number) and (low is None or (number > low if low_open else number >= low)) \
        and (high is None or (number < high if high_open else number <= high))
    if not inside:
        raise ValueError(f"{key} must be a number {interval}, got {value!r} {_names(key)}")
    cfg[key] = number


def check_length(cfg: dict) -> None:
    """A run's length: ``steps`` (an integer ≥ 1) or ``epochs`` (a number > 0), at least one of them given."""
    if cfg["steps"] is None and cfg["epochs"] is None:
        raise ValueError("give steps or epochs (flag --steps N or --epochs E)")
    check_integer(cfg, "steps", 1, optional=True)
    check_number(cfg, "epochs", 0, low_open=True, optional=True)


def check_rank_setting(cfg: dict, key: str) -> None:
    """``cfg[key]`` must be a rank: :func:`torch_sttp.options.check_rank`, with its message."""
    try:
        cfg[key] = check_rank(cfg[key])
    except ValueError as e:
        raise ValueError(str(e) if key == "rank" else f"{key}: {e} {_names(key)}") from None


def check_choice(cfg: dict, key: str, choices: Sequence) -> None:
    """``cfg[key]`` must be one of ``choices``."""
    if cfg[key] not in choices:
        raise ValueError(f"{key} must be one of {tuple(choices)}, got {cfg[key]!r} {_names(key)}")


def check_bool(cfg: dict, key: str) -> None:
    """``cfg[key]`` must be true or false."""
    if not isinstance(cfg[key], bool):
        raise ValueError(f"{key} must be true or false, got {cfg[key]!r} (config key {key})")


def check_device(cfg: dict, key: str = "device") -> None:
    """``cfg[key]`` must name a device this machine has (:func:`select_device`)."""
    if not isinstance(cfg[key], str):
        raise ValueError(f"{key} must be cpu, cuda, cuda:N or auto, got {cfg[key]!r} {_names(key)}")
    select_device(cfg[key])


def jsonable(cfg: Mapping) -> dict:
    """``cfg`` with tuples as lists: the form it has after a JSON/YAML or checkpoint round trip."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def check_resumable(saved: Mapping, cfg: Mapping, keys: Iterable[str], path) -> None:
    """Raise ValueError if a setting in ``keys`` differs between a checkpoint's ``saved`` settings and ``cfg``."""
    now = jsonable(cfg)
    diffs = [k for k in keys if saved.get(k) != now.get(k)]
    if diffs:
        detail = ", ".join(f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in diffs)
        raise ValueError(f"{path} was written with different settings ({detail}); use another --out, "
                         "--no-resume to start over, or the checkpoint's settings")


def add_run_arguments(parser: argparse.ArgumentParser, defaults: Mapping, recipe: str, seed_help: str):
    """Add the ``run`` option group every step-based recipe has (``--config``, ``--out``, ``--seed``, ``--device``,
    ``--threads``, ``--resume``, ``--stop-at``, ``--progress``, ``--eval-every``, ``--checkpoint-every``), each
    absent from the namespace unless given; returns the group (for a recipe's own run options)."""
    S = argparse.SUPPRESS

    def default(text: str, key: str) -> str:
        return f"{text} (default: {defaults[key]!r})"

    g = parser.add_argument_group("run")
    g.add_argument("--config", default=S, metavar="FILE", help="YAML or JSON file of settings; flags override it")
    g.add_argument("--out", default=S, metavar="DIR", help=f"output folder (default: runs/{recipe}/<name>)")
    g.add_argument("--seed", type=int, default=S, help=default(seed_help, "seed"))
    g.add_argument("--device", default=S, help=default("cpu, cuda, cuda:N or auto", "device"))
    g.add_argument("--threads", type=int, default=S, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=S,
                   help=default("continue from <out>/checkpoint.pt when present", "resume"))
    g.add_argument("--stop-at", type=int, default=S, metavar="STEP",
                   help="stop (checkpointed, resumable) once this global step is reached")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=S,
                   help=default("tqdm bar", "progress"))
    g.add_argument("--eval-every", type=int, default=S, metavar="STEPS", help="evaluate/log every N steps "
                   "(default: once per epoch)")
    g.add_argument("--checkpoint-every", type=int, default=S, metavar="STEPS", help="checkpoint every N steps "
                   "(default: once per epoch)")
    return g


def add_length_arguments(parser: argparse.ArgumentParser, defaults: Mapping, batch_help: str):
    """Add the ``optimization`` option group with a run's length and batch sizes (``--steps``, ``--epochs``,
    ``--batch``, ``--eval-batch``); returns the group, for the recipe's optimizer options."""
    S = argparse.SUPPRESS
    g = parser.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=S, help="optimizer steps (overrides epochs)")
    g.add_argument("--epochs", type=float, default=S,
                   help=f"epochs, if steps is not given (default: {defaults['epochs']!r})")
    g.add_argument("--batch", type=int, default=S, help=batch_help)
    g.add_argument("--eval-batch", type=int, default=S,
                   help=f"evaluation batch size (default: {defaults['eval_batch']!r})")
    return g


# --------------------------------------------------------------------------------------------------------- run folder
def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`torch_sttp.checkpoint.atomic_write`), creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(path, lambda f: f.write(text.encode()))


class MetricsLog:
    """``metrics.csv`` of a run: a fixed header (``columns``), one row per call of :meth:`append`.

    Floats are written with ``repr`` (every digit), strings as given, missing columns empty. :meth:`start` rewrites
    the file atomically with the rows up to a checkpoint's step, so a resumed run drops the rows that the
    interrupted run logged after its last checkpoint.
    """

    def __init__(self, path, columns: Sequence[str], lineterminator: str = "\n"):
        self.path = Path(path)
        self.columns = tuple(columns)
        self.lineterminator = lineterminator

    def rows(self) -> list[dict]:
        """The rows logged so far (strings, as read back by :class:`csv.DictReader`)."""
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def start(self, keep_until: int | None) -> list[dict]:
        """Rewrite the file with its rows whose step is ``<= keep_until`` (none for a fresh run); returns them."""
        kept = [r for r in self.rows() if r.get("step") and int(r["step"]) <= keep_until] \
            if keep_until is not None else []
        buf = io.StringIO()
        writer = self._writer(buf)
        writer.writeheader()
        for row in kept:
            writer.writerow(row)
        write_text(self.path, buf.getvalue())
        return kept

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one row (written and flushed at once)."""
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            writer = self._writer(f)
            if new:
                writer.writeheader()
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
            f.flush()

    def _writer(self, f) -> csv.DictWriter:
        return csv.DictWriter(f, fieldnames=self.columns, restval="", extrasaction="ignore",
                              lineterminator=self.lineterminator)


# -------------------------------------------------------------------------------------------------------- checkpoints
def save_state(path, **state: Any) -> None:
    """Save a run's ``state`` (plain data: tensors, state_dicts, numbers, strings) and the RNG states to ``path``,
    atomically and checksummed (:func:`torch_sttp.checkpoint.save_checkpoint`)."""
    checkpoint.save_checkpoint(path, **state, rng=checkpoint.rng_state())


def load_state(path, restore_rng: bool = False) -> dict:
    """The state saved by :func:`save_state` at ``path`` (on the CPU), or that of a recipe checkpoint written before
    this format; raises :class:`torch_sttp.checkpoint.UnsafeCheckpointError` for a file with pickled objects,
    without running them. ``restore_rng`` also restores the RNG states saved with it."""
    state = checkpoint.load_checkpoint(path, map_location="cpu", legacy=True)
    if restore_rng and state.get("rng") is not None:
        checkpoint.set_rng_state(state["rng"])
    return state


# ------------------------------------------------------------------------------------------------------------ machine
def select_device(name: str) -> torch.device:
    """``torch.device(name)``; ``"auto"`` is CUDA when available, else the CPU. An unknown device, or a CUDA device
    without CUDA, raises ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use --device cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


@contextmanager
def explain_missing_data(name: str, root):
    """Re-raise a :class:`~torch_sttp.experiments.data.DatasetFilesNotFoundError` of data set ``name`` as one that
    says where the files were looked for and how to point the recipe at them."""
    from .data import DatasetFilesNotFoundError

    try:
        yield
    except DatasetFilesNotFoundError as e:
        where = root or os.environ.get("TORCH_STTP_DATA") or "./data"
        raise DatasetFilesNotFoundError(
            f"dataset {name!r} is not available locally (looked under {str(where)!r}). Put the files there, or "
            f"point --data-root (config key data_root, or $TORCH_STTP_DATA) at the folder that holds them. "
            f"Details: {e}", getattr(e, "filename", None)) from None


@contextmanager
def num_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (torch's choice when ``n`` is None or 0), then restore."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------------- loop edges
class StopRequest:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (main thread only); a second SIGINT
    aborts at once. ``requested`` is the signal's name once one arrived."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # pragma: no cover - e.g. embedded interpreters
                    pass
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: stopping after this step with a checkpoint (SIGINT again aborts)", file=sys.stderr)

    def __exit__(self, *exc) -> bool:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def progress_bar(enabled: bool, total: int, initial: int, desc: str, **kwargs):
    """A tqdm bar over steps ``initial..total``, or None when not ``enabled``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, **kwargs)


class RunSummary(dict):
    """What a recipe returns: its summary as a dict (also written to ``summary.json``); ``int(summary)`` is the
    exit status. ``trained_steps`` (steps trained by this call: 0 for a run that was already complete) and
    ``total_steps`` are attributes, not items, so they stay out of ``summary.json``."""

    trained_steps: int = 0
    total_steps: int = 0

    def __int__(self) -> int:
        return int(self.get("exit_code", 0))

    def set_exit_code(self, signal_name: str | None) -> None:
        """``exit_code`` from ``status``: 130 for a run stopped by a signal, 1 for a diverged one, else none."""
        if self["status"] == "interrupted":
            self["exit_code"] = 130 if signal_name else 0
        elif self["status"] == "diverged":
            self["exit_code"] = 1

    def head(self) -> str:
        """How the run ended, for a summary line: "complete after 5/5 steps", "already complete (…)",
        "interrupted after 3/5 steps (checkpointed; …)" (the steps from ``self["steps"]``)."""
        steps = f"{self['steps']}/{self.total_steps} steps"
        if self["status"] == "complete" and self.trained_steps == 0:
            return f"already complete ({steps}; nothing left to train)"
        if self["status"] == "interrupted":
            return f"interrupted after {steps} (checkpointed; run the same command again to resume)"
        return f"{self['status']} after {steps}"



# -------------------------------------------------------------------------------------------------------- the loop
def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), for per-epoch / per-step generators."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The sample order (a permutation of ``n``) of epoch ``epoch``: a fixed function of (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, 1, epoch)))


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor of step s (for ``LambdaLR``): (s+1)/warmup during ``warmup`` steps, then 1
    (``constant``), 1 − t (``linear``) or (1 + cos πt)/2 (``cosine``), t = (s − warmup)/(total − warmup),
    at most 1."""
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        span = max(1, total - warmup)
        t = min(1.0, (step - warmup) / span)
        return 1.0 - t if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return factor


class RecipeRun:
    """What a recipe's run object shares (subclassed by each recipe's run): the step plan, starting or resuming in
    the run folder, and the training clock. A subclass sets ``cfg``, ``out``, ``ckpt_path``, ``summary_path`` and
    ``log`` (a :class:`MetricsLog`) and defines ``restore(state)``, ``save()``, ``train_step()`` and ``log_row()``
    (for :func:`train_loop`)."""

    def plan_steps(self, n_train: int, batch: int) -> None:
        """``batch`` (≤ n_train), ``steps_per_epoch`` (the last incomplete batch dropped), ``total`` (``steps``, or
        ``epochs`` × steps per epoch), ``eval_every`` / ``ckpt_every`` (default once per epoch) and ``stop_at``."""
        cfg = self.cfg
        self.batch = min(int(batch), n_train)
        self.steps_per_epoch = max(1, n_train // self.batch)
        self.total = int(cfg["steps"]) if cfg["steps"] is not None else \
            max(1, round(float(cfg["epochs"]) * self.steps_per_epoch))
        self.eval_every = int(cfg["eval_every"] or self.steps_per_epoch)
        self.ckpt_every = int(cfg["checkpoint_every"] or self.steps_per_epoch)
        self.stop_at = min(self.total, int(cfg["stop_at"])) if cfg["stop_at"] is not None else self.total

    def restore_training(self, state: dict) -> None:
        """Load the model, optimizer and schedule states, the counters (``step``, ``elapsed``, ``window``) and the
        RNG states of a checkpoint; drop the log rows written after it (``last_row``: the last one kept)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.elapsed, self.window = int(state["step"]), float(state["elapsed"]), dict(state["window"])
        checkpoint.set_rng_state(state["rng"])
        rows = self.log.start(keep_until=self.step)  # rows logged after the checkpoint belong to the lost part
        self.last_row = rows[-1] if rows else {}

    def count_step(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """Count one finished optimizer step: ``step`` + 1, and the batch's loss and correct predictions (logits
        (B, C), labels (B,)) added to ``window`` (the metrics since the last log row); returns the loss."""
        self.step += 1
        w = self.window
        w["loss"] += float(loss.detach())
        w["correct"] += int((logits.detach().argmax(1) == labels).sum())
        w["seen"] += int(labels.shape[0])
        w["batches"] += 1
        return float(loss.detach())

    def start(self) -> None:
        """Continue from the run folder's checkpoint when there is one (and ``resume``), else start over; write
        ``config.json``."""
        if self.cfg["resume"] and self.ckpt_path.is_file():
            self.restore(load_state(self.ckpt_path))
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log.start(keep_until=None)
            if self.summary_path.exists():
                self.summary_path.unlink()
        write_text(self.out / "config.json", json.dumps(jsonable(self.cfg), indent=2) + "\n")

    def tick(self) -> None:
        """Count the time since the last tick as training time (``elapsed``)."""
        now = time.perf_counter()
        self.elapsed += now - self._t0
        self._t0 = now

    def skip_time(self) -> None:
        """Leave the time since the last tick out (writing a checkpoint is not counted)."""
        self._t0 = time.perf_counter()


def train_loop(run, desc: str, metric: str = "test_acc") -> tuple[str, str | None]:
    """Train ``run`` until ``run.stop_at``: a step (``run.train_step()``, its loss), a log row (``run.log_row()``)
    every ``run.eval_every`` steps and at ``run.total``, a checkpoint (``run.save()``) every ``run.ckpt_every``, at
    the end and when stopping (a signal, ``stop_at``, a non-finite loss). ``run.tick()`` counts time as training,
    ``run.skip_time()`` leaves it out; the bar (``run.cfg["progress"]``) shows the loss and ``metric`` of the last
    row (as ``acc``). Returns (status: complete, interrupted or diverged; the signal that stopped it or None)."""
    bar = progress_bar(bool(run.cfg["progress"]) and run.step < run.stop_at, run.stop_at, run.step, desc, leave=True)
    run.model.train()
    status = "complete"
    with StopRequest() as stop:
        run.skip_time()
        while run.step < run.stop_at:
            loss = run.train_step()
            if not math.isfinite(loss):
                status = "diverged"
            run.tick()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", acc=(run.last_row.get(metric) or "-")[:6])
            stopping = stop.requested is not None or run.step == run.stop_at or status == "diverged"
            if run.step % run.eval_every == 0 or run.step == run.total:
                run.log_row()
                run.tick()
            if run.step % run.ckpt_every == 0 or run.step == run.total or stopping:
                run.save()
                run.skip_time()
            if stopping:
                break
    if bar is not None:
        bar.close()
    if status == "complete" and run.step < run.total:
        status = "interrupted"
    return status, stop.requested


def recipe_main(argv, prog: str, description: str, add_arguments: Callable, run: Callable,
                line: Callable[[RunSummary], str], epilog: str | None = None,
                exit_code: Callable[[RunSummary], int] = int) -> int:
    """``python -m <recipe>``: parse ``argv`` with the recipe's ``add_arguments``, ``run`` it, print ``line(summary)``
    and return ``exit_code(summary)``; a user error (:data:`USER_ERRORS`) is one line ``<prog>: error: …``, status
    2. ``epilog``: text after the options in ``--help``."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        summary = run(args)
    except USER_ERRORS as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(line(summary))
    return exit_code(summary)
