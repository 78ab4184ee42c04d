#!/usr/bin/env bash
# The GPU checks in one pass, every output under one folder:
#
#   experiments/gpu_check.sh OUT_DIR            # full size, on a GPU machine
#   experiments/gpu_check.sh OUT_DIR --small    # dry run at a small size (any CPU)
#
# Stages, in order of importance, each bounded by the time left of a budget
# (GPU_CHECK_BUDGET_S, default 540 s; the last stages get what remains):
#   0. environment: missing Python packages from carried wheels (.whl/), nvidia-smi,
#      the devices JAX and PyTorch see;
#   a. the GPU-relevant tests: warp, NCC, refine, the conv layer and the networks
#      against their references (tests/test_{warp,ncc,refine}.py, tests/models/test_{conv,torch_networks}.py);
#   b. experiments/benchmark.py for voxelmorph, vitvnet, transmorph: JAX float32
#      against PyTorch eager (all four functions), peak device memory;
#   c. a 300-step OFG training of VoxelMorph on synthetic phantoms written as an
#      OASIS-style dataset (experiments/make_synthetic_files.py), with evaluation
#      at step 0 and at the end;
#   d. refine alone: time per iteration and the bytes XLA moves per iteration
#      (experiments/profile_refine.py --roofline, H200: 4800 GB/s);
#   e. the benchmark again: JAX bfloat16 (model.dtype=bfloat16) and PyTorch under
#      torch.compile, the OFG step and the forward pass.
#
# What it needs: a GPU machine with JAX (CUDA), PyTorch, flax, optax,
# orbax-checkpoint and scipy installed. It needs no network: the Python packages
# such a machine may lack are installed from wheels in .whl/ beside the checkout,
# which a machine with network prepares, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
#     nibabel ml-collections tensorboardX
# and copies to the GPU machine together with the checkout.
set -uo pipefail

OUT=${1:?usage: experiments/gpu_check.sh OUT_DIR [--small]}
SMALL=0
[[ "${2:-}" == "--small" || "${GPU_CHECK_SMALL:-0}" == "1" ]] && SMALL=1
BUDGET=${GPU_CHECK_BUDGET_S:-540}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
stage() {  # stage NAME MIN_SECONDS COMMAND...: runs COMMAND within the time left
  local name=$1 need=$2; shift 2
  local t=$(left)
  if (( t < need )); then
    echo "== $name: skipped, ${t} s left (needs ${need})" | tee -a "$OUT/stages.txt"
    return 0
  fi
  echo "== $name (up to ${t} s) $(date -u +%H:%M:%S)"
  local s=$(date +%s)
  timeout --kill-after=10 "$t" "$@"
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - s )) s" | tee -a "$OUT/stages.txt"
}

# Sizes: the full size (160x192x224) on the GPU; a small one for the dry run.
# The dry run exercises every command with tiny transformers and only collects
# the tests (running them is the GPU's part; on a CPU the suite covers them).
if (( SMALL )); then
  SHAPE=32,32,64; STEPS=2; REPEATS=1; TRAIN_STEPS=4; NTRAIN=2; NVAL=2
  SETS=(--set "transmorph:model.window_size=(1,1,2)" --set "transmorph:model.embed_dim=8"
        --set "transmorph:model.depths=(1,1,1,1)" --set "transmorph:model.num_heads=(2,2,2,2)"
        --set "transmorph:model.reg_head_chan=4"
        --set "vitvnet:model.encoder_channels=(4,4,4)" --set "vitvnet:model.hidden_size=8"
        --set "vitvnet:model.num_layers=1" --set "vitvnet:model.num_heads=2"
        --set "vitvnet:model.mlp_dim=8" --set "vitvnet:model.conv_first_channel=8"
        --set "vitvnet:model.decoder_channels=(8,8,4,4,4)")
  TEST_ARGS=(--collect-only)
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
else
  SHAPE=160,192,224; STEPS=10; REPEATS=3; TRAIN_STEPS=300; NTRAIN=16; NVAL=2
  SETS=()
  TEST_ARGS=()
fi
echo "gpu_check: out=$OUT small=$SMALL budget=${BUDGET}s shape=$SHAPE $(date -u)"

# 0. Environment.
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
(nvidia-smi || echo "no nvidia-smi") > "$OUT/nvidia-smi.txt" 2>&1
cat "$OUT/nvidia-smi.txt"
$PY - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "flax", "optax", "torch", "numpy", "nibabel", "ml_collections",
             "tensorboardX", "orbax.checkpoint"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:
        print(name, "MISSING", e)
import jax, torch
print("jax devices", jax.devices())
print("torch cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

# a. Tests: the parity checks that run on the device.
stage tests 60 $PY -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    ${TEST_ARGS[@]+"${TEST_ARGS[@]}"} \
    tests/test_warp.py tests/test_ncc.py tests/test_refine.py tests/models/test_conv.py \
    tests/models/test_torch_networks.py

# b. Benchmark, float32: JAX against PyTorch eager, every function.
stage benchmark_f32 120 $PY -m experiments.benchmark --shape "$SHAPE" \
    --inner-steps "$STEPS" --repeats "$REPEATS" --models voxelmorph,vitvnet,transmorph \
    ${SETS[@]+"${SETS[@]}"} --frameworks jax,torch --out "$OUT/benchmark_f32.json"

# c. Training: 300 OFG steps of VoxelMorph on phantoms, evaluated at 0 and the end.
stage phantoms 30 $PY -m experiments.make_synthetic_files --root "$OUT/phantoms" \
    --img-size "$SHAPE" --num-train "$NTRAIN" --num-val "$NVAL"
stage train 90 $PY -m ofg_jax.main --config=configs/oasis.py \
    --config.data.root="$OUT/phantoms" --config.data.num_train="$NTRAIN" \
    --config.data.num_val="$NVAL" \
    --config.train.max_steps="$TRAIN_STEPS" --config.train.epochs=10 \
    --config.train.learning_rate=1e-3 --config.train.eval_every_epochs=0 \
    --config.train.log_every=50 --config.train.figures=False \
    --config.ofg.steps="$STEPS" --workdir="$OUT/train_voxelmorph"
rm -rf "$OUT/phantoms" "$OUT/train_voxelmorph/checkpoints"

# d. refine alone: seconds and bytes moved per iteration.
stage refine_roofline 30 $PY -m experiments.profile_refine --shape "$SHAPE" \
    --steps "$STEPS" --repeats "$REPEATS" --roofline --bandwidth-gbs 4800 \
    --json "$OUT/refine_roofline.json"

# e. Benchmark: JAX bfloat16, then torch.compile, with what time is left.
stage benchmark_bf16 60 $PY -m experiments.benchmark --shape "$SHAPE" \
    --inner-steps "$STEPS" --repeats "$REPEATS" --models voxelmorph,vitvnet,transmorph \
    ${SETS[@]+"${SETS[@]}"} --set model.dtype=bfloat16 --frameworks jax --functions ofg_step,forward \
    --out "$OUT/benchmark_bf16.json"
stage benchmark_compile 60 $PY -m experiments.benchmark --shape "$SHAPE" \
    --inner-steps "$STEPS" --repeats "$REPEATS" --models voxelmorph,vitvnet,transmorph \
    ${SETS[@]+"${SETS[@]}"} --frameworks torch_compile --functions ofg_step,forward \
    --out "$OUT/benchmark_compile.json"

echo "gpu_check: done in $(( $(date +%s) - START )) s"
cat "$OUT/stages.txt"
