#!/usr/bin/env bash
# Train + evaluate rows of experiments/quality/README.md, serially (2 CPU cores).
# Prerequisites (see README.md): the eval set in $EVAL (make_eval_set.py) and the mined
# shard directories in $EXP/neg_* (negjax mine ...). Usage: bash run_rows.sh ROW...
# rows: zeroshot inbatch inbatch_s1 margin_dedup margin_dedup_s1 margin topk window h3
#       t0.01 t0.02 tlearn remine_margin remine_margin_s1 b128 st_zeroshot st_inbatch st_inbatch_s1 st_margin_dedup
set -u
export PATH=/work/venv/bin:$PATH
PY=${PY:-/work/venv/bin/python}
EXP=${EXP:-/tmp/exp}
EVAL=${EVAL:-$EXP/evalset}
RES=${RES:-$(cd "$(dirname "$0")" && pwd)/results}
CFG=experiments/configs/minilm-wordnet.toml
cd "$(dirname "$0")/../.."
mkdir -p "$RES/runs"
ev() {  # ev MODEL NAME
  negjax eval --model "$1" --corpus "$EVAL/corpus.jsonl" --queries "$EVAL/queries.jsonl" \
    --qrels "$EVAL/qrels.tsv" --doc-max-length 64 --query-max-length 32 --save-run "$RES/runs/$2.trec" --json > "$RES/$2.json.tmp" \
    && mv "$RES/$2.json.tmp" "$RES/$2.json"
}
tr() {  # tr NAME [--set ...]: negjax train with the recipe, then eval
  local name=$1; shift
  negjax train --config $CFG --set workdir=$EXP/run_$name "$@" && ev $EXP/run_$name $name
}
st() {  # st NAME [args...]: the sentence-transformers peer on negjax's batches, then its eval
  local name=$1; shift
  "$PY" experiments/peer/quality_vs_sentence_transformers.py --config $CFG --eval-dir "$EVAL" \
    --json "$RES/$name.json" --save-run "$RES/runs/$name.trec" "$@"
}
MARGIN="--set data.negatives=$EXP/neg_margin_dedup --set data.num_negatives=1"
for row in "$@"; do
  echo "=== $row start $(date +%T)"
  case $row in
    zeroshot) ev minilm zeroshot ;;
    inbatch) tr inbatch ;;
    inbatch_s1) tr inbatch_s1 --set train.seed=1 ;;
    margin_dedup) tr margin_dedup $MARGIN ;;
    margin_dedup_s1) tr margin_dedup_s1 $MARGIN --set train.seed=1 ;;
    margin) tr margin --set data.negatives=$EXP/neg_margin --set data.num_negatives=1 ;;
    topk) tr topk --set data.negatives=$EXP/neg_topk --set data.num_negatives=1 ;;
    window) tr window --set data.negatives=$EXP/neg_window --set data.num_negatives=1 \
              --set data.negative_sampling=random ;;
    h3) tr h3 --set data.negatives=$EXP/neg_margin_dedup --set data.num_negatives=3 ;;
    t0.01) tr t0.01 --set loss.temperature=0.01 ;;
    t0.02) tr t0.02 --set loss.temperature=0.02 ;;
    tlearn) tr tlearn --set loss.learnable_temperature=true ;;
    remine_margin_s1) tr remine_margin_s1 --set data.negatives=$EXP/neg_remined_margin \
              --set data.num_negatives=1 --set train.seed=1 ;;
    b128) tr b128 --set train.batch_size=128 ;;
    remine_margin)  # mine again with the in-batch row's checkpoint, then train from the start
      negjax mine --config $CFG --model $EXP/run_inbatch --out $EXP/neg_remined_margin \
          --relative-margin 0.05 --overwrite \
        && tr remine_margin --set data.negatives=$EXP/neg_remined_margin --set data.num_negatives=1 ;;
    st_zeroshot) st st_zeroshot --zero-shot ;;
    st_inbatch) st st_inbatch --seed 0 ;;
    st_inbatch_s1) st st_inbatch_s1 --seed 1 --set train.seed=1 ;;
    st_margin_dedup) st st_margin_dedup --seed 0 $MARGIN ;;
    *) echo "unknown row $row"; exit 2 ;;
  esac
  rc=$?
  echo "=== $row done $(date +%T) rc=$rc"
  [ -f "$RES/$row.json" ] && cat "$RES/$row.json"
done
