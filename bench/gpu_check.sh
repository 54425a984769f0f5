#!/bin/sh
# GPU checks in one go (a machine with CUDA and PyTorch; streamlit, plotly and captum not needed):
# the trainer, graph-loop, instrument and training-job tests (their CUDA tests run only there), then the GPU section
# of the benchmark. Usage: sh bench/gpu_check.sh [--quick]
export PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_train.py tests/test_probes.py \
    tests/test_perf_equivalence.py tests/test_jobs.py
tests=$?
python3 -X faulthandler bench/bench.py --sections gpu "$@"
bench=$?
echo "tests exit $tests, bench exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
