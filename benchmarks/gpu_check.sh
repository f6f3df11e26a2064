#!/usr/bin/env bash
# The GPU check of a bare GPU machine (the device tool's H100 / H200), in one command:
#     bash benchmarks/gpu_check.sh          with carry: [".whl"]
# 1. benchmarks/throughput.py --device cuda: every stage's host feed per core and its model work
#    on the GPU (CUDA events), host_feed_ratio and the projected PASCAL-5i / COCO-20i hours;
# 2. benchmarks/scale.py --device cuda with the time left: the real stages, each in a process of
#    its own, and benchmarks/gpu_utilisation.py: mean and peak GPU utilisation per stage.
# .whl/ holds the py3.12 wheels the stages need beyond what that machine's python3 has (prefect,
# pydantic, zarr, open_clip, dvclive + dvc, ...; benchmarks/gpu_wheels.txt lists them and says how to
# download them). Everything printed goes to $OUT/gpu_scale.log
# (time-stamped), GPU memory and load every second to $OUT/gpu_mem.csv.
# N (scale.py --images, runs N then 4N) and BUDGET_S (seconds for the whole script, install
# included) can be set in the environment; SHARED_PREFECT=0 lets every stage start its own
# Prefect server, as plain scale.py does (default 1: one for all stages, as `make repro` does).
set -u
N=${N:-64}
BUDGET_S=${BUDGET_S:-460}
SHARED_PREFECT=${SHARED_PREFECT:-1}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_scale.log
stamp() { while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done | tee -a "$LOG"; }

{
  echo "== machine (N=$N, budget ${BUDGET_S}s, shared Prefect server: $SHARED_PREFECT)"
  nvidia-smi -L
  nproc; free -g | head -2
  python3 -c 'import sys, torch, torchvision; print(sys.executable, sys.version.split()[0], "torch",
    torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__)'
  echo "== install $(ls .whl/*.whl | wc -l) wheels ($(du -sh .whl | cut -f1))"
} 2>&1 | stamp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl 2>&1 | stamp
[ "${PIPESTATUS[0]}" = 0 ] || { echo "pip install failed" | stamp; exit 2; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PREFECT_HOME=/tmp/prefect-home
echo "== smoke test ($SECONDS s so far)" | stamp
python3 benchmarks/gpu_smoke.py 2>&1 | stamp
[ "${PIPESTATUS[0]}" = 0 ] || { echo "smoke test failed: not running scale.py" | stamp; exit 3; }

nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 1 >"$OUT/gpu_mem.csv" 2>&1 &
sampler=$!
left=$((BUDGET_S - SECONDS - 150)); [ "$left" -gt 60 ] || left=60
echo "== throughput.py --device cuda, at most ${left}s ($SECONDS s so far)" | stamp
timeout -k 10 "$left" python3 benchmarks/throughput.py --device cuda --items 64 --keep /tmp/tp 2>&1 | stamp
echo "== throughput.py exit ${PIPESTATUS[0]}" | stamp
left=$((BUDGET_S - SECONDS)); [ "$left" -gt 60 ] || left=60
echo "== scale.py --device cuda --images $N, at most ${left}s ($SECONDS s so far)" | stamp
launch=()
[ "$SHARED_PREFECT" = 1 ] && launch=(python3 -m stages._prefect_server)
timeout -k 15 "$left" ${launch[@]+"${launch[@]}"} python3 benchmarks/scale.py --device cuda --images "$N" 2>&1 | stamp
rc=${PIPESTATUS[0]}
kill "$sampler" 2>/dev/null
echo "== GPU utilisation per stage" | stamp
python3 benchmarks/gpu_utilisation.py "$LOG" "$OUT/gpu_mem.csv" 2>&1 | stamp
echo "== scale.py exit $rc$([ "$rc" = 124 ] && echo ' (timed out)') after $SECONDS s in all" | stamp
exit "$rc"
