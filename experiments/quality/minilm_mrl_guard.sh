#!/usr/bin/env bash
# Matryoshka at 384/256/128/64 and the false-negative guard with all-MiniLM-L6-v2, on the
# recipe of every MiniLM row (experiments/configs/minilm-wordnet.toml: 150 steps x 32 queries,
# in-batch negatives, temperature 0.05, lr 2e-5). Evaluated on the fixed reduced eval set
# ($EVAL, make_eval_set.py); `negjax eval --dim 384,256,128,64` writes one result per size.
#   rows: plain_s0 plain_s1 (no Matryoshka; evaluated truncated)
#         mrl_s0 mrl_s1 (loss.matryoshka_dims=[384, 256, 128, 64])
#         d256 d128 d64 (loss.matryoshka_dims=[K]: single-size training, same budget)
#         guard_s0 guard_s1 (loss.false_negative_margin=0.1)
#         topk topk_guard topk_s1 topk_guard_s1 (H = 1 unfiltered top-k negatives mined by zero-shot MiniLM, section
#         A's neg_topk, without / with loss.false_negative_margin=0.1; mined once into $EXP/neg_topk)
#         remine remine_guard remine_s1 remine_guard_s1 (H = 1 negatives re-mined with the plain_s0
#         checkpoint, positive-aware margin 0.05 + text de-dup: section A's and quickstart round 2's
#         recipe, without / with the guard; plain_s0 is retrained first if its workdir is gone)
# Usage: bash experiments/quality/minilm_mrl_guard.sh [ROW...]   (default: all, serially)
# Results: results/minilm/NAME.dK.json (eval --json), rankings results/minilm/runs/NAME.trec.dK;
# table: python experiments/quality/minilm_table.py
set -eu
PY=${PY:-$(pwd)/.venv/bin/python}
EXP=${EXP:-/tmp/exp}
EVAL=${EVAL:-$EXP/evalset}
RES=${RES:-$(cd "$(dirname "$0")" && pwd)/results/minilm}
CFG=experiments/configs/minilm-wordnet.toml
cd "$(dirname "$0")/../.."
mkdir -p "$RES/runs"
[ -f "$EVAL/qrels.tsv" ] || "$PY" experiments/quality/make_eval_set.py --out "$EVAL" --queries 1000 --corpus-size 10000 --seed 0
ev() {  # ev WORKDIR NAME DIMS: one JSON line per size -> NAME.dK.json
  local w=$1 name=$2 dims=$3 run=$RES/runs/$2.trec
  case $dims in *,*) ;; *) run=$run.d$dims ;; esac  # one size: name its ranking like the others
  "$PY" -m negjax eval --model "$w" --corpus "$EVAL/corpus.jsonl" --queries "$EVAL/queries.jsonl" \
    --qrels "$EVAL/qrels.tsv" --doc-max-length 64 --query-max-length 32 \
    --save-run "$run" --json --dim "$dims" > "$RES/$name.jsonl.tmp"
  "$PY" - "$RES" "$name" <<'PYEOF'
import json, os, sys
res, name = sys.argv[1:]
for line in open(os.path.join(res, name + ".jsonl.tmp")):
    rec = json.loads(line)
    out = os.path.join(res, f"{name}.d{rec['model']['dim']}.json")
    with open(out + ".tmp", "w") as f:
        f.write(json.dumps(rec) + "\n")
    os.replace(out + ".tmp", out)
os.remove(os.path.join(res, name + ".jsonl.tmp"))
PYEOF
}
tr() {  # tr NAME [--set ...]
  local name=$1; shift
  local t0=$SECONDS
  "$PY" -m negjax train --config $CFG --set workdir=$EXP/minilm_$name "$@"
  cp "$EXP/minilm_$name/metrics.jsonl" "$RES/$name.metrics.jsonl"
  echo "$name trained in $((SECONDS - t0)) s"
}
ALL=384,256,128,64
MRL='loss.matryoshka_dims=[384, 256, 128, 64]'
row() {
  case $1 in
    plain_s0) tr plain_s0; ev $EXP/minilm_plain_s0 plain_s0 $ALL ;;
    plain_s1) tr plain_s1 --set train.seed=1; ev $EXP/minilm_plain_s1 plain_s1 $ALL ;;
    mrl_s0) tr mrl_s0 --set "$MRL"; ev $EXP/minilm_mrl_s0 mrl_s0 $ALL ;;
    mrl_s1) tr mrl_s1 --set "$MRL" --set train.seed=1; ev $EXP/minilm_mrl_s1 mrl_s1 $ALL ;;
    d256|d128|d64) k=${1#d}; tr $1 --set "loss.matryoshka_dims=[$k]"; ev $EXP/minilm_$1 single $k ;;
    guard_s0) tr guard_s0 --set loss.false_negative_margin=0.1; ev $EXP/minilm_guard_s0 guard_s0 384 ;;
    guard_s1) tr guard_s1 --set loss.false_negative_margin=0.1 --set train.seed=1; ev $EXP/minilm_guard_s1 guard_s1 384 ;;
    topk|topk_guard|topk_s1|topk_guard_s1)
      [ -f "$EXP/neg_topk/manifest.json" ] || "$PY" -m negjax mine --config $CFG --model minilm \
          --out "$EXP/neg_topk" --sampling top --no-dedup-text
      local g= sd=
      case $1 in *guard*) g="--set loss.false_negative_margin=0.1" ;; esac
      case $1 in *_s1) sd="--set train.seed=1" ;; esac
      tr $1 --set data.negatives=$EXP/neg_topk --set data.num_negatives=1 $g $sd
      ev $EXP/minilm_$1 $1 384 ;;
    remine|remine_guard|remine_s1|remine_guard_s1)
      if [ ! -f "$EXP/neg_remined_margin/manifest.json" ]; then
        [ -d "$EXP/minilm_plain_s0/checkpoints" ] || row plain_s0
        "$PY" -m negjax mine --config $CFG --model $EXP/minilm_plain_s0 --out "$EXP/neg_remined_margin" \
            --relative-margin 0.05 --overwrite
      fi
      local g= sd=
      case $1 in *guard*) g="--set loss.false_negative_margin=0.1" ;; esac
      case $1 in *_s1) sd="--set train.seed=1" ;; esac
      tr $1 --set data.negatives=$EXP/neg_remined_margin --set data.num_negatives=1 $g $sd
      ev $EXP/minilm_$1 $1 384 ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}
ROWS=${*:-plain_s0 mrl_s0 d256 d128 d64 guard_s0 plain_s1 mrl_s1 guard_s1}
for r in $ROWS; do echo "=== $r $(date +%T)"; row "$r"; done
