#!/usr/bin/env bash
# The paper's own CIFAR-10 models: train VGG11-BN and ResNet18 from scratch (experiments/train_cifar.py),
# then run the data-free grid (experiments/data_free.py) on each, l1 first, then Taylor and LAMP.
# Every stage has a wall-clock allowance, so the whole job fits a fixed budget (we ran it on one H200
# within a 10-minute device allowance); stopped stages resume when the script is run again.
#
#   OUT=results/paper_models RUNS=runs bash experiments/paper_models.sh
#
# Settings (environment): VGG_EPOCHS, R18_EPOCHS (each halves its lr every EPOCHS/10 epochs, the
# paper's 300-epoch schedule compressed), VGG_TIME, R18_TIME (training seconds), GRID_TIME (seconds per
# grid), BUDGET (seconds for the whole script; the last grids share what is left), METHODS,
# TRAIN_LIMIT / TEST_LIMIT (class-balanced subsets, for a quick check), FUSION_DEVICE (cpu|default).
set -uo pipefail
OUT=${OUT:-results/paper_models}
RUNS=${RUNS:-runs}
VGG_EPOCHS=${VGG_EPOCHS:-60}; R18_EPOCHS=${R18_EPOCHS:-40}
VGG_TIME=${VGG_TIME:-150}; R18_TIME=${R18_TIME:-170}; GRID_TIME=${GRID_TIME:-75}
FUSION_DEVICE=${FUSION_DEVICE:-cpu}; METHODS=${METHODS:-default if_paper if_bary}
DEADLINE=$(( $(date +%s) + ${BUDGET:-86400} ))
left() { local s=$(( DEADLINE - $(date +%s) )); echo $(( s > 1 ? s : 1 )); }
at_most() { echo $(( $1 < $(left) ? $1 : $(left) )); }
limits=(); [ -n "${TRAIN_LIMIT:-}" ] && limits+=(--train-limit "$TRAIN_LIMIT")
test_limit=(); [ -n "${TEST_LIMIT:-}" ] && test_limit+=(--test-limit "$TEST_LIMIT")
grid_limit=(); [ -n "${TEST_LIMIT:-}" ] && grid_limit+=(--limit "$TEST_LIMIT")
mkdir -p "$OUT" "$RUNS"

train() {  # model epochs seconds
  python experiments/train_cifar.py --model "$1" --epochs "$2" --halve-every $(( $2 >= 10 ? $2 / 10 : 1 )) \
    --time-limit "$3" --checkpoint-every 10 --checkpoint-dir "$RUNS/$1" --out "$RUNS/$1/final" \
    "${limits[@]}" "${test_limit[@]}" && cp "$RUNS/$1/final_history.json" "$OUT/$1_history.json"
}
grid() {  # seconds model importance...
  local seconds=$1 model=$2; shift 2
  timeout "$seconds" python experiments/data_free.py --model "$model" --checkpoint "$RUNS/$model/final" \
    --importance "$@" --fusion-device "$FUSION_DEVICE" --methods $METHODS --out "$OUT/$model" "${grid_limit[@]}" \
    || echo "grid $model $*: stopped (rerun to resume)"
}

train vgg11_bn "$VGG_EPOCHS" "$(at_most "$VGG_TIME")" && grid "$(at_most "$GRID_TIME")" vgg11_bn l1
train resnet18 "$R18_EPOCHS" "$(at_most "$R18_TIME")" && grid "$(at_most "$GRID_TIME")" resnet18 l1
grid $(( $(left) / 2 )) vgg11_bn l1 taylor lamp
grid "$(left)" resnet18 l1 taylor lamp
