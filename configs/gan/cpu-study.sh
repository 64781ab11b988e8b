#!/usr/bin/env bash
# CPU-scale MNIST 5k GAN study of docs/results-gan.md (Table 1-like and Table 2-like settings).
#
#   configs/gan/cpu-study.sh train ROOT DEADLINE_MIN "SEEDS"   # train every config x seed, seed-major order;
#                                                           # no new run starts after DEADLINE_MIN minutes
#   configs/gan/cpu-study.sh inception ROOT N               # Inception KID/FID on N samples for finished runs
#                                                           # not yet evaluated on N (SEEDS=0: seed-0 runs only)
#   configs/gan/cpu-study.sh summarize ROOT                 # markdown tables of the finished runs
#
# CONFIGS overrides the list and order of configs/gan/mnist5k-cpu-<name>.yaml settings.
# STEPS overrides the configs' generator steps; INCEPTION=N scores each run on N samples right after it trains
# (the real features must be cached in ROOT/cache already, e.g. copied from an earlier study root).
# WORKERS (default 2) runs execute in parallel, each with one torch thread.  Run it niced in the background, e.g.
#   nohup nice -n 10 configs/gan/cpu-study.sh train runs/gan-cpu 100 "0 1 2" > runs/gan-cpu-train.log 2>&1 &
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-.}
WORKERS=${WORKERS:-2}
mode=$1
root=$2
mkdir -p "$root/logs" "$root/cache"
CONFIGS=${CONFIGS:-"table1-sn table1-sr table1-svdp-c table1-sttp-c table2-svdp-c table2-sttp-c table2-svdp-l \
table2-sttp-l table2-svdp-r table2-sttp-r table2-sn"}

case "$mode" in
train)
    deadline=$(( $(date +%s) + ${3:-100} * 60 ))
    seeds=${4:-"0 1 2"}
    # the mode-coverage classifier is trained once, before the parallel runs share it
    $PY -c "from torch_sttp.experiments.metrics import get_classifier as g; import torch; torch.set_num_threads(1); \
print(g('mnist5k', None, 32, 1, '$root/cache', 'cpu', epochs=4, progress=False)[1])"
    for s in $seeds; do for c in $CONFIGS; do echo "$c $s"; done; done |
    DEADLINE=$deadline ROOT=$root PY=$PY STEPS=${STEPS:-} INCEPTION=${INCEPTION:-} xargs -P "$WORKERS" -L 1 bash -c '
        c=$0; s=$1; out=$ROOT/mnist5k-cpu-$c-s$s
        if [ "$(date +%s)" -ge "$DEADLINE" ]; then echo "skip $c seed $s (deadline)"; exit 0; fi
        # a run folder that exists belongs to a finished, running or interrupted run: never start it twice
        # (resume an interrupted one by hand with the same command)
        if ! mkdir "$out" 2>/dev/null; then echo "exists, skipped: $out"; exit 0; fi
        echo "$(date +%T) start $c seed $s"
        common="--config configs/gan/mnist5k-cpu-$c.yaml --seed $s --out $out --cache-dir $ROOT/cache --no-progress \
${STEPS:+--steps $STEPS}"
        $PY -m torch_sttp.experiments.gan $common > "$ROOT/logs/$c-s$s.log" 2>&1
        echo "$(date +%T) end $c seed $s rc=$?"
        if [ -n "$INCEPTION" ]; then
            $PY -m torch_sttp.experiments.gan $common --eval-only --metrics kid,fid \
                --inception-samples "$INCEPTION" > "$ROOT/logs/inception-$c-s$s.log" 2>&1
            echo "$(date +%T) inception $c seed $s rc=$?"
        fi'
    ;;
inception)
    n=${3:-100}
    runs=$(for d in "$root"/mnist5k-cpu-*-s${SEEDS:-*}; do [ -f "$d/summary.json" ] && echo "$d"; done)
    first=1
    for d in $runs; do
        # done already at this sample count (a run evaluated on fewer samples is evaluated again)
        if grep -q "\"inception_samples\": $n," "$d/summary.json"; then continue; fi
        stem=$(basename "$d"); c=${stem#mnist5k-cpu-}; s=${c##*-s}; c=${c%-s*}
        cmd="$PY -m torch_sttp.experiments.gan --config configs/gan/mnist5k-cpu-$c.yaml --seed $s --out $d \
--cache-dir $root/cache --no-progress --eval-only --metrics kid,fid --inception-samples $n"
        if [ $first = 1 ]; then  # computes and caches the real features alone
            echo "$(date +%T) inception $stem"; $cmd > "$root/logs/inception-$stem.log" 2>&1; first=0
        else
            echo "$cmd > $root/logs/inception-$stem.log 2>&1"
        fi
    done | grep -v '^[0-9][0-9]:' | xargs -P "$WORKERS" -I{} bash -c '{}; echo "$(date +%T) inception done"'
    ;;
summarize)
    mkdir -p "$root/figures"
    $PY -m torch_sttp.experiments.gan --summarize "$root" --plot "$root/figures/curves.png"
    ;;
*)
    echo "unknown mode $mode" >&2; exit 2;;
esac
