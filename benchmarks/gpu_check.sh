#!/bin/bash
# The checks a session lent a GPU runs, in one call (BENCHMARKS.md, "The first GPU run"):
#   1. the CUDA tests (the cuda backend bit for bit against the CPU reference, cuBLASLt's layouts),
#      and benchmarks/int_mm_shapes.py (which int8 shapes cuBLASLt refuses; mm_int32 takes all);
#   2. one MNIST epoch of LeNet-5 (int8 and DFP16) and of a narrow ResNet-18 on 2,048 images, on the
#      CPU and on the GPU, compared tensor by tensor (benchmarks/same_weights.py);
#   3. benchmarks/speed.py --device cuda on LeNet-5, VGG-small-7 and ResNet-18 at 224 px.
#
#   bash benchmarks/gpu_check.sh MNIST_DIR OUT_DIR
#
# MNIST_DIR holds the four MNIST files (the device machine reaches no network: carry them). Each
# step has its own time limit, so a failure or a slow step leaves the others' results; a summary
# goes to OUT_DIR/log.txt, speed.py's whole output to OUT_DIR/speed.txt. GPU_CHECK_DEVICE=cpu runs
# the same steps without a GPU (to try the script itself).
set -u
if [ $# -ne 2 ] || [ ! -d "$1" ]; then
  echo "usage: bash benchmarks/gpu_check.sh MNIST_DIR OUT_DIR (MNIST_DIR: a folder with the MNIST files)" >&2
  exit 2
fi
data=$1 out=$2
device=${GPU_CHECK_DEVICE:-cuda}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONPATH=$root/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
log=$out/log.txt
runs=$(mktemp -d)
say() { echo "=== $(date +%T) $*" | tee -a "$log"; }

say "machine"
{ nvidia-smi -L 2>&1 | head -2
  python3 -c "import sys, torch; print('Python', sys.version.split()[0], 'PyTorch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} 2>&1 | tee -a "$log"

say "CUDA tests"
timeout 120 python3 -m pytest -q -o addopts="" -p no:cacheprovider "$root/tests/test_kernels.py" -k cuda 2>&1 | tail -3 | tee -a "$log"
say "int8 shapes cuBLASLt refuses"
timeout 90 python3 "$root/benchmarks/int_mm_shapes.py" --device "$device" --rows 16384 65536 200704 \
  --terms 32 40 72 152 576 2>&1 | tee -a "$log"

train_on() {  # device, run folder, then intrain train options
  local where=$1 dir=$2; shift 2
  ( time timeout 150 python3 -m intrain train --dataset mnist --data-dir "$data" --device "$where" \
      --out "$dir" "$@" ) 2>&1 | grep -E 'eval_acc|Error|error|^real' | tee -a "$log"
}
both() {  # name, then intrain train options: one run on the CPU, one on $device, compared
  local name=$1; shift
  train_on cpu "$runs/$name-cpu" "$@"
  train_on "$device" "$runs/$name-on-$device" "$@"
  timeout 60 python3 "$root/benchmarks/same_weights.py" "$runs/$name-cpu" "$runs/$name-on-$device" 2>&1 | tail -2 | tee -a "$log"
}
say "LeNet-5 int8, one epoch";  both lenet5-int8 --model lenet5 --epochs 1
say "LeNet-5 DFP16, one epoch"; both lenet5-dfp16 --model lenet5 --epochs 1 --arith dfp16
say "ResNet-18 w0.25, 2,048 images"; both resnet18 --model resnet18 --width 0.25 --epochs 1 --train-limit 2048

for spec in "lenet5 --batch 256 --repeats 10" "vgg-small-7 --batch 64 --repeats 5" \
            "vgg-small-7 --batch 64 --repeats 3 --arith dfp16" \
            "resnet18 --image-size 224 --batch 64 --repeats 5" \
            "resnet18 --image-size 224 --batch 64 --repeats 3 --arith dfp16"; do
  say "speed.py --device $device --model $spec"
  # shellcheck disable=SC2086  # spec is a list of options
  timeout 120 python3 "$root/benchmarks/speed.py" --device "$device" --model $spec > "$runs/speed.txt" 2>&1
  echo "exit status $?" >> "$runs/speed.txt"
  grep -v USDT "$runs/speed.txt" >> "$out/speed.txt"
  grep -E 'Error|batch|training step|bf16|held memory|peak|exit status' "$runs/speed.txt" | grep -v USDT | tee -a "$log"
done
rm -rf "$runs"
say "done"
