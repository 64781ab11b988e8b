"""Command-line handlers for compressing a trained model and exporting the result (``sttp compress``/``sttp export``).

The handlers take an ``argparse.Namespace``; :func:`add_compress_arguments` / :func:`add_export_arguments` add the
matching options to a (sub)parser.

Checkpoints are written without pickled code: ``.safetensors`` (needs the ``safetensors`` package; the
parametrizations' settings and the rank plan go into the file's metadata) or a ``torch.save`` file of plain tensors
and JSON-like values that ``torch.load(..., weights_only=True)`` reads. A compressed checkpoint is rebuilt by
converting a fresh copy of the model with the plan it records and loading the state into it
(:func:`build_compressed`).

Models come from ``--model minilm`` (the packaged all-MiniLM-L6-v2) or from a state_dict file plus
``--constructor package.module:callable`` (called with ``--constructor-kwargs`` JSON to build the empty model). A file
holding a whole pickled ``nn.Module`` is only read with ``--trust-pickle``, since unpickling runs arbitrary code.

Data-aware compression (``--calibration``, :func:`calibration_statistics`): each layer is projected to minimise
its output error on calibration data, ‖(W − Ŵ)·X‖_F, and (with the default ``--strategy auto --objective svd``)
the ranks are allocated by the whitened truncation loss per DOF (``select_ranks(calibration=...)``).
``--calibration`` is a saved :class:`~torch_sttp.calibration.Calibration` (``.safetensors``, written by
``torch_sttp.calibrate(...).save(path)`` on the same model: used as it is), or, for ``--model minilm``, a text file
of sentences (one per line, blank lines skipped) or the word ``default`` (the MiniLM study's distillation
sentences, never its evaluation ones). ``--calibration-samples N`` uses the first N sentences (default 256).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..calibration import Calibration, calibrate
from ..checkpoint import load_checkpoint as read_plain_file, open_safetensors, unshared_tensors
from ..export import to_dense, to_factorized
from ..options import RANK_METHODS
from ..ranks import RankPlan, project, projection_errors, select_ranks
from ..report import count_state_values, report as model_report
from ..surgery import convert, skipped_layers

__all__ = [
    "FORMATS",
    "parse_budget",
    "load_model",
    "save_compressed",
    "load_checkpoint",
    "build_compressed",
    "DEFAULT_CALIBRATION_SAMPLES",
    "check_calibration_args",
    "calibration_statistics",
    "compress",
    "cli_compress",
    "cli_export",
    "add_compress_arguments",
    "add_export_arguments",
]

FORMATS = ("spectral", "factorized", "dense")
META_KEY = "torch_sttp"
DEFAULT_CALIBRATION_SAMPLES = 256


# --------------------------------------------------------------------------------------------------- inputs
def parse_budget(text) -> float | int:
    """"0.3" → 0.3 (a fraction in (0, 1]), "150000" or "1e5" → 150000 (a DOF count ≥ 2), "1" → 1.0 (the whole
    dense count, as the help's "(0, 1]" reads; one DOF is never a budget); numbers pass through.

    Anything else ("0", "1.5", "abc") raises ValueError saying what a budget can be.
    """
    if isinstance(text, bool):
        value = text
    elif isinstance(text, (int, float)):
        value = text
    else:
        s = str(text).strip()
        try:
            value = int(s) if s.isdigit() else float(s)
        except ValueError:
            value = s
        if isinstance(value, float) and value.is_integer() and value > 1:
            value = int(value)
        if value == 1:
            value = 1.0
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return value
    raise ValueError(f"budget {text!r} is neither a fraction in (0, 1] of the dense parameters (e.g. --budget 0.3) "
                     "nor a whole DOF count ≥ 2 (e.g. --budget 150000)")


def _import_callable(spec: str):
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"--constructor must look like package.module:callable, got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--constructor {spec!r}: cannot import module {module_name!r} ({e}); give an importable "
                         "package.module:callable") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--constructor {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--constructor {spec!r} is not callable")
    return obj


def _constructor_kwargs(text: str | None) -> dict:
    """The JSON object of ``--constructor-kwargs`` (empty when not given)."""
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--constructor-kwargs is not valid JSON ({e}); give an object, e.g. "
                         "'{\"in_features\": 3, \"out_features\": 2}'") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--constructor-kwargs must be a JSON object of keyword arguments, got {text!r}")
    return kwargs


def _build_empty(constructor: str, kwargs: dict) -> nn.Module:
    """``constructor(**kwargs)``, which must be an nn.Module; a call that does not fit the kwargs is a ValueError."""
    make = _import_callable(constructor)
    try:
        module = make(**kwargs)
    except TypeError as e:
        raise ValueError(f"--constructor {constructor} with --constructor-kwargs {json.dumps(kwargs)}: {e}") from None
    if not isinstance(module, nn.Module):
        raise ValueError(f"{constructor} returned a {type(module).__name__}, not an nn.Module")
    return module


def _read_state(path: Path) -> tuple[dict, dict]:
    """(state_dict, metadata) of a safetensors or weights_only torch file."""
    if path.suffix == ".safetensors":
        state = {}
        with open_safetensors(path) as f:  # a damaged file: CheckpointError
            meta = f.metadata() or {}
            for k in f.keys():
                state[k] = f.get_tensor(k)
        info = json.loads(meta[META_KEY]) if META_KEY in meta else {}
        for k, v in info.pop("extra_state", {}).items():
            state[k] = v
        return state, info
    obj = read_plain_file(path, map_location="cpu", legacy=True)  # weights_only; a damaged file: CheckpointError
    if isinstance(obj, Mapping) and "state_dict" in obj:
        return dict(obj["state_dict"]), dict(obj.get(META_KEY, {}))
    if isinstance(obj, Mapping):
        return dict(obj), {}
    raise ValueError(f"{path} does not hold a state_dict")


def load_model(model: str, constructor: str | None = None, constructor_kwargs: str | None = None,
               trust_pickle: bool = False) -> tuple[nn.Module, dict]:
    """The dense model to work on, and a description of where it came from.

    ``model`` is ``"minilm"`` or a path: with ``constructor`` the path is a state_dict (safetensors or torch) loaded
    into ``constructor(**json.loads(constructor_kwargs))``; without, a whole pickled module, read only when
    ``trust_pickle``.
    """
    if model == "minilm":
        from .minilm import load_minilm

        return load_minilm()[0], {"model": "minilm"}
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist (use --model minilm or the path of a "
                                "state_dict file)")
    kwargs = _constructor_kwargs(constructor_kwargs)
    if constructor:
        module = _build_empty(constructor, kwargs)
        state, _ = _read_state(path)
        _load_into(module, state, f"{path} does not fit the model of --constructor {constructor} "
                                  f"(--constructor-kwargs {json.dumps(kwargs)})")
        return module, {"model": str(path), "constructor": constructor, "constructor_kwargs": kwargs}
    if not trust_pickle:
        raise ValueError(f"{path}: pass --constructor package.module:callable to build the model and load this "
                         "file as a state_dict, or --trust-pickle to unpickle a whole module (runs code from the "
                         "file: only for files you trust)")
    module = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(module, nn.Module):
        raise ValueError(f"{path} holds a {type(module).__name__}, not an nn.Module")
    return module, {"model": str(path), "pickled": True}


# ------------------------------------------------------------------------------------------------ checkpoints
def save_compressed(model: nn.Module, path, info: Mapping) -> Path:
    """Write ``model.state_dict()`` to ``path`` (.safetensors, otherwise a weights_only torch file) with ``info``.

    Non-tensor entries of the state_dict (the parametrizations' ``_extra_state`` settings) are kept: in the
    safetensors metadata, or as plain values in the torch file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    extra = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    info = dict(info)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {META_KEY: json.dumps({**info, "extra_state": extra})}
        save_file(unshared_tensors(tensors), str(path), metadata=metadata)
    else:
        torch.save({"state_dict": state, META_KEY: info}, str(path))
    return path


def load_checkpoint(path) -> tuple[dict, dict]:
    """(state_dict, info) of a file written by :func:`save_compressed`."""
    return _read_state(Path(path))


def build_compressed(model: nn.Module, path) -> nn.Module:
    """Rebuild a compressed model: convert the dense ``model`` as the checkpoint records, then load its state.

    Returns the model (a new object only when the whole model was one factorized layer).
    """
    state, info = load_checkpoint(path)
    fmt = info.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"{path}: not a torch-sttp compressed checkpoint (format {fmt!r})")
    if fmt != "dense":
        plan = info["plan"]
        method = "svdp" if plan["method"] == "svd" else plan["method"]
        convert(model, method, rank=dict(plan["ranks"]), spectrum=plan["spectrum"], init="identity",
                batching=info.get("batching", "shape"))
        if fmt == "factorized":
            model = to_factorized(model)
    _load_into(model, state, f"{path} was not compressed from this --model")
    return model


def _load_into(module: nn.Module, state: Mapping, what: str) -> None:
    """``module.load_state_dict(state)``, a mismatch raised as one ValueError line: ``what``, then torch's first
    complaints (missing / unexpected keys, size mismatches)."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        shown = "; ".join(line[:200].rstrip(".") for line in lines[:2]) + (f"; … ({len(lines)} in all)" if len(lines) > 2 else "")
        raise ValueError(f"{what}: {shown or err}") from None


# ------------------------------------------------------------------------------------------------ calibration
def check_calibration_args(calibration: str | None, samples: int | None, model: str, randomized: bool) -> str | None:
    """What ``--calibration`` names — "saved" (a .safetensors Calibration), "sentences" (a text file or
    ``default``) or None — after checking the arguments (before any model is loaded)."""
    if calibration is None:
        if samples is not None:
            raise ValueError("--calibration-samples needs --calibration (a sentence file, 'default' or a saved "
                             "calibration)")
        return None
    if samples is not None and samples < 1:
        raise ValueError(f"--calibration-samples must be ≥ 1, got {samples}")
    if randomized:
        raise ValueError("--randomized is data-free; drop it or drop --calibration")
    if calibration != "default" and not Path(calibration).is_file():
        raise FileNotFoundError(f"--calibration file {calibration!r} does not exist; give a saved calibration "
                                "(.safetensors), a text file of sentences, or 'default' (--model minilm)")
    if calibration != "default" and Path(calibration).suffix == ".safetensors":
        if samples is not None:
            raise ValueError("--calibration-samples applies to sentences; a saved calibration is used as it is "
                             "(calibrate again with fewer batches instead)")
        return "saved"
    if model != "minilm":
        raise ValueError(f"--calibration {calibration!r}: sentences calibrate --model minilm only; for another model "
                         "give a calibration saved with torch_sttp.calibrate(model, batches).save('FILE.safetensors')")
    return "sentences"


def _sentences(calibration: str, samples: int) -> list[str]:
    if calibration == "default":
        from .minilm import load_sentences

        return load_sentences(192, None, 0)[1][:samples]  # the study's split: distillation sentences only
    lines = [line.strip() for line in Path(calibration).read_text(encoding="utf-8").splitlines()]
    sentences = [line for line in lines if line][:samples]
    if not sentences:
        raise ValueError(f"--calibration {calibration!r} holds no sentence (one per line)")
    return sentences


def calibration_statistics(model: nn.Module, tokenizer, calibration: str, kind: str, samples: int | None,
                           include=None, exclude=None, progress: bool = False) -> tuple[Calibration, dict]:
    """(statistics, a description for the report) for ``--calibration`` (see the module docstring): a saved file
    read as it is, or the first ``samples`` sentences tokenized in batches of 16 and streamed through ``model``."""
    if kind == "saved":
        stats = Calibration.load(calibration)
        return stats, {"calibration": str(calibration), "layers": len(stats)}
    from .minilm_calibrated import calibration_batches

    sentences = _sentences(calibration, samples or DEFAULT_CALIBRATION_SAMPLES)
    stats = calibrate(model, calibration_batches(tokenizer, sentences), include=include, exclude=exclude,
                      progress=progress)
    return stats, {"calibration": str(calibration), "sentences": len(sentences), "layers": len(stats)}


# --------------------------------------------------------------------------------------------------- compress
def compress(model: nn.Module, budget, method: str = "svdp", spectrum: str = "free", strategy: str = "auto",
             objective: str = "svd", include=None, exclude=None, randomized: bool = False,
             progress: bool = True, calibration: Calibration | None = None) -> tuple[nn.Module, RankPlan, dict]:
    """Select ranks within ``budget``, project, and (for ``"svd"``) factorize; returns (model, plan, report).

    With ``calibration`` the projection is data-aware, and so is the plan for ``strategy="auto"`` with
    ``objective="svd"`` (the loss-aware plan); other strategies/objectives plan data-free as asked. The calibration
    is consumed: each statistic is freed once its layers are projected (``release_statistics``), which lowers the
    peak memory."""
    t0 = time.perf_counter()
    dense_values = count_state_values(model)
    aware_plan = calibration is not None and strategy == "auto" and objective == "svd"
    plan = select_ranks(model, budget, method, spectrum, include=include, exclude=exclude, objective=objective,
                        strategy=strategy, calibration=calibration if aware_plan else None)
    t1 = time.perf_counter()
    model = project(model, "svdp" if method == "svd" else method, plan, spectrum=spectrum, progress=progress,
                    randomized=randomized, calibration=calibration, release_statistics=calibration is not None)
    errors = projection_errors(model)
    t2 = time.perf_counter()
    counted = model_report(model)
    skipped = [list(row) for row in skipped_layers(model)]
    if method == "svd":
        model = to_factorized(model)
    compressed = counted.dof_total + counted.other + counted.stored if method != "svd" else count_state_values(model)
    report = {
        "plan": plan.to_dict(), "projection_errors": errors,
        "mean_projection_error": sum(errors.values()) / len(errors) if errors else 0.0,
        "select_seconds": t1 - t0, "project_seconds": t2 - t1,
        "format": "factorized" if method == "svd" else "spectral",
        # eq. 11 over the whole model: DOF (spectral) or stored values (factorized) + everything else, over dense
        "compression": {"z": 100.0 * compressed / dense_values, "params_compressed": compressed,
                        "params_dense": dense_values, "skipped": skipped},
    }
    return model, plan, report


def cli_compress(args: argparse.Namespace) -> int:
    """``sttp compress``: select ranks within a budget, project, write the compressed weights and a JSON report.

    Namespace fields: model, constructor, constructor_kwargs, trust_pickle, budget, method, spectrum, strategy,
    objective, include, exclude, randomized, calibration, calibration_samples (see the module docstring), output
    (.safetensors or .pt), report (default: output + ".json"), threads, quiet.
    """
    budget = parse_budget(args.budget)  # every argument is checked before the model is loaded
    if args.method == "svd" and args.spectrum != "free":
        raise ValueError(f"--method svd writes two plain factors, which keep no spectrum, so --spectrum "
                         f"{args.spectrum} does not apply; drop it, or use --method svdp or sttp for that spectrum")
    _check_threads(getattr(args, "threads", None))
    _check_output(args.output)
    _check_output(getattr(args, "report", None) or f"{args.output}.json", "--report")
    calib = getattr(args, "calibration", None)
    kind = check_calibration_args(calib, getattr(args, "calibration_samples", None), args.model,
                                  getattr(args, "randomized", False))
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    model, source, tokenizer = _load_for_compress(args, kind)
    include = getattr(args, "include", None) or None
    exclude = getattr(args, "exclude", None)
    if exclude is None and args.model == "minilm":
        from .minilm import DEFAULT_EXCLUDE

        exclude = list(DEFAULT_EXCLUDE)
    if include is None and args.model == "minilm":
        include = [nn.Linear]
    progress = not getattr(args, "quiet", False)
    stats, described = None, None
    if kind is not None:
        stats, described = calibration_statistics(model, tokenizer, calib, kind,
                                                  getattr(args, "calibration_samples", None), include,
                                                  exclude or None, progress)
    model, plan, report = compress(model, budget, args.method, args.spectrum,
                                   getattr(args, "strategy", "auto"), getattr(args, "objective", "svd"),
                                   include, exclude or None, getattr(args, "randomized", False), progress, stats)
    if described is not None:
        report["calibration"] = described
    info = {"format": report["format"], "plan": report["plan"], "source": source, "batching": "shape"}
    out = save_compressed(model, args.output, info)
    report.update({"source": source, "output": str(out), "output_bytes": out.stat().st_size})
    report_path = Path(getattr(args, "report", None) or f"{out}.json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    if not getattr(args, "quiet", False):
        print(plan.summary())
        comp = report["compression"]
        left = "; layers left dense: " + ", ".join(f"{n} ({why})" for n, _, why in comp["skipped"]) if comp["skipped"] \
            else ""
        print(f"Z = {comp['z']:.4g}% of the dense model (eq. 11: {comp['params_compressed']:,} of "
              f"{comp['params_dense']:,} values){left}")
        print(f"mean projection error {report['mean_projection_error']:.4f}; wrote {out} and {report_path}")
    return 0


def _load_for_compress(args: argparse.Namespace, kind: str | None):
    """(model, source, tokenizer): the tokenizer only when MiniLM is calibrated on sentences."""
    if kind == "sentences":
        from .minilm import load_minilm

        model, tokenizer = load_minilm()
        return model, {"model": "minilm"}, tokenizer
    model, source = load_model(args.model, getattr(args, "constructor", None),
                               getattr(args, "constructor_kwargs", None), getattr(args, "trust_pickle", False))
    return model, source, None


def cli_export(args: argparse.Namespace) -> int:
    """``sttp export``: turn a compressed checkpoint into plain layers (``--format dense`` or ``factorized``).

    Namespace fields: input (a file from ``sttp compress``), model / constructor / constructor_kwargs /
    trust_pickle (the dense skeleton, as for compress), format, output.
    """
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"--input {args.input!r} does not exist; give a file written by sttp compress")
    _, info = load_checkpoint(args.input)  # every argument is checked before the model is loaded
    fmt = args.format
    if fmt not in ("dense", "factorized"):
        raise ValueError(f"--format must be 'dense' or 'factorized', got {fmt!r}")
    if fmt == "dense" and info.get("format") == "factorized":
        raise ValueError(f"{args.input} is a factorized checkpoint (sttp compress --method svd): its layers are plain "
                         "already; export it with --format factorized, or compress with --method svdp or sttp for "
                         "a dense export")
    _check_output(args.output)
    model, source = load_model(args.model, getattr(args, "constructor", None),
                               getattr(args, "constructor_kwargs", None), getattr(args, "trust_pickle", False))
    model = build_compressed(model, args.input)
    if fmt == "dense":
        model = to_dense(model)
    elif info.get("format") == "spectral":
        model = to_factorized(model)
    out_info = {"format": "dense" if fmt == "dense" else "factorized", "plan": info.get("plan"),
                "source": source, "exported_from": str(args.input)}
    out = save_compressed(model, args.output, out_info)
    if not getattr(args, "quiet", False):
        print(f"wrote {out} ({fmt}, {count_state_values(model)} values: the state dict without num_batches_tracked, "
              "a shared tensor once)")
    return 0


def _check_threads(threads) -> None:
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be ≥ 1, got {threads}")


def _check_output(path, flag: str = "--output") -> None:
    """Before any work: the output can be written where it is asked for (an existing folder that is not a file
    and can be written, or one that can be created there), and a ``.safetensors`` output has its package."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name in it")
    ancestor = target.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path}: {ancestor} is a file, not a folder; give another output path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {ancestor} cannot be written; give another output path")
    if target.suffix == ".safetensors":
        try:
            import safetensors  # noqa: F401
        except ImportError:
            raise ValueError(f"writing {path} needs the safetensors package (pip install safetensors), or give a "
                             ".pt output") from None


def add_compress_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="'minilm' or a state_dict/module file")
    parser.add_argument("--constructor", help="package.module:callable building the empty model for a state_dict")
    parser.add_argument("--constructor-kwargs", help="JSON keyword arguments for --constructor")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow unpickling a whole nn.Module from --model (runs code from the file)")
    parser.add_argument("--budget", required=True,
                        help="fraction in (0, 1] of the selected layers' dense parameters (1 = all of them), or a "
                             "DOF count")
    parser.add_argument("--method", default="svdp", choices=list(RANK_METHODS))
    parser.add_argument("--spectrum", default="free", choices=["free", "normalized", "identity"])
    parser.add_argument("--strategy", default="auto", choices=["auto", "greedy", "uniform"])
    parser.add_argument("--objective", default="svd", choices=["svd", "tt"])
    parser.add_argument("--include", nargs="*", help="layer-name globs to compress")
    parser.add_argument("--exclude", nargs="*", help="layer-name globs to leave dense")
    parser.add_argument("--randomized", action="store_true", help="randomized SVD (svdp only)")
    parser.add_argument("--calibration", metavar="FILE",
                        help="data-aware compression: project each layer to minimise its output error on calibration "
                        "data (and, with --strategy auto --objective svd, allocate ranks by that loss). FILE: a "
                        "calibration saved by torch_sttp.calibrate(...).save('FILE.safetensors') on the same model, "
                        "used as it is; or, for --model minilm, a text file of sentences (one per line) or 'default' "
                        "(the MiniLM study's distillation sentences)")
    parser.add_argument("--calibration-samples", metavar="N", type=int,
                        help=f"sentences of --calibration to use: the first N (default {DEFAULT_CALIBRATION_SAMPLES})")
    parser.add_argument("--output", required=True, help="output file: .safetensors or .pt (weights_only)")
    parser.add_argument("--report", help="JSON report path (default: OUTPUT.json)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quiet", action="store_true")
    return parser


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--input", required=True, help="a checkpoint written by sttp compress")
    parser.add_argument("--model", required=True, help="'minilm' or the dense model's state_dict/module file")
    parser.add_argument("--constructor", help="package.module:callable building the empty model")
    parser.add_argument("--constructor-kwargs", help="JSON keyword arguments for --constructor")
    parser.add_argument("--trust-pickle", action="store_true")
    parser.add_argument("--format", default="dense", choices=["dense", "factorized"])
    parser.add_argument("--output", required=True, help=".safetensors or .pt (weights_only)")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="compress / export with torch-sttp")
    sub = parser.add_subparsers(dest="command", required=True)
    add_compress_arguments(sub.add_parser("compress", help="select ranks, project, save"))
    add_export_arguments(sub.add_parser("export", help="compressed checkpoint -> dense or factorized layers"))
    args = parser.parse_args(argv)
    return cli_compress(args) if args.command == "compress" else cli_export(args)


if __name__ == "__main__":
    sys.exit(main())
