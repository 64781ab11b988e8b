"""Adapters side by side with PEFT: accuracy at matched trainable parameters, step time, peak memory, merge.

Two offline tasks (``--study``; their data and models are :mod:`torch_sttp.experiments.adapt_tasks`):

* **text** — all-MiniLM-L6-v2 (masked mean pooling, a new linear head) classifies sentences of Python's bundled
  documentation (``pydoc_data.topics``) by topic: the 20 topics with most sentences after dropping every sentence
  that occurs in more than one topic; a seeded 60/20/20 split per topic (train / validation / test). The adapters
  go on the 36 encoder Linear layers; the head trains with every method.
* **vision** — the MNIST-5k ``SmallCNN`` (width 16) trained on digits 0–4, then adapted to digits 5–9: adapters on
  its conv and linear layers (conv1–3, fc) and a new trainable 5-way head on fc's output for every method.

Methods: PEFT's LoRA (r=8, alpha 16, dropout 0), HRA (r=8) and OFT (block 32); ours — principal and delta (SVDP
and STTP) and rotation — each at the largest rank whose adapter parameters do not exceed LoRA r=8's; a linear probe
(head only) and full fine-tuning. Every method trains with AdamW on the same learning-rate grid; the rate is chosen
per method on the validation split (mean over seeds) and the test accuracy is the mean over the seeds at that rate.
Also recorded: the median training-step time, the merge time and merge error (‖Δlogits‖/‖logits‖ on the test split,
float32) and whether unloading gives the original weights bit for bit. ``--memory`` measures each method's peak RSS
growth over three training steps (from ``/proc/self/status``, reset through ``/proc/self/clear_refs``), one fresh
process per task and method: inside the study's long-running process the heap already holds the pages a later run
needs, and the growth reads 0.

``--step-time`` (the default) times one training step (forward, loss, backward, AdamW step) on MiniLM, batch 16 of
the text task's sentences, max length 128, median over interleaved rounds after warm-up, for LoRA r=8, our rotation
at r=8 and r=32, and (``--with-hra``) PEFT's HRA r=8. Targets:

    TARGET text_accuracy ratio=<best ours test acc / LoRA test acc> goal=1.0     (ours chosen on validation)
    TARGET vision_accuracy ratio=<…> goal=1.0
    TARGET rotation_r8_step ratio=<rotation r=8 step / LoRA r=8 step> goal=1.25
    TARGET rotation_r32_step ratio=<…> goal=1.25
    TARGET merge_error ratio=<largest, over our methods, of the mean merge error (over the seeds) at the
                             method's chosen rate / 1e-6> goal=1.0   (single runs may exceed it: see the study)
    TARGET unload_bit_exact ratio=<1 if every unload is bit-exact else 0> goal=1.0

    python benchmarks/adapters.py [--step-time [--clock wall|cpu] [--rounds N]] [--study [--quick]] [--memory]
                                  [--tasks text vision] [--threads N] [--out DIR]
    python benchmarks/adapters.py --combine out-text/study.json out-vision/study.json --out DIR   # one summary

Needs the ``[compare]`` extra (peft) and the ``transformers`` and ``experiments`` extras.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch_sttp  # noqa: E402
from torch_sttp.adapters import adapter_layers  # noqa: E402
from torch_sttp.experiments.adapt_tasks import (TEXT_TARGETS, VISION_TARGETS, Task, adapter_targets,  # noqa: E402
                                                text_task, vision_task)

sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import CLOCKS, load_average  # noqa: E402

OURS = [("principal", "svdp"), ("principal", "sttp"), ("delta", "svdp"), ("delta", "sttp"), ("rotation", "svdp")]
PEFT_METHODS = ["lora", "hra", "oft"]
METHODS = ["probe", "full"] + PEFT_METHODS + [f"{k}-{m}" if k != "rotation" else k for k, m in OURS]


# -------------------------------------------------------------------------------------------------------- methods
def targets(task: Task) -> dict:
    """Adapter targets of a task for ours (globs / types) and for PEFT (names or a regex)."""
    peft_targets = TEXT_TARGETS if task.name == "text" else list(VISION_TARGETS)
    return {"ours": adapter_targets(task.name), "peft": peft_targets}


def peft_model(model: nn.Module, method: str, task: Task) -> nn.Module:
    import peft

    common = {"target_modules": targets(task)["peft"], "modules_to_save": ["head"]}
    config = {"lora": lambda: peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, **common),
              "hra": lambda: peft.HRAConfig(r=8, **common),
              "oft": lambda: peft.OFTConfig(r=0, oft_block_size=32, **common)}[method]()
    return peft.get_peft_model(model, config)


def adapter_parameters(model: nn.Module) -> int:
    """Trainable parameters outside the head."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".head." not in f".{n}"
               and not n.startswith("head.") and "modules_to_save" not in n and ".copies." not in n)


def ours_model(model: nn.Module, kind: str, method: str, rank: int, task: Task, seed: int = 0) -> nn.Module:
    spec = targets(task)["ours"]
    return torch_sttp.add_adapters(model, kind, method, rank=rank, trainable="head", seed=seed, **spec)


def ours_parameter_count(layers: dict, kind: str, method: str, rank: int) -> int:
    """Adapter parameters of ours on layers {name: LayerInfo} at ``rank``, from the shapes alone: the stored
    reflector blocks of U and V plus the spectrum (see SpectralParametrization), or r·d_in reflectors (rotation)."""
    from torch_sttp.parametrizations import SpectralParametrization

    total = 0
    for info in layers.values():
        shape = tuple(info.weight_shape)  # Linear and Conv layouts (d_out, C_in, *kernel)
        d_in = math.prod(shape[1:])
        if kind == "rotation":
            total += min(rank, d_in - d_in % 2) * d_in
        else:
            p = SpectralParametrization(shape, rank, method, "free")
            total += p.u_side.numel + p.v_side.numel + p.r_mid
    return total


def matched_rank(task: Task, kind: str, method: str, budget: int, max_rank: int = 64) -> int:
    """The largest rank (even for rotation) whose adapter parameters do not exceed ``budget``."""
    layers = torch_sttp.adapters.adapter_info(ours_model(task.make_model(0), "delta", "svdp", 1, task)).layers
    best = None
    step = 2 if kind == "rotation" else 1
    for rank in range(step, max_rank + 1, step):
        if ours_parameter_count(layers, kind, method, rank) > budget:
            break
        best = rank
    if best is None:
        raise ValueError(f"{kind}-{method}: even the smallest rank exceeds the budget of {budget} parameters")
    return best


def build(task: Task, name: str, seed: int, ranks: dict) -> nn.Module:
    """A fresh model of ``task`` prepared for method ``name`` (trainable parameters set)."""
    model = task.make_model(seed)
    if name == "full":
        return model
    if name == "probe":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("head."))
        return model
    if name in PEFT_METHODS:
        return peft_model(model, name, task)
    kind, _, method = name.partition("-")
    return ours_model(model, kind, method or "svdp", ranks[name], task, seed)


# --------------------------------------------------------------------------------------------------- train, eval
def forward(model, inputs):
    return model(**inputs)


def accuracy(model: nn.Module, task: Task, split: str) -> tuple[float, torch.Tensor]:
    """(accuracy, logits) on a split, in eval mode without gradients."""
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = torch.cat([forward(model, inputs) for inputs, _ in task.batches(split, batch_size=128)])
    model.train(was)
    return float((logits.argmax(-1) == task.data[split][1]).float().mean()), logits


def train(model: nn.Module, task: Task, lr: float, seed: int, max_steps: int | None = None) -> list[float]:
    """AdamW on the trainable parameters for ``task.epochs`` epochs (or ``max_steps``); returns step times (s)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    times, step = [], 0
    for epoch in range(math.ceil(task.epochs)):
        for inputs, labels in task.batches("train", seed=seed * 1000 + epoch):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(forward(model, inputs), labels).backward()
            opt.step()
            times.append(time.perf_counter() - t)
            step += 1
            if max_steps is not None and step >= max_steps:
                return times
    return times


def merge_metrics(model: nn.Module, name: str, task: Task, logits: torch.Tensor, original: nn.Module) -> dict:
    """Merge time, merge error on the test split, and whether unloading gives the original weights bit for bit."""
    if name in ("probe", "full"):
        return {}
    twin = copy.deepcopy(model)
    t = time.perf_counter()
    merged = twin.merge_and_unload() if name in PEFT_METHODS else torch_sttp.merge_adapters(twin)
    merge_s = time.perf_counter() - t
    _, merged_logits = accuracy(merged, task, "test")
    error = float((merged_logits - logits).norm() / logits.norm())
    base = copy.deepcopy(model)
    base = base.unload() if name in PEFT_METHODS else torch_sttp.unload_adapters(base)
    ref = dict(original.named_parameters())
    exact = all(torch.equal(p, ref[n]) for n, p in base.named_parameters() if not n.startswith("head."))
    return {"merge_ms": 1e3 * merge_s, "merge_error": error, "unload_bit_exact": exact}


def peak_rss_growth_mib(model: nn.Module, task: Task, lr: float, steps: int = 3) -> float | None:
    """Peak RSS over ``steps`` training steps minus the RSS before them (MiB), or None without /proc. Meaningful in a
    fresh process only (:func:`memory_mode`): once earlier runs have grown the heap, the steps reuse freed pages."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = memory_status()["VmRSS"]
    except OSError:
        return None
    train(model, task, lr, seed=12345, max_steps=steps)
    return (memory_status()["VmHWM"] - before) / 1024


def memory_child(task_name: str, name: str, out: Path) -> dict:
    """One method's peak RSS growth over three training steps (rate 1e-3), in this (fresh) process."""
    task = text_task() if task_name == "text" else vision_task(out)
    ranks, _ = study_ranks(task, [name])
    model = build(task, name, 0, ranks)
    return {"task": task_name, "method": name, "rank": ranks.get(name),
            "adapter_params": adapter_parameters(model),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "peak_rss_growth_mib": peak_rss_growth_mib(model, task, 1e-3)}


def memory_mode(args, log) -> dict:
    """Every (task, method) of ``--memory`` in its own process, so that each starts from an unused heap."""
    rows = []
    for task_name in args.tasks:
        for name in args.methods or METHODS:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", f"{task_name}:{name}",
                   "--threads", str(args.threads), "--out", args.out]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                raise RuntimeError(f"memory child {task_name}:{name} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(found[-1][len("RESULT "):]))
            log(json.dumps(rows[-1]))
    return {"rows": rows, "python": sys.version.split()[0], "torch": torch.__version__}


def memory_status() -> dict[str, int]:
    """The kB fields of /proc/self/status (VmRSS, VmHWM, …)."""
    text = Path("/proc/self/status").read_text()
    pairs = (line.split(":", 1) for line in text.splitlines() if line.endswith(" kB"))
    return {key: int(value.split()[0]) for key, value in pairs}


def run_one(task: Task, name: str, lr: float, seed: int, ranks: dict, max_steps: int | None) -> dict:
    """Train one (method, rate, seed) and evaluate it."""
    model = build(task, name, seed, ranks)
    original = task.make_model(seed)
    times = train(model, task, lr, seed, max_steps)
    val, _ = accuracy(model, task, "val")
    test, logits = accuracy(model, task, "test")
    row = {"task": task.name, "method": name, "lr": lr, "seed": seed, "rank": ranks.get(name),
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "adapter_params": adapter_parameters(model), "val_acc": val, "test_acc": test,
           "step_ms": 1e3 * statistics.median(times[min(2, len(times) - 1):]), "steps": len(times)}
    row.update(merge_metrics(model, name, task, logits, original))
    return row


# ---------------------------------------------------------------------------------------------------------- study
def study_ranks(task: Task, methods: list[str]) -> tuple[dict, int]:
    """Our methods' ranks matched to LoRA r=8's adapter parameters (the budget, also returned)."""
    budget = adapter_parameters(peft_model(task.make_model(0), "lora", task))
    ranks = {}
    for name in methods:
        if name not in METHODS[:2] + PEFT_METHODS:
            kind, _, method = name.partition("-")
            ranks[name] = matched_rank(task, kind, method or "svdp", budget)
    return ranks, budget


def run_task(task: Task, methods: list[str], lrs: list[float], seeds: list[int], max_steps, log) -> list[dict]:
    ranks, budget = study_ranks(task, methods)
    log(f"{task.name}: LoRA r=8 budget {budget} adapter parameters; matched ranks {ranks}")
    rows = []
    for name in methods:
        for lr in lrs:
            for seed in seeds:
                row = run_one(task, name, lr, seed, ranks, max_steps)
                row["budget"] = budget
                rows.append(row)
                log(json.dumps(row))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per task and method: the rate with the best mean validation accuracy, and the means at that rate."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for name in dict.fromkeys(r["method"] for r in rows if r["task"] == task):
            mine = [r for r in rows if r["task"] == task and r["method"] == name]
            by_lr = {lr: [r for r in mine if r["lr"] == lr] for lr in dict.fromkeys(r["lr"] for r in mine)}
            lr = max(by_lr, key=lambda k: statistics.mean(r["val_acc"] for r in by_lr[k]))
            chosen = by_lr[lr]
            entry = {"task": task, "method": name, "lr": lr, "rank": chosen[0]["rank"],
                     "adapter_params": chosen[0]["adapter_params"], "trainable": chosen[0]["trainable"],
                     "budget": chosen[0]["budget"], "seeds": len(chosen)}
            for key in ("val_acc", "test_acc", "step_ms", "merge_ms", "merge_error"):
                values = [r[key] for r in chosen if r.get(key) is not None]
                entry[key] = statistics.mean(values) if values else None
            entry["test_std"] = statistics.pstdev([r["test_acc"] for r in chosen])
            entry["unload_bit_exact"] = all(r.get("unload_bit_exact", True) for r in chosen)
            out.append(entry)
    return out


def target(name: str, ratio: float, goal: float, higher_is_better: bool = False) -> str:
    ok = ratio >= goal if higher_is_better else ratio <= goal
    return f"TARGET {name} ratio={ratio:.4g} goal={goal} {'PASS' if ok else 'FAIL'}"


def study_targets(summary: list[dict]) -> list[str]:
    lines = []
    ours = {n for n in METHODS if n not in ["probe", "full"] + PEFT_METHODS}
    for task in dict.fromkeys(s["task"] for s in summary):
        entries = {s["method"]: s for s in summary if s["task"] == task}
        candidates = [s for n, s in entries.items() if n in ours and s["adapter_params"] <= s["budget"]]
        if "lora" in entries and candidates:
            best = max(candidates, key=lambda s: s["val_acc"])  # chosen on validation
            lines.append(target(f"{task}_accuracy", best["test_acc"] / entries["lora"]["test_acc"], 1.0, True)
                         + f"  (ours: {best['method']})")
    errors = [s["merge_error"] for s in summary if s["method"] in ours and s["merge_error"] is not None]
    if errors:
        lines.append(target("merge_error", max(errors) / 1e-6, 1.0))
    exact = all(s["unload_bit_exact"] for s in summary if s["method"] in ours)
    lines.append(target("unload_bit_exact", 1.0 if exact else 0.0, 1.0, True))
    return lines


def plot_study(summary: list[dict], path: Path) -> None:
    """Test accuracy against trainable parameters, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(s["task"] for s in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for s in (s for s in summary if s["task"] == task):
            ax.errorbar(s["trainable"], s["test_acc"], yerr=s["test_std"], fmt="o", capsize=3)
            ax.annotate(s["method"], (s["trainable"], s["test_acc"]), fontsize=8, xytext=(4, 2),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (incl. head)")
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def estimate_seconds(rows: list[dict], full: dict) -> float:
    """The study's time from the measured step times: (methods × rates × seeds × steps per run) per task, plus an
    evaluation overhead of 20 % (measured in quick runs)."""
    total = 0.0
    for task in dict.fromkeys(r["task"] for r in rows):
        steps = full[task]["steps"]
        for name in dict.fromkeys(r["method"] for r in rows if r["task"] == task):
            step_ms = statistics.median(r["step_ms"] for r in rows if r["task"] == task and r["method"] == name)
            total += 1.2 * step_ms / 1e3 * steps * full["lrs"] * full["seeds"]
    return total


# ------------------------------------------------------------------------------------------------------ step time
def step_time_models(task: Task, with_hra: bool) -> dict[str, nn.Module]:
    """LoRA r=8 (PEFT), rotation r=8 and r=32 (ours), optionally HRA r=8 (PEFT), full fine-tuning; seed 0."""
    models = {"lora_r8": peft_model(task.make_model(0), "lora", task)}
    for rank in (8, 32):
        models[f"rotation_r{rank}"] = ours_model(task.make_model(0), "rotation", "svdp", rank, task)
    if with_hra:
        models["hra_r8"] = peft_model(task.make_model(0), "hra", task)
    models["full"] = task.make_model(0)
    return models


def time_steps(models: dict[str, nn.Module], inputs: dict, labels: torch.Tensor, rounds: int,
               warmup: int, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds of one training step per model, the models interleaved round by round (load changes hit all);
    ``clock``: "wall" (elapsed) or "cpu" (the process's CPU time, which leaves out the waits for a core on a
    shared machine; meaningful with one thread)."""
    now = CLOCKS[clock]
    steps = {}
    for name, model in models.items():
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(forward(model, inputs), labels).backward()
            opt.step()

        steps[name] = step
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t = now()
            step()
            times[name].append(now() - t)
    return times


def step_time_mode(args, log) -> dict:
    task = text_task()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(task.data["train"][1].shape[0], generator=gen)[:16]
    inputs = {k: v[idx] for k, v in task.data["train"][0].items()}
    width = int(inputs["attention_mask"].sum(1).max())
    inputs = {k: v[:, :width] for k, v in inputs.items()}  # padded to the longest of the batch (≤ 128)
    labels = task.data["train"][1][idx]
    models = step_time_models(task, args.with_hra)
    load = load_average()
    times = time_steps(models, inputs, labels, args.rounds, args.warmup, args.clock)
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    paths = {name: sorted({layer.last_path for _, layer in adapter_layers(models[name])})
             for name in ("rotation_r8", "rotation_r32")}
    result = {"batch": 16, "tokens": width, "threads": torch.get_num_threads(), "rounds": args.rounds,
              "clock": args.clock, "load_before": load, "load_after": load_average(),
              "median_ms": median, "min_ms": {name: min(t) * 1e3 for name, t in times.items()},
              "rotation_paths": paths,
              "ratio_to_lora": {n: m / median["lora_r8"] for n, m in median.items()}}
    log(f"{args.clock} clock, {width} tokens, load {load} before, {result['load_after']} after; rotation paths "
        + ", ".join(f"{name}: {'/'.join(p)}" for name, p in paths.items()))
    for name in median:
        log(f"{name:12s} {median[name]:9.1f} ms  ×{result['ratio_to_lora'][name]:.2f} of LoRA r=8   "
            f"(fastest round {result['min_ms'][name]:.1f} ms)")
    for rank in (8, 32):
        log(target(f"rotation_r{rank}_step", result["ratio_to_lora"][f"rotation_r{rank}"], 1.25))
    return result


def write_csv(rows: list[dict], path: Path) -> None:
    """``rows`` as CSV (the union of their keys as the header, in first-seen order)."""
    import csv

    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    """The per-run rows of a study: the ``rows`` of its JSON result, or the JSON lines of its log (an unfinished
    study), with each method's peak RSS growth where the log has it."""
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)["rows"]
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"task"')]


def combine_mode(args, log) -> dict:
    """Summary, targets, CSV files and plot of the rows of several study results or logs (e.g. one per task)."""
    rows = [r for path in args.combine for r in read_rows(Path(path))]
    summary = summarize(rows)
    lines = study_targets(summary)
    for line in lines:
        log(line)
    out = Path(args.out)
    write_csv(rows, out / "study_rows.csv")
    write_csv(summary, out / "study_summary.csv")
    plot_study(summary, Path(args.plot) if args.plot else out / "adapters_study.png")
    return {"sources": [str(p) for p in args.combine], "summary": summary, "targets": lines,
            "python": sys.version.split()[0], "torch": torch.__version__}


# ----------------------------------------------------------------------------------------------------------- main
def study_mode(args, log) -> dict:
    lrs = args.lrs or ([1e-3, 3e-3] if args.quick else [1e-4, 3e-4, 1e-3, 3e-3])
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or (1 if args.quick else 3))))
    methods = args.methods or METHODS
    max_steps = args.max_steps or (4 if args.quick else None)
    out = Path(args.out)
    rows = []
    full_steps = {}
    for name in args.tasks:
        task = text_task() if name == "text" else vision_task(out)
        full_steps[name] = {"steps": math.ceil(task.epochs) * math.ceil(task.data["train"][1].shape[0]
                                                                        / task.batch_size)}
        if args.quick:
            task.epochs = 1
        rows += run_task(task, methods, lrs, seeds, max_steps, log)
    summary = summarize(rows)
    lines = study_targets(summary)
    for line in lines:
        log(line)
    plot_study(summary, out / "adapters_study.png")
    estimate = estimate_seconds(rows, {**full_steps, "lrs": 4, "seeds": 3})
    log(f"estimated full study: {estimate / 3600:.2f} h at {torch.get_num_threads()} thread(s) "
        f"({len(METHODS)} methods × 4 rates × 3 seeds per task)")
    return {"rows": rows, "summary": summary, "targets": lines, "estimated_full_seconds": estimate,
            "python": sys.version.split()[0], "torch": torch.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", action="store_true", help="run the accuracy study (default: the step time)")
    parser.add_argument("--step-time", action="store_true", help="time one training step on MiniLM (default)")
    parser.add_argument("--quick", action="store_true", help="study: 1 seed, 2 rates, 4 steps per run")
    parser.add_argument("--tasks", nargs="+", default=["text", "vision"], choices=["text", "vision"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    parser.add_argument("--lrs", nargs="+", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick: 1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first-seed … first-seed + seeds − 1 (to add seeds to an earlier run; --combine)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on the training steps of each run")
    parser.add_argument("--rounds", type=int, default=15, help="step time: timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="step time: warm-up steps per model")
    parser.add_argument("--with-hra", action="store_true", help="step time: also PEFT's HRA r=8 (slow)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="step time: wall time, or the process's CPU time (with --threads 1 on a shared machine)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--combine", nargs="+", metavar="FILE", default=None,
                        help="summarize the rows of study results (.json) or logs instead of running anything")
    parser.add_argument("--memory", action="store_true", help="peak RSS growth of three training steps, one fresh "
                        "process per task and method")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--plot", default=None, help="combine: path of the plot (default: <out>/adapters_study.png)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "data" / "adapters"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.memory_child:
        task_name, name = args.memory_child.split(":")
        print("RESULT " + json.dumps(memory_child(task_name, name, out)))
        return 0
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, {args.threads} thread(s)")
    if args.combine:
        result = combine_mode(args, log)
        name = "study_combined.json"
    elif args.memory:
        result = memory_mode(args, log)
        name = "memory.json"
    elif args.study:
        result = study_mode(args, log)
        name = "study_quick.json" if args.quick else "study.json"
    else:
        result = step_time_mode(args, log)
        name = "step_time.json"
    (out / name).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
