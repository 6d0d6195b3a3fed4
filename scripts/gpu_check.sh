#!/usr/bin/env bash
# Every check that needs a GPU, in one go: the CUDA tests, then the benchmarks whose numbers
# belong in the README. Run it where CUDA and dcfx's test dependencies are installed (e.g.
# after scripts/setup.sh with a CUDA build of torch). Each step prints its own table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PY" -m pytest -q -m cuda tests
"$PY" benchmarks/bench_kernels.py --dtype fp16
"$PY" benchmarks/bench_kernels.py --dtype fp16 --channels-last
E2E=(--size sd15 --resolution 64 --steps 50 --interval 3 --dtype fp16 --branches 0 2)
"$PY" benchmarks/bench_e2e.py "${E2E[@]}"
"$PY" benchmarks/bench_e2e.py "${E2E[@]}" --cuda-graph
"$PY" benchmarks/bench_e2e.py "${E2E[@]}" --compile
"$PY" benchmarks/bench_e2e.py "${E2E[@]}" --compile --cuda-graph
"$PY" benchmarks/bench_e2e.py "${E2E[@]}" --compile --compile-mode reduce-overhead
