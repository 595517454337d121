#!/usr/bin/env bash
# Train + evaluate every row of experiments/quality/README.md, serially (2 CPU cores).
# Prerequisites (see README.md): the eval set in $EVAL (make_eval_set.py) and the mined
# shard directories in $EXP/neg_* (negjax mine ...). Usage: bash run_rows.sh ROW...
# rows: zeroshot inbatch margin_dedup topk window margin
set -u
export PATH=/work/venv/bin:$PATH
EXP=${EXP:-/tmp/exp}
EVAL=${EVAL:-$EXP/evalset}
RES=${RES:-$(cd "$(dirname "$0")" && pwd)/results}
CFG=experiments/configs/minilm-wordnet.toml
cd "$(dirname "$0")/../.."
mkdir -p "$RES"
ev() {  # ev MODEL NAME
  negjax eval --model "$1" --corpus "$EVAL/corpus.jsonl" --queries "$EVAL/queries.jsonl" \
    --qrels "$EVAL/qrels.tsv" --doc-max-length 64 --query-max-length 32 --json > "$RES/$2.json.tmp" \
    && mv "$RES/$2.json.tmp" "$RES/$2.json"
}
tr() {  # tr NAME [--set ...]
  local name=$1; shift
  negjax train --config $CFG --set workdir=$EXP/run_$name "$@"
}
for row in "$@"; do
  echo "=== $row start $(date +%T)"
  case $row in
    zeroshot) ev minilm zeroshot ;;
    inbatch) tr inbatch && ev $EXP/run_inbatch inbatch ;;
    margin_dedup) tr margin_dedup --set data.negatives=$EXP/neg_margin_dedup --set data.num_negatives=1 \
                    && ev $EXP/run_margin_dedup margin_dedup ;;
    margin) tr margin --set data.negatives=$EXP/neg_margin --set data.num_negatives=1 \
                    && ev $EXP/run_margin margin ;;
    topk) tr topk --set data.negatives=$EXP/neg_topk --set data.num_negatives=1 && ev $EXP/run_topk topk ;;
    window) tr window --set data.negatives=$EXP/neg_window --set data.num_negatives=1 \
                    --set data.negative_sampling=random && ev $EXP/run_window window ;;
    *) echo "unknown row $row"; exit 2 ;;
  esac
  echo "=== $row done $(date +%T) rc=$?"
  [ -f "$RES/$row.json" ] && cat "$RES/$row.json"
done
