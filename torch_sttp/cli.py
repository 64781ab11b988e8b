"""The ``sttp`` command line: reproduce the paper's numbers, report, train, compress and export models.

    sttp reproduce compression [--json]
    sttp report MODEL [--method sttp] [--rank 64] [--spectrum normalized] [--exclude GLOB …] [--json]
    sttp train classify|gan|adapt …
    sttp compress … / sttp export …

Every subcommand has ``--help``. Experiment subcommands import their recipes lazily, so ``sttp report`` works with
the core installation alone.

A mistake in the arguments (a bad value, a missing file, settings that do not fit) ends with one line
``sttp: error: …`` that names the fix, and exit status 2, before any work starts; ``--debug`` (anywhere on the
command line) shows the traceback instead. Other errors are internal and keep their traceback. Training ends with
one summary line (final metrics, run folder).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .experiments.runner import USER_ERRORS, one_line, rank_literal


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line ``sttp: error: …`` (exit status 2)."""

    def error(self, message: str):
        print(f"sttp: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _cmd_reproduce_compression(args) -> int:
    from .experiments.paper import reproduce_compression

    rows = reproduce_compression()
    if args.json:
        print(json.dumps([r if isinstance(r, dict) else r.__dict__ for r in rows], indent=2, default=str))
    else:
        _print_reproduction(rows)
    ok = all((r["within_tolerance"] if isinstance(r, dict) else r.within_tolerance) for r in rows)
    return 0 if ok else 1


def _print_reproduction(rows) -> None:
    def get(r, k):
        return r[k] if isinstance(r, dict) else getattr(r, k)

    width = max(len(str(get(r, "setting"))) for r in rows)
    print(f"{'setting':<{width}}  {'method':<6} {'paper':>8} {'ours':>8}  match")
    for r in rows:
        mark = "yes" if get(r, "within_tolerance") else "NO"
        print(f"{str(get(r, 'setting')):<{width}}  {get(r, 'method'):<6} {str(get(r, 'published')):>8} "
              f"{get(r, 'ours'):>8.3f}  {mark}")


def _cmd_report(args) -> int:
    from .experiments.models import MODELS, build_model
    from .report import report
    from .surgery import convert

    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; choose one of {sorted(MODELS)}")
    model = build_model(args.model)
    convert(model, method=args.method, rank=args.rank, spectrum=args.spectrum, init="identity",
            exclude=args.exclude or None)
    rep = report(model, print_table=False)
    print(json.dumps(rep.to_dict(), indent=2, default=str) if args.json else rep)
    return 0


def _train_with(recipe, run):
    """The handler of ``sttp train <recipe>``: ``run`` it, print its summary line, return its exit status."""
    def handler(args) -> int:
        summary = run(args)
        print(recipe.summary_line(summary))
        return int(summary)
    return handler


#: The training recipes: (name, help); each is the module ``experiments.<name>`` with ``add_<name>_arguments``,
#: ``run_<name>`` and ``summary_line``.
_RECIPES = (
    ("classify", "image/sequence classification: dense, SN, SR, SVDP or STTP"),
    ("gan", "SNGAN training with an SN, SR, SVDP or STTP discriminator"),
    ("adapt", "fine-tune a frozen pretrained model (MiniLM text topics, SmallCNN digits 5-9) with principal, delta "
              "or rotation adapters"),
)


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="train a model with a recipe (classify, gan, adapt)")
    recipes = train.add_subparsers(dest="recipe", required=True)
    for name, text in _RECIPES:
        try:
            recipe = importlib.import_module(f".experiments.{name}", __package__)
        except ImportError:  # a recipe whose optional packages are missing is left out
            continue
        p = recipes.add_parser(name, help=text)
        getattr(recipe, f"add_{name}_arguments")(p)
        p.set_defaults(func=_train_with(recipe, getattr(recipe, f"run_{name}")))


def _add_compress(sub) -> None:
    try:
        from .experiments.compress_cli import add_compress_arguments, add_export_arguments, cli_compress, cli_export
    except ImportError:
        return
    p = sub.add_parser("compress", help="compress a pretrained model under a parameter budget")
    add_compress_arguments(p)
    p.set_defaults(func=cli_compress)
    p = sub.add_parser("export", help="write a compressed model back as dense or factorized plain layers")
    add_export_arguments(p)
    p.set_defaults(func=cli_export)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sttp", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also accepted after "
                        "the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("reproduce", help="reproduce the paper's published numbers")
    what = rep.add_subparsers(dest="what", required=True)
    comp = what.add_parser("compression", help="compression Z of every published setting, paper vs ours")
    comp.add_argument("--json", action="store_true", help="machine-readable output")
    comp.set_defaults(func=_cmd_reproduce_compression)

    r = sub.add_parser("report", help="per-layer table of a named architecture after conversion")
    r.add_argument("model", help="architecture name, e.g. wrn28-10, sngan32-d, sngan32-g")
    r.add_argument("--method", default="sttp", choices=["sttp", "svdp"])
    r.add_argument("--rank", type=rank_literal, default=64, help="rank cap r (default: 64)")
    r.add_argument("--spectrum", default="normalized", choices=["identity", "normalized", "free"])
    r.add_argument("--exclude", action="append", help="qualified-name glob of layers kept dense (repeatable)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_cmd_report)

    _add_train(sub)
    _add_compress(sub)
    return parser


def main(argv=None) -> int:
    """Run the ``sttp`` command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error already reported in one line (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        result = args.func(args)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"sttp: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("sttp: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
