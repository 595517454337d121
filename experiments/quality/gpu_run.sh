#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool; run from the repo root there), carrying .gpu/:
#   .gpu/whl/       wheels the machine's image lacks (grain, array-record, portpicker,
#                   importlib_resources, tensorboardX), installed into /tmp/site
#   .gpu/minilm16/  all-MiniLM-L6-v2 with its float weights stored as float16 (the call's
#                   64 MiB limit); restored to a float32 safetensors file before use
#   .gpu/evalset/   the fixed reduced eval set (make_eval_set.py --queries 1000 --corpus-size 10000 --seed 0)
# Runs experiments/quality/ablate.py (no row starts after $DEADLINE s), then
# experiments/bench/gpu_checks.py in the time left; results land in $OUT.
set -u
T0=$SECONDS
OUT=${OUT:-/tmp/out}
G=$(pwd)/.gpu
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$G"/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$(pwd) XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 NEGJAX_CACHE=/tmp/negjax-cache
python3 - "$G/minilm16" /tmp/minilm <<'EOF' || exit 1
import shutil, sys
from pathlib import Path
import numpy as np
from safetensors.numpy import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model16.safetensors"))
w = load_file(src / "model16.safetensors")
save_file({k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in w.items()}, dst / "model.safetensors")
print("minilm restored:", len(w), "tensors")
EOF
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
python3 -c "import jax, flax, optax, orbax.checkpoint, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'transformers', transformers.__version__)"
python3 -c "from negjax.data import wordnet; print(wordnet.ensure_exported())" || exit 1
python3 experiments/quality/ablate.py --model /tmp/minilm --eval-dir "$G/evalset" --work /tmp/w \
  --results /tmp/r --parallel "${PARALLEL:-10}" --deadline "${DEADLINE:-300}" \
  --kill-after "${KILL_AFTER:-400}" --bundle "$OUT/ablation.tar.gz" ${ONLY:+--only "$ONLY"} 2>&1 | grep -v '^ *"'
echo "ablation finished at $((SECONDS - T0)) s"
LEFT=$(( ${CALL_LIMIT:-575} - (SECONDS - T0) ))
if [ "$LEFT" -gt 60 ]; then
  timeout "$LEFT" python3 experiments/bench/gpu_checks.py --model /tmp/minilm --json "$OUT/gpu_checks.json" 2>&1 | grep -v Warning
fi
echo "call finished at $((SECONDS - T0)) s"
