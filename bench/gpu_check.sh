#!/usr/bin/env bash
# The GPU checks, in one command on a machine with a CUDA device and torch installed:
#   bash bench/gpu_check.sh OUT_DIR [WHEELS_DIR]
# 1. tests/test_cuda.py and the CUDA test of tests/test_distributed.py (every registered model's steps on CUDA against the CPU; a run on CUDA
#    that trains, evaluates and exports); 2. `esmm train --nproc 1` on NCCL (torchrun, one
#    process per GPU); 3. bench/train_throughput.py on the GPU (the shipped config, users grouped,
#    the demo's small size). WHEELS_DIR: wheels to install first where the machine lacks
#    esmm's pure-Python dependencies (pydantic, ...). Prints and writes OUT_DIR/*.txt|md.
set -u
out=${1:?usage: bench/gpu_check.sh OUT_DIR [WHEELS_DIR]}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if [[ -n ${2:-} ]]; then
  $py -m pip install -q --no-deps --no-index "$2"/*.whl || exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  nproc; } 2>&1 | tee "$out/machine.txt"
timeout 240 $py -m pytest tests/test_cuda.py tests/test_distributed.py -k "cuda or CUDA" -q \
  -p no:cacheprovider 2>&1 | tee "$out/test_cuda.txt"
data=$(mktemp -d)
$py -m esmm simulate --out "$data/sim" --rows 200000 >/dev/null 2>&1
if $py -m esmm train --help 2>/dev/null | grep -q -- --nproc; then
  timeout 120 $py -m esmm train configs/esmm_sim.yaml --out "$data/run-nccl" --nproc 1 \
    --set data.train="$data/sim/train" --set data.eval="$data/sim/valid" \
    --set data.test="$data/sim/test" --set train.device=cuda --set train.max_steps=200 \
    --set train.eval_every=100 2>&1 | tail -n 5 | tee "$out/nccl.txt"
fi
timeout 200 $py bench/train_throughput.py --sizes shipped,shipped-grouped,small --device cuda --threads 4 \
  --rows 200000 --steps 60 --eval-rows 0 --markdown 2>&1 | tee "$out/bench_cuda.md"
if [[ ${CPU_BENCH:-0} == 1 ]]; then  # the same sizes on this machine's CPU, one and two threads
  timeout 300 $py bench/train_throughput.py --sizes shipped,shipped-grouped,shipped-base,small --device cpu \
    --threads 1,2 --rows 100000 --steps 25 --eval-rows 0 --markdown 2>&1 | tee "$out/bench_cpu.md"
fi
