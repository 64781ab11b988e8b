"""Performance–compression sweep (the paper's Fig. 7 protocol at small scale): accuracy vs compression Z.

    python -m torch_sttp.experiments.sweep --dataset mnist1d --model cnn1d --epochs 30 \\
        --ranks 1 2 4 8 16 32 --seeds 0 1 2 --out runs/sweeps/mnist1d-cnn1d

Trains, for every seed, a dense reference (always without the spectral penalty) and every (method, rank) of ``--methods`` × ``--ranks`` with the
classification recipe (:mod:`torch_sttp.experiments.classify`; every option of ``sttp train classify`` except
``--method/--rank/--seed`` sets the shared base settings, ``--config`` included). Ranks are caps: a rank that gives
the same per-layer (TT) ranks as a smaller one — every layer is already at full rank — is left out, since it would
train the identical model. Runs go seed by seed, so a partial sweep already has whole seeds.

Outputs under ``--out``:
    ``results.csv`` — one row per finished run (:data:`CSV_COLUMNS`), appended as runs finish;
    ``sweep.json`` — the base settings (a later call with other base settings refuses to mix into this CSV);
    ``accuracy_vs_z.png`` — accuracy vs Z (log axis), one curve per method, mean ± std over seeds, points labelled
    with the rank, the dense accuracy as a horizontal line (mean, band ± std);
    ``runs/<method>-r<rank>-s<seed>/`` — each run's own outputs (metrics.csv, summary.json, checkpoint.pt).

Resuming: call the same command again. Runs already in ``results.csv`` are skipped and a run that was interrupted
continues from its checkpoint. ``--plot-only`` redraws the figure from the CSV; ``--table`` prints the aggregate.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from . import classify
from .runner import MetricsLog, jsonable

__all__ = ["CSV_COLUMNS", "plan_runs", "run_sweep", "read_results", "aggregate", "compare_at_equal_z",
           "format_comparison", "plot_sweep", "format_table", "main"]

CSV_COLUMNS = ("method", "rank", "seed", "z", "dof", "accuracy", "best_accuracy", "test_loss", "steps",
               "wall_time_s", "status", "run_dir")
_CSV = "results.csv"
_PLOT = "accuracy_vs_z.png"
_META = "sweep.json"
_PER_RUN = ("method", "rank", "seed", "out", "resume", "stop_at", "progress")


# ------------------------------------------------------------------------------------------------------------ plan
def _rank_signature(base: Mapping, method: str, rank: int) -> tuple:
    """Per-layer TT ranks (and Z) of ``method`` at rank cap ``rank`` for the base model — arithmetic only."""
    from ..report import count_model_dof

    cfg = dict(base, method=method, rank=rank)
    train, _ = classify.load_data(cfg)
    model = classify.build_model(cfg, train.example())
    rep = count_model_dof(model, method, rank, cfg["spectrum"], exclude=classify.excluded_layers(cfg) or None)
    return tuple(row.tt_ranks for row in rep.layers), rep.z


def plan_runs(base: Mapping, methods: Sequence[str], ranks: Sequence[int], seeds: Sequence[int],
              dense: bool = True) -> tuple[list[dict], list[str]]:
    """The runs of a sweep, seed by seed, as ``{"method", "rank", "seed", "z"}``; and notes on ranks left out."""
    notes, kept = [], {}
    for method in methods:
        seen: dict[tuple, int] = {}
        kept[method] = []
        for r in sorted(set(int(r) for r in ranks)):
            sig, z = _rank_signature(base, method, r)
            if sig in seen:
                notes.append(f"{method} r={r}: same layer ranks as r={seen[sig]} (all layers at full rank), left out")
                continue
            seen[sig] = r
            kept[method].append((r, z))
    runs = []
    for seed in seeds:
        if dense:
            runs.append({"method": "dense", "rank": None, "seed": int(seed), "z": 100.0})
        for r in sorted(set(int(r) for r in ranks)):
            for method in methods:
                for rr, z in kept[method]:
                    if rr == r:
                        runs.append({"method": method, "rank": r, "seed": int(seed), "z": z})
    return runs, notes


def _key(method: str, rank, seed) -> tuple:
    return (str(method), "" if rank in (None, "") else str(int(rank)), str(int(seed)))


def _run_dir(run: Mapping) -> str:
    name = run["method"] if run["rank"] is None else f"{run['method']}-r{run['rank']}"
    return f"{name}-s{run['seed']}"


# ------------------------------------------------------------------------------------------------------------- CSV
def read_results(path) -> list[dict]:
    """Rows of a sweep CSV with numbers parsed (rank None for dense)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({
                **r,
                "rank": int(r["rank"]) if r["rank"] not in ("", None) else None,
                "seed": int(r["seed"]),
                "z": float(r["z"]),
                "accuracy": float(r["accuracy"]),
                "wall_time_s": float(r["wall_time_s"]),
            })
    return rows


def _row(run: Mapping, summary: Mapping, run_dir: str) -> dict:
    return {
        "method": run["method"],
        "rank": "" if run["rank"] is None else int(run["rank"]),
        "seed": int(run["seed"]),
        "z": f"{summary['z']:.6g}",
        "dof": summary["dof"],
        "accuracy": f"{summary['accuracy']:.6f}",
        "best_accuracy": f"{summary['best_accuracy']:.6f}" if summary.get("best_accuracy") is not None else "",
        "test_loss": f"{summary['test_loss']:.6f}",
        "steps": summary["steps"],
        "wall_time_s": f"{summary['wall_time_s']:.2f}",
        "status": summary["status"],
        "run_dir": run_dir,
    }


# -------------------------------------------------------------------------------------------------------- aggregate
def aggregate(rows: Iterable[Mapping]) -> list[dict]:
    """Per (method, rank): Z, number of seeds, mean/std/min/max accuracy, mean wall time; sorted by method, Z."""
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["rank"]), []).append(r)
    out = []
    for (method, rank), rs in groups.items():
        accs = [r["accuracy"] for r in rs]
        out.append({
            "method": method,
            "rank": rank,
            "z": statistics.fmean(r["z"] for r in rs),
            "n": len(rs),
            "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "min": min(accs),
            "max": max(accs),
            "wall_time_s": statistics.fmean(r["wall_time_s"] for r in rs),
        })
    order = {"dense": 0, "sn": 1, "sr": 2, "svdp": 3, "sttp": 4}
    out.sort(key=lambda a: (order.get(a["method"], 9), a["method"], a["z"]))
    return out


def format_table(rows: Iterable[Mapping]) -> str:
    """A Markdown table of :func:`aggregate` (accuracy in percent)."""
    lines = ["| method | rank | Z (%) | seeds | accuracy mean ± std (%) | min–max (%) | mean wall time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for a in aggregate(rows):
        lines.append(f"| {a['method']} | {'—' if a['rank'] is None else a['rank']} | {a['z']:.2f} | {a['n']} | "
                     f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f} | {100 * a['min']:.1f}–{100 * a['max']:.1f} | "
                     f"{a['wall_time_s']:.0f} |")
    return "\n".join(lines)


def compare_at_equal_z(rows: Iterable[Mapping], method: str = "sttp", reference: str = "svdp") -> list[dict]:
    """``method``'s mean accuracy at each of its ranks vs ``reference``'s at the same Z.

    The reference curve (mean accuracy over seeds vs log Z) is interpolated linearly between its two neighbouring
    ranks; points of ``method`` outside the reference's Z range get ``None``. Returns one dict per rank of
    ``method``: rank, z, mean, std, ref_mean (interpolated), ref_ranks (the bracketing ranks), gap = mean − ref_mean.
    """
    agg = aggregate(rows)
    ref = sorted((a for a in agg if a["method"] == reference), key=lambda a: a["z"])
    out = []
    for a in (a for a in agg if a["method"] == method):
        ref_mean, ref_ranks = None, None
        for lo, hi in zip(ref, ref[1:]):
            if lo["z"] <= a["z"] <= hi["z"]:
                t = (math.log(a["z"]) - math.log(lo["z"])) / (math.log(hi["z"]) - math.log(lo["z"]))
                ref_mean, ref_ranks = lo["mean"] + t * (hi["mean"] - lo["mean"]), (lo["rank"], hi["rank"])
                break
        out.append({"rank": a["rank"], "z": a["z"], "mean": a["mean"], "std": a["std"], "ref_mean": ref_mean,
                    "ref_ranks": ref_ranks, "gap": None if ref_mean is None else a["mean"] - ref_mean})
    return out


def format_comparison(rows: Iterable[Mapping], method: str = "sttp", reference: str = "svdp") -> str:
    """A Markdown table of :func:`compare_at_equal_z` (percent)."""
    lines = [f"| {method} rank | Z (%) | {method} acc. (%) | {reference} acc. at that Z (%) | between {reference} ranks "
             f"| gap (points) |", "|---:|---:|---:|---:|---:|---:|"]
    for c in compare_at_equal_z(rows, method, reference):
        if c["ref_mean"] is None:
            ref, between, gap = "outside range", "—", "—"
        else:
            ref, between, gap = (f"{100 * c['ref_mean']:.1f}", f"{c['ref_ranks'][0]}–{c['ref_ranks'][1]}",
                                 f"{100 * c['gap']:+.1f}")
        lines.append(f"| {c['rank']} | {c['z']:.2f} | {100 * c['mean']:.1f} ± {100 * c['std']:.1f} | {ref} | "
                     f"{between} | {gap} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- plot
_COLORS = {"svdp": "tab:blue", "sttp": "tab:red", "sn": "tab:green", "sr": "tab:purple"}
_MARKERS = {"svdp": "s", "sttp": "o", "sn": "^", "sr": "v"}


def plot_sweep(rows: Sequence[Mapping], path, title: str | None = None) -> str:
    """Draw accuracy vs Z (log axis) to ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    dense = [a for a in agg if a["method"] == "dense"]
    if dense:
        d = dense[0]
        ax.axhline(100 * d["mean"], color="0.3", lw=1.2, ls="--", label=f"dense (n={d['n']})")
        if d["n"] > 1:
            ax.axhspan(100 * (d["mean"] - d["std"]), 100 * (d["mean"] + d["std"]), color="0.6", alpha=0.2, lw=0)
    methods = [m for m in dict.fromkeys(a["method"] for a in agg) if m != "dense"]
    for method in methods:
        pts = sorted((a for a in agg if a["method"] == method), key=lambda a: a["z"])
        z = [a["z"] for a in pts]
        mean = [100 * a["mean"] for a in pts]
        std = [100 * a["std"] for a in pts]
        color = _COLORS.get(method, None)
        n = min(a["n"] for a in pts)
        ax.errorbar(z, mean, yerr=std, color=color, marker=_MARKERS.get(method, "o"), ms=5, lw=1.5, capsize=3,
                    label=f"{method.upper()} (mean ± std, n≥{n})")
        ax.fill_between(z, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color,
                        alpha=0.12, lw=0)
        for a, x, y in zip(pts, z, mean):
            below = method == "svdp"  # SVDP labels below-right of their points, the others above-left
            ax.annotate(f"r={a['rank']}", (x, y), textcoords="offset points", xytext=(5, -12) if below else (-5, 6),
                        ha="left" if below else "right", fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("compression Z (% of dense parameters, log scale)")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=150)
    plt.close(fig)
    tmp.replace(path)
    return str(path)


def _title(base: Mapping) -> str:
    length = f"{base['steps']} steps" if base.get("steps") else f"{base['epochs']:g} epochs"
    return f"{base['dataset']} / {base['model']}: accuracy vs compression ({length}, {base['optimizer']})"


# -------------------------------------------------------------------------------------------------------------- run
def _worker(cfg: dict) -> dict:
    return dict(classify.run_classify(cfg))


def run_sweep(base: Mapping, methods: Sequence[str] = ("svdp", "sttp"), ranks: Sequence[int] = (1, 2, 4, 8, 16, 32),
              seeds: Sequence[int] = (0, 1, 2), out="runs/sweep", dense: bool = True, jobs: int = 1,
              progress: bool = True, plot: bool = True, plot_interval: float = 60.0) -> list[dict]:
    """Run (or resume) a sweep; returns the CSV rows. ``base``: classification settings shared by all runs.

    The figure is redrawn as runs finish (at most every ``plot_interval`` seconds) and once at the end.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = _base_settings(base, out)
    csv_path = out / _CSV
    runs, notes = plan_runs(base, methods, ranks, seeds, dense)
    for note in notes:
        print(f"sweep: {note}", file=sys.stderr)
    done = {_key(r["method"], r["rank"], r["seed"]) for r in read_results(csv_path)}
    todo = [r for r in runs if _key(r["method"], r["rank"], r["seed"]) not in done]
    print(f"sweep: {len(runs)} runs planned, {len(runs) - len(todo)} already in {csv_path}, {len(todo)} to go",
          file=sys.stderr)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"sweep {out.name}", unit="run")
    recorder = _Recorder(out, base, bar, plot, plot_interval)
    try:
        if jobs <= 1:
            for run in todo:
                recorder(run, classify.run_classify(_run_config(base, run, out)))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(_worker, _run_config(base, run, out)): run for run in todo}
                for fut in as_completed(futures):
                    recorder(futures[fut], fut.result())
    finally:
        if bar is not None:
            bar.close()
    rows = read_results(csv_path)
    if plot and rows:
        plot_sweep(rows, out / _PLOT, _title(base))
    return rows


def _base_settings(base: Mapping, out: Path) -> dict:
    """The resolved settings shared by the sweep's runs (the per-run keys left out), checked against and recorded
    in ``out/sweep.json``: a sweep folder holds runs of one base only."""
    base = dict(base)
    for k in _PER_RUN:
        base.pop(k, None)
    base = classify.resolve_config(base)
    for k in _PER_RUN:
        base.pop(k, None)
    meta_path = out / _META
    meta = {"base": jsonable(base)}
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())["base"]
        diff = sorted(k for k in set(old) | set(meta["base"])
                      if k not in classify.RESUMABLE_CHANGES and old.get(k) != meta["base"].get(k))
        if diff:
            raise ValueError(f"{out} holds a sweep with other base settings ({', '.join(diff)}); use another --out")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return base


def _run_config(base: Mapping, run: Mapping, out: Path) -> dict:
    """The settings of one run of the sweep (the dense reference never has the spectral penalty)."""
    cfg = dict(base, method=run["method"], rank=run["rank"] or classify.DEFAULTS["rank"], seed=run["seed"],
               out=str(out / "runs" / _run_dir(run)), progress=False, resume=True)
    if run["method"] == "dense":
        cfg["penalty"] = "none"  # the reference is the plain, unregularized model
    return cfg


class _Recorder:
    """Called with each finished run: appends its row to ``results.csv``, advances the bar, redraws the figure
    at most every ``plot_interval`` seconds; an interrupted run stops the sweep."""

    def __init__(self, out: Path, base: Mapping, bar, plot: bool, plot_interval: float):
        self.out, self.base, self.bar, self.plot, self.plot_interval = out, base, bar, plot, plot_interval
        self.last_plot = -math.inf

    def __call__(self, run: Mapping, summary: Mapping) -> None:
        if summary["status"] == "interrupted":
            raise KeyboardInterrupt("sweep interrupted; run the same command again to resume")
        MetricsLog(self.out / _CSV, CSV_COLUMNS).append(_row(run, summary, _run_dir(run)))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{_run_dir(run)}: acc {100 * summary['accuracy']:.1f}% Z {summary['z']:.1f}%")
        if self.plot and time.monotonic() - self.last_plot >= self.plot_interval:
            plot_sweep(read_results(self.out / _CSV), self.out / _PLOT, _title(self.base))
            self.last_plot = time.monotonic()


# ------------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_sttp.experiments.sweep",
                                     description=__doc__.splitlines()[0])
    classify.add_classify_arguments(parser)
    g = parser.add_argument_group("sweep")
    g.add_argument("--methods", nargs="+", default=["svdp", "sttp"], choices=("svdp", "sttp"))
    g.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    g.add_argument("--no-dense", dest="dense", action="store_false", help="leave out the dense reference runs")
    g.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes (default 1)")
    g.add_argument("--plot-only", action="store_true", help="only redraw the figure from the CSV")
    g.add_argument("--table", action="store_true", help="print the aggregate as a Markdown table at the end, and "
                   "STTP vs SVDP at equal Z (SVDP interpolated in log Z)")
    args = parser.parse_args(argv)
    sweep_keys = {"methods", "ranks", "seeds", "dense", "jobs", "plot_only", "table"}
    given = {k: v for k, v in vars(args).items() if k not in sweep_keys}
    for k in ("method", "rank", "seed"):
        if k in given:
            parser.error(f"--{k} is set per run by the sweep; use --{k}s")
    out = Path(given.pop("out", None) or "runs/sweep")
    progress = given.pop("progress", True)
    if args.plot_only:
        meta = json.loads((out / _META).read_text())["base"] if (out / _META).is_file() else None
        rows = read_results(out / _CSV)
        if not rows:
            parser.error(f"no results in {out / _CSV}")
        print(plot_sweep(rows, out / _PLOT, _title(meta) if meta else None))
    else:
        t0 = time.perf_counter()
        try:
            rows = run_sweep(given, args.methods, args.ranks, args.seeds, out, args.dense, args.jobs, progress)
        except KeyboardInterrupt as e:
            print(f"\n{e or 'interrupted'}", file=sys.stderr)
            return 130
        print(f"sweep: {len(rows)} runs in {out / _CSV}; figure {out / _PLOT}; "
              f"this call {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.table:
        print(format_table(rows))
        if {"svdp", "sttp"} <= {r["method"] for r in rows}:
            print()
            print(format_comparison(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
