#!/usr/bin/env bash
# GPU check for the parallel strategies and precisions: trains a shrunk jobs/fsdp_mlp.yaml on the
# machine's GPUs under ddp and fsdp, each in fp32, bf16 and fp16, and prints one line per run
# (final validation accuracy, samples/s, per-worker state and peak GPU memory), then `predict --gpu`
# on the fsdp run's checkpoint, then advise's memory plan against each GPU worker's measured peak
# (benchmarks/advise_bench.py --gpu), then a BatchNorm model with model.sync_batchnorm under ddp; between them,
# fsdp built whole against built on the meta device, and activation checkpointing. Skips, with a
# message and exit code 0, on a machine without GPUs. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh [NUM_WORKERS]     # default: every GPU, at most 2
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

num_gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$num_gpus" -eq 0 ]; then
    echo "gpu_check: no GPU on this machine (torch.cuda.is_available() is False): skipped"
    exit 0
fi
workers=${1:-$(( num_gpus < 2 ? num_gpus : 2 ))}
storage=$(mktemp -d /tmp/raytrain-kit-gpu-XXXXXX)
trap 'rm -rf "$storage"' EXIT
"$PYTHON" -c "import torch; print('gpu_check:', torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0), '- torch', torch.__version__)"

failed=0
for strategy in ddp fsdp; do
    for precision in fp32 bf16 fp16; do
        name="${strategy}_${precision}"
        if ! "$PYTHON" -m raytrain_kit train jobs/fsdp_mlp.yaml --quiet \
                --set run.name="$name" --set run.storage_path="$storage" \
                --set scaling.use_gpu=true --set scaling.num_workers="$workers" \
                --set scaling.strategy="$strategy" --set train.precision="$precision" \
                --set data.num_rows=8000 --set train.epochs=3 --set schedule.warmup_steps=5 \
                > "$storage/$name.log" 2>&1; then
            echo "gpu_check: $name FAILED:"; tail -20 "$storage/$name.log"; failed=1; continue
        fi
        "$PYTHON" - "$storage/$name/summary.json" "$name" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
m = s["final_metrics"]
print(f"gpu_check: {sys.argv[2]:<10} {s['status']}  val_accuracy {m['val_accuracy']:.4f}  "
      f"{m['samples_per_s']:,.0f} samples/s  state {m['state_mb']:,.1f} MB/worker  "
      f"GPU peak {m.get('gpu_peak_mb', float('nan')):,.0f} MB/worker")
PY
    done
done

# Models bigger than a worker (issue #23): fsdp built whole before sharding (the runs above are
# built on the meta device: the default), and activation checkpointing under ddp and fsdp; each
# must train as the run it varies (the same initial weights, the same maths).
for variant in "fsdp_fp32_built_whole fsdp fp32 scaling.meta_init=false" \
               "ddp_fp32_checkpointing ddp fp32 train.activation_checkpointing=true" \
               "fsdp_bf16_checkpointing fsdp bf16 train.activation_checkpointing=true"; do
    read -r name strategy precision setting <<< "$variant"
    if ! "$PYTHON" -m raytrain_kit train jobs/fsdp_mlp.yaml --quiet \
            --set run.name="$name" --set run.storage_path="$storage" \
            --set scaling.use_gpu=true --set scaling.num_workers="$workers" \
            --set scaling.strategy="$strategy" --set train.precision="$precision" --set "$setting" \
            --set data.num_rows=8000 --set train.epochs=3 --set schedule.warmup_steps=5 \
            > "$storage/$name.log" 2>&1; then
        echo "gpu_check: $name FAILED:"; tail -20 "$storage/$name.log"; failed=1; continue
    fi
    "$PYTHON" - "$storage" "$name" "${strategy}_${precision}" <<'PY' || failed=1
import json, sys
storage, name, base = sys.argv[1:]
mine, theirs = (json.load(open(f"{storage}/{n}/summary.json"))["history"] for n in (name, base))
# the first epoch's training loss: the same initial weights and steps give the same figure
a, b = mine[0]["train_loss"], theirs[0]["train_loss"]
ok = abs(a - b) <= (2e-2 if "bf16" in base else 1e-4) * abs(b)
print(f"gpu_check: {name:<24} {'ok' if ok else 'FAILED'}  epoch-1 train_loss {a:.6f} vs {base}'s {b:.6f}  "
      f"val_accuracy {mine[-1]['val_accuracy']:.4f}  GPU peak {mine[-1].get('gpu_peak_mb', float('nan')):,.0f} MB/worker "
      f"({theirs[-1].get('gpu_peak_mb', float('nan')):,.0f})")
sys.exit(0 if ok else 1)
PY
done

# `predict --gpu` on the fsdp fp32 run's validation rows (sharded checkpoint, one GPU per actor):
# its accuracy must be the run's val_accuracy, as on CPUs.
if [ -f "$storage/fsdp_fp32/summary.json" ]; then
    if "$PYTHON" -m raytrain_kit predict "$storage/fsdp_fp32" --split val --gpu --num-workers "$workers" \
            --out "$storage/predicted" > "$storage/predict.log" 2>&1; then
        "$PYTHON" - "$storage/fsdp_fp32/summary.json" "$storage/predict.log" <<'PY' || failed=1
import json, re, sys
s = json.load(open(sys.argv[1]))
epoch = int(s["checkpoint"].rsplit("_", 1)[1])
expected = s["history"][epoch - 1]["val_accuracy"]
printed = open(sys.argv[2]).read()
got = float(re.search(r"accuracy ([0-9.]+)", printed).group(1))
ok = f"{got:.4f}" == f"{expected:.4f}"
print(f"gpu_check: predict_gpu {'ok' if ok else 'FAILED'}  accuracy {got:.4f} (the run's val_accuracy {expected:.4f})")
sys.exit(0 if ok else 1)
PY
    else
        echo "gpu_check: predict_gpu FAILED:"; tail -20 "$storage/predict.log"; failed=1
    fi
fi

# `advise`'s memory plan against CUDA's allocator's peak per GPU worker (ddp and fsdp, fp32 and
# bf16, on fsdp_mlp and the digits CNN): every row within 20%, as on CPUs.
if "$PYTHON" benchmarks/advise_bench.py --part memory --gpu --strict > "$storage/advise_gpu.log" 2>&1; then
    grep "^| advise memory" "$storage/advise_gpu.log" | sed 's/^/gpu_check: /'
else
    echo "gpu_check: advise_memory_gpu FAILED:"; tail -20 "$storage/advise_gpu.log"; failed=1
fi

# SyncBatchNorm (model.sync_batchnorm) exists on GPUs only: a BatchNorm model under ddp.
name=ddp_sync_batchnorm
if PYTHONPATH=tests${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" -m raytrain_kit train jobs/fsdp_mlp.yaml --quiet \
        --set run.name="$name" --set run.storage_path="$storage" \
        --set scaling.use_gpu=true --set scaling.num_workers="$workers" --set scaling.strategy=ddp \
        --set model.kind=custom --set model.target=test_models_lib:build_batchnorm_mlp \
        --set model.sync_batchnorm=true --set data.num_rows=8000 --set train.epochs=3 \
        > "$storage/$name.log" 2>&1; then
    echo "gpu_check: $name ok"
else
    echo "gpu_check: $name FAILED:"; tail -20 "$storage/$name.log"; failed=1
fi
exit $failed
