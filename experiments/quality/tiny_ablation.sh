#!/usr/bin/env bash
# Mining-strategy, batch-size and distillation rows of experiments/quality/README.md (section G),
# with the tiny model of matryoshka_guard.sh (experiments/configs/tiny-wordnet.toml: random-init
# 2-layer BERT, hidden 128) on the full built-in WordNet training data, 300 steps x 128 queries
# (38,400 examples) unless a row says otherwise, seed 0 unless _s1; eval on the fixed reduced set.
# The in-batch rows are matryoshka_guard.sh's base_s0 / base_s1 (same recipe, same workdirs).
#
# Negatives: a model trained from scratch has no useful zero-shot ranking, so the first mining
# round uses the in-batch model ($EXP/tiny_base_s0); "re-mined" is the second round, mined by
# the model trained on the margin-filtered negatives of the first (margin_s0).
#   mining:   mine_topk (top 32 of 102, no filter) | mine_window (random 32 of ranks 10-50)
#             mine_margin (positive-aware relative margin 0.05) | mine_remined (margin, round 2)
#   rows:     topk window margin h3 h7 mix0 mix05 curric remined   (each _s0 / _s1)
#             batch32 batch512 batch1024 batch2048 batch4096 (equal examples: 38,400 / B steps)
#             teacher (all-MiniLM-L6-v2 fine-tuned, then scoring the margin candidates)
#             tfile_s0 tfile_s1 (teacher file, no distillation) | distill_s0 distill_s1 (loss.distill=kl)
# Usage: bash experiments/quality/tiny_ablation.sh ROW...
set -eu
PY=${PY:-$(pwd)/.venv/bin/python}
EXP=${EXP:-/tmp/exp}
EVAL=${EVAL:-$EXP/evalset}
RES=${RES:-$(cd "$(dirname "$0")" && pwd)/results/tiny}
CFG=experiments/configs/tiny-wordnet.toml
cd "$(dirname "$0")/../.."
mkdir -p "$RES/runs" "$RES/metrics"
[ -f "$EVAL/qrels.tsv" ] || "$PY" experiments/quality/make_eval_set.py --out "$EVAL" --queries 1000 --corpus-size 10000 --seed 0
ev() {  # ev WORKDIR NAME
  "$PY" -m negjax eval --model "$1" --corpus "$EVAL/corpus.jsonl" --queries "$EVAL/queries.jsonl" \
    --qrels "$EVAL/qrels.tsv" --doc-max-length 64 --query-max-length 32 \
    --save-run "$RES/runs/$2.trec" --json > "$RES/$2.json.tmp" && mv "$RES/$2.json.tmp" "$RES/$2.json"
  cp "$1/metrics.jsonl" "$RES/metrics/$2.jsonl" 2>/dev/null || true
}
tr() {  # tr NAME STEPS BATCH [--set ...]
  local name=$1 steps=$2 batch=$3; shift 3
  local t0=$SECONDS
  "$PY" -m negjax train --config $CFG --set workdir=$EXP/tiny_$name --set train.steps=$steps \
    --set train.batch_size=$batch --set train.warmup_steps=$(( steps / 10 > 0 ? steps / 10 : 1 )) \
    --set checkpoint.every_steps=$steps --set eval.split=none "$@"
  echo "$name trained in $((SECONDS - t0)) s"
  ev $EXP/tiny_$name $name
}
mine() {  # mine OUT MODEL [options]
  local out=$1 model=$2; shift 2
  "$PY" -m negjax mine --config $CFG --model "$model" --index exact --out "$EXP/$out" "$@"
  cp "$EXP/$out/report.json" "$RES/metrics/$out.report.json"
}
neg() { echo "--set data.negatives=$EXP/$1 --set data.num_negatives=${2:-1}"; }
seed() { case $1 in *_s1) echo "--set train.seed=1" ;; esac; }
TFILE=$EXP/teacher_train.jsonl
row() {
  local r=$1 base=${1%_s[01]}
  case $base in
    mine_topk) mine tneg_topk $EXP/tiny_base_s0 --sampling top --no-dedup-text ;;
    mine_window) mine tneg_window $EXP/tiny_base_s0 --rank-range 10:50 --sampling random --no-dedup-text ;;
    mine_margin) mine tneg_margin $EXP/tiny_base_s0 --relative-margin 0.05 ;;
    mine_remined) mine tneg_remined $EXP/tiny_margin_s0 --relative-margin 0.05 ;;
    topk) tr $r 300 128 $(neg tneg_topk) $(seed $r) ;;
    window) tr $r 300 128 $(neg tneg_window) $(seed $r) ;;
    margin) tr $r 300 128 $(neg tneg_margin) $(seed $r) ;;
    h3) tr $r 300 128 $(neg tneg_margin 3) $(seed $r) ;;
    h7) tr $r 300 128 $(neg tneg_margin 7) $(seed $r) ;;
    mix0) tr $r 300 128 $(neg tneg_margin) --set data.negative_mix=0.0 $(seed $r) ;;
    mix05) tr $r 300 128 $(neg tneg_margin) --set data.negative_mix=0.5 $(seed $r) ;;
    curric) tr $r 300 128 $(neg tneg_margin) --set data.curriculum_start_rank=16 --set data.curriculum_steps=240 $(seed $r) ;;
    remined) tr $r 300 128 $(neg tneg_remined) $(seed $r) ;;
    batch*) local b=${base#batch}; tr $r $(( (38400 + b / 2) / b )) $b $(seed $r) ;;
    teacher)  # the teacher: all-MiniLM-L6-v2 fine-tuned with the recipe of the MiniLM rows
      "$PY" -m negjax train --config experiments/configs/minilm-wordnet.toml --set workdir=$EXP/minilm_teacher
      "$PY" experiments/quality/teacher_scores.py --teacher $EXP/minilm_teacher \
        --negatives $EXP/tneg_margin --out $TFILE --max-negatives 3 | tee "$RES/metrics/teacher_file.json" ;;
    tfile) tr $r 300 128 --set data.train=$TFILE --set data.num_negatives=3 $(seed $r) ;;
    distill) tr $r 300 128 --set data.train=$TFILE --set data.num_negatives=3 --set loss.distill=kl \
               --set loss.distill_weight=1.0 --set loss.teacher_temperature=0.05 $(seed $r) ;;
    *) echo "unknown row $r" >&2; exit 2 ;;
  esac
}
for r in "$@"; do
  if [ -f "$RES/$r.json" ] || [ -f "$RES/metrics/tneg_${r#mine_}.report.json" ] || { [ $r = teacher ] && [ -f $TFILE ]; }; then
    echo "$r: done before"; continue
  fi
  row "$r"
done
