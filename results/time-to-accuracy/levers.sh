#!/usr/bin/env bash
# Time to accuracy (issue #16): each lever of the loop alone against one base run, then the levers that paid,
# together. Run it with nothing else on the machine (timings beside another job are worthless); it resumes:
# a finished run is skipped, an interrupted one continues from its checkpoint.
#
#   bash results/time-to-accuracy/levers.sh DATA_DIR [RUNS_DIR] [NAME ...]     # default: every run below
#
# Wall time is as in README's Speed table: the sum of the epochs' times (training pass + any evaluation).
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${1:?usage: levers.sh DATA_DIR [RUNS_DIR] [NAME ...]}
runs=${2:-runs/tta}
shift $(( $# < 2 ? $# : 2 ))
python=${PYTHON:-python}

base=(--recipe fast --epochs 12)  # 12 epochs: ~855 s on the Xeon the target was set on, at batch 128
# NAME "FLAGS on top of base", in the order they were added (the default: all of them)
levers=(
  base ""
  batch256 "--batch-size 256 --lr 0.4"             # the linear scaling rule: lr doubles with the batch
  flip-alternate "--flip alternate"
  crops-24-28 "--crop-sizes 24 24 24 24 28 28"    # 4 epochs on 24x24 crops, 2 on 28x28, then 32x32
  ema "--ema 0.999"
  amp "--amp"                                      # bf16 autocast: a CPU with AVX512-BF16 or AMX (session 10)
  zero-init "--zero-init-residual"                 # each block starts as the identity (session 11)
  wd-2.5e-4 "--weight-decay 2.5e-4"                # half the weight decay, for a run that underfits (session 11)
  base-seed1 "--seed 1"                            # the noise: the same base on a second seed (session 11)
  lr-0.4 "--lr 0.4"                                # twice the fast recipe's peak lr (session 12)
  lr-0.4-seed1 "--lr 0.4 --seed 1"
  pad-2 "--crop-padding 2"                         # crops shifted by up to 2 pixels, not 4 (session 12)
  pad-2-seed1 "--crop-padding 2 --seed 1"
  pad-1 "--crop-padding 1"
  pad-0 "--crop-padding 0"                         # flips only
  pad-2-alternate "--crop-padding 2 --flip alternate"
  pad-2-lr-0.1 "--crop-padding 2 --lr 0.1"         # half the fast recipe's peak lr (session 13)
  pad-2-batch64 "--crop-padding 2 --batch-size 64 --lr 0.1"    # twice the steps, the same lr per image
  pad-2-13ep "--crop-padding 2 --epochs 13 --eval-every 13"    # one more epoch, one test pass
  # planned in session 13 (pad-2-lr-0.1's seed 0 lost 0.87 points; batch64 gained nothing on seed 0); of these,
  # only pad-2-warmup-1 ran (session 14)
  pad-2-lr-0.1-seed1 "--crop-padding 2 --lr 0.1 --seed 1"
  pad-2-batch64-seed1 "--crop-padding 2 --batch-size 64 --lr 0.1 --seed 1"
  pad-2-warmup-1 "--crop-padding 2 --warmup-epochs 1"
  pad-2-compile "--crop-padding 2 --compile --eval-every 12"   # one test pass; compiling counts in epoch 1
  # session 14 (pad-2-13ep-compile-seed1 stopped in its first epoch: compile bought nothing on seed 0)
  pad-2-13ep-compile "--crop-padding 2 --epochs 13 --eval-every 13 --compile"
  pad-2-13ep-compile-seed1 "--crop-padding 2 --epochs 13 --eval-every 13 --compile --seed 1"
  pad-2-13ep-24x2 "--crop-padding 2 --epochs 13 --eval-every 13 --crop-sizes 24 24"    # 2 epochs on 24x24 crops
  pad-2-13ep-24x2-ls-0.2 "--crop-padding 2 --epochs 13 --eval-every 13 --crop-sizes 24 24 --label-smoothing 0.2"
  pad-2-ls-0.2 "--crop-padding 2 --label-smoothing 0.2 --eval-every 12"    # ran as a trial preset (README.md here)
  pad-2-ls-0.2-seed1 "--crop-padding 2 --label-smoothing 0.2 --eval-every 12 --seed 1"
  pad-2-14ep "--crop-padding 2 --epochs 14 --eval-every 14"    # how many epochs padding 2 needs on this CPU
  # session 15: the peak lr between 0.2 (the fast recipe) and 0.4, which lost nothing at padding 4 (session 12)
  pad-2-lr-0.3 "--crop-padding 2 --lr 0.3 --eval-every 12"
  pad-2-lr-0.3-seed1 "--crop-padding 2 --lr 0.3 --eval-every 12 --seed 1"
  # session 15: progressive resizing by downscaling whole images (--resize-to), 16 epochs in the time of ~12
  pad-2-16ep-rz "--crop-padding 2 --epochs 16 --resize-to 16 16 20 20 24 24 24"
  pad-2-16ep-rz-seed1 "--crop-padding 2 --epochs 16 --resize-to 16 16 20 20 24 24 24 --seed 1"
  # does padding 2 still lead padding 4 at 18 epochs (the length --amp affords on an AMX Xeon)?
  pad-2-18ep "--crop-padding 2 --epochs 18 --eval-every 2"
  pad-4-18ep "--epochs 18 --eval-every 2"
  # for a CPU with AMX (bf16), where --amp affords 18 epochs in a quarter of the classic run (session 19: both pass)
  amp-pad-2-18ep "--amp --crop-padding 2 --epochs 18 --eval-every 18"
  amp-pad-2-18ep-seed1 "--amp --crop-padding 2 --epochs 18 --eval-every 18 --seed 1"
  # session 16, with freed memory kept in the process (config.keep_freed_memory): between 14 and 18 epochs
  pad-2-16ep "--crop-padding 2 --epochs 16 --eval-every 16"
  pad-2-16ep-seed1 "--crop-padding 2 --epochs 16 --eval-every 16 --seed 1"
  pad-2-16ep-seed2 "--crop-padding 2 --epochs 16 --eval-every 16 --seed 2"    # session 17: a third seed
  pad-2-seed2 "--crop-padding 2 --eval-every 12 --seed 2"    # session 17: a third seed of 12 epochs at padding 2
  # for a CPU with AMX (bf16): --recipe fast16 --amp with one test pass (written out: base's --epochs 12 would win);
  # session 19: 86.19% and 86.26%, at the edge
  amp-fast16 "--amp --crop-padding 2 --epochs 16 --eval-every 16"
  amp-fast16-seed1 "--amp --crop-padding 2 --epochs 16 --eval-every 16 --seed 1"
  # session 18: no label smoothing, for a 12-epoch run that underfits (0.2 lost 0.35 and 0.31 points)
  pad-2-ls-0 "--crop-padding 2 --label-smoothing 0 --eval-every 12"
  pad-2-ls-0-seed1 "--crop-padding 2 --label-smoothing 0 --eval-every 12 --seed 1"    # stopped: seed 0 lost 0.82
  # the last epochs on the images as they are (no crop shift, no flip), while the learning rate is lowest
  pad-2-clean-1 "--crop-padding 2 --clean-epochs 1 --eval-every 12"
  pad-2-clean-2 "--crop-padding 2 --clean-epochs 2 --eval-every 12"
  pad-2-clean-1-seed1 "--crop-padding 2 --clean-epochs 1 --eval-every 12 --seed 1"
  pad-2-clean-2-seed1 "--crop-padding 2 --clean-epochs 2 --eval-every 12 --seed 1"
  # conv1 starts as a whitening of 3x3 patches (airbench's first layer, trained here)
  pad-2-whiten "--crop-padding 2 --whiten-init --eval-every 12"
  pad-2-whiten-seed1 "--crop-padding 2 --whiten-init --eval-every 12 --seed 1"
)
declare -A lever=()
order=()
for ((i = 0; i < ${#levers[@]}; i += 2)); do
  lever[${levers[i]}]=${levers[i + 1]}
  order+=("${levers[i]}")
done
# A run that evaluated more than once also gets an eval-last row, derived, not run: evaluation changes nothing in
# the training (tests/test_levers.py), so it is the run's training seconds plus its last evaluation.
names=("${@:-${order[@]}}")

for name in "${names[@]}"; do
  [[ -v "lever[$name]" ]] || { echo "levers.sh: unknown run $name (known: ${order[*]})" >&2; exit 2; }
  out="$runs/$name"
  if [[ -f "$out/last.pt" ]]; then
    $python train.py --resume "$out" --data-dir "$data" --no-progress
  else
    # shellcheck disable=SC2086  # the lever's flags are words
    $python train.py "${base[@]}" ${lever[$name]} --data-dir "$data" --out "$out" --no-progress
  fi
done

$python - "$runs" "${names[@]}" <<'EOF'
import json, sys
from runs import read_metrics
runs, names = sys.argv[1], sys.argv[2:]
print(f"{'run':<16}{'wall s':>9}{'train s':>9}{'eval s':>8}{'final test acc':>16}")
line = lambda name, wall, train, acc: print(f"{name:<16}{wall:>9.0f}{train:>9.0f}{wall - train:>8.0f}"
                                            f"{'' if acc is None else f'{100 * acc:.2f}%':>16}")
for name in names:
    rows = read_metrics(f"{runs}/{name}")
    batch = json.load(open(f"{runs}/{name}/config.json"))["config"]["batch_size"]
    trains = [50000 // batch * batch / r["images_per_s"] for r in rows]  # whole batches of the 50,000
    acc = rows[-1].get("test_acc") if rows else None
    line(name, sum(r["epoch_time_s"] for r in rows), sum(trains), acc)
    if sum("test_acc" in r for r in rows) > 1:  # derived: the same training, evaluated only after its last epoch
        line(f"{name} eval-last", sum(trains) + rows[-1]["epoch_time_s"] - trains[-1], sum(trains), acc)
EOF
