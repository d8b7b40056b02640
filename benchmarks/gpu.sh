#!/usr/bin/env bash
# The GPU benchmark in one command, on one GPU machine whose image has its own CUDA torch and no network
# (about 6 minutes at the defaults; benchmarks/README.md, section "GPU"):
#
#   bash benchmarks/gpu.sh [options of benchmarks/gpu_benchmark.py]
#
# First installs the wheels that benchmarks/gpu_wheels.sh put into .gpu_wheels/ (carried with the working tree):
# only those the image lacks at that version, with --no-deps into a folder of their own, so the image's torch and
# other packages are not touched. Results: gpu_benchmark.json and gpu_benchmark.md in $OUT (else benchmarks/gpu_results).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
wheels=${WHEELS:-$root/.gpu_wheels}
site=${GPU_SITE:-/tmp/probe_gpu_site}
export PYTHONUNBUFFERED=1
if [ -d "$wheels" ]; then
  mapfile -t needed < <("$python" "$root/benchmarks/gpu_benchmark.py" --wheels-needed "$wheels")
  if [ "${#needed[@]}" -gt 0 ]; then
    echo "installing into $site: ${needed[*]##*/}"
    "$python" -m pip install -q --no-index --find-links "$wheels" --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "${needed[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  echo "no $wheels: running with this interpreter's own packages (bash benchmarks/gpu_wheels.sh makes the folder)"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$python" benchmarks/gpu_benchmark.py "$@"
