#!/usr/bin/env bash
# session 16: classic 2-epoch references (glibc default, then with the same malloc settings by env), an A/B of
# keep_freed_memory on 2-epoch full-data runs, then padding 2 at 16 epochs, two seeds. One at a time.
set -x
cd "$(dirname "$0")/../../.."  # the repository root
P=.venv/bin/python
R=runs/levers-s16
date
[ -f $R/classic-ref-s16/metrics.jsonl ] || $P classic.py $R/classic-ref-s16 --data-dir data --epochs 2
date
[ -f $R/classic-ref-keep-s16/metrics.jsonl ] || MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_MMAP_MAX_=0 $P classic.py $R/classic-ref-keep-s16 --data-dir data --epochs 2
AB=(--recipe fast --crop-padding 2 --epochs 2 --warmup-epochs 0.4 --data-dir data --no-progress)
for i in 1 2; do
  date
  [ -f $R/ab-default-$i/metrics.jsonl ] || /usr/bin/time -f "ab-default-$i wall %e user %U sys %S minflt %R" $P results/time-to-accuracy/levers-s16/keep_memory_ab.py --default-malloc "${AB[@]}" --out $R/ab-default-$i --overwrite
  date
  [ -f $R/ab-keep-$i/metrics.jsonl ] || /usr/bin/time -f "ab-keep-$i wall %e user %U sys %S minflt %R" $P results/time-to-accuracy/levers-s16/keep_memory_ab.py "${AB[@]}" --out $R/ab-keep-$i --overwrite
done
date
PYTHON=$P /usr/bin/time -f "levers wall %e user %U sys %S minflt %R" bash results/time-to-accuracy/levers.sh data $R pad-2-16ep pad-2-16ep-seed1
date
