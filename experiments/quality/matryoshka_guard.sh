#!/usr/bin/env bash
# Matryoshka and false-negative-guard rows of experiments/quality/README.md, with the tiny
# model (experiments/configs/tiny-wordnet.toml: 2 layers, hidden 128, built-in tokenizer,
# random init) on the full built-in WordNet training data, 300 steps x 128 queries (38,400
# examples, 0.89 epoch), in-batch negatives, eval.split none. Evaluated on the fixed reduced
# eval set ($EVAL, make_eval_set.py) with `negjax eval --dim K`.
#   rows: base_s0 base_s1 (plain) | mrl_s0 mrl_s1 (loss.matryoshka_dims=[128,64,32,16])
#         d64 d32 d16 (loss.matryoshka_dims=[K]: single-size training, same budget)
#         guard_s0 guard_s1 (loss.false_negative_margin=0.1)
# Usage: bash experiments/quality/matryoshka_guard.sh [ROW...]   (default: all, serially)
set -eu
PY=${PY:-$(pwd)/.venv/bin/python}
EXP=${EXP:-/tmp/exp}
EVAL=${EVAL:-$EXP/evalset}
RES=${RES:-$(cd "$(dirname "$0")" && pwd)/results/tiny}
CFG=experiments/configs/tiny-wordnet.toml
cd "$(dirname "$0")/../.."
mkdir -p "$RES/runs"
[ -f "$EVAL/qrels.tsv" ] || "$PY" experiments/quality/make_eval_set.py --out "$EVAL" --queries 1000 --corpus-size 10000 --seed 0
ev() {  # ev WORKDIR NAME [--dim K]
  local w=$1 name=$2; shift 2
  "$PY" -m negjax eval --model "$w" --corpus "$EVAL/corpus.jsonl" --queries "$EVAL/queries.jsonl" \
    --qrels "$EVAL/qrels.tsv" --doc-max-length 64 --query-max-length 32 \
    --save-run "$RES/runs/$name.trec" --json "$@" > "$RES/$name.json.tmp" && mv "$RES/$name.json.tmp" "$RES/$name.json"
}
tr() {  # tr NAME [--set ...]
  local name=$1; shift
  local t0=$SECONDS
  "$PY" -m negjax train --config $CFG --set workdir=$EXP/tiny_$name --set train.steps=300 \
    --set train.warmup_steps=30 --set checkpoint.every_steps=300 --set eval.split=none "$@"
  echo "$name trained in $((SECONDS - t0)) s"
}
MRL='loss.matryoshka_dims=[128, 64, 32, 16]'
row() {
  case $1 in
    base_s0) tr base_s0; for k in 128 64 32 16; do ev $EXP/tiny_base_s0 base_s0_d$k --dim $k; done ;;
    base_s1) tr base_s1 --set train.seed=1; for k in 128 64 32 16; do ev $EXP/tiny_base_s1 base_s1_d$k --dim $k; done ;;
    mrl_s0) tr mrl_s0 --set "$MRL"; for k in 128 64 32 16; do ev $EXP/tiny_mrl_s0 mrl_s0_d$k --dim $k; done ;;
    mrl_s1) tr mrl_s1 --set "$MRL" --set train.seed=1; for k in 128 64 32 16; do ev $EXP/tiny_mrl_s1 mrl_s1_d$k --dim $k; done ;;
    d64|d32|d16) k=${1#d}; tr $1 --set "loss.matryoshka_dims=[$k]"; ev $EXP/tiny_$1 single_d$k --dim $k ;;
    guard_s0) tr guard_s0 --set loss.false_negative_margin=0.1; ev $EXP/tiny_guard_s0 guard_s0 ;;
    guard_s1) tr guard_s1 --set loss.false_negative_margin=0.1 --set train.seed=1; ev $EXP/tiny_guard_s1 guard_s1 ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}
ROWS=${*:-base_s0 mrl_s0 d64 d32 d16 guard_s0 base_s1 mrl_s1 guard_s1}
for r in $ROWS; do row "$r"; done
