#!/usr/bin/env bash
# One lent-GPU call: train the shipped model's shape on the carried corpus, and bring back the
# checkpoints, log and loss curve under $OUT. From this checkout, with the device tool:
#   run(command="bash models/gpu_job.sh", carry=["data/corpus"], timeout_s=600)
# then, here on the CPU: `antiphon eval --model <files_at>/gpu/best.pt --midi ...` and
# `antiphon export <files_at>/gpu/best.pt -o daemon/assets/default.onnx --int8 ...`.
# The machine has PyTorch, numpy, rich and matplotlib, which is all training imports; nothing is
# installed: the package's import names are linked into a folder on PYTHONPATH instead.
# A hard time limit (TRAIN_S) leaves room for the call's start and the copy back: a checkpoint is
# written at every evaluation, so a run cut by it still returns its best one.
# DEVICE=cpu STEPS=2 BATCH=2 TRAIN_S=120 checks the plumbing on any machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.gpu-pkg${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p .gpu-pkg/antiphon
for part in daemon models export; do ln -sfn "$PWD/$part" ".gpu-pkg/antiphon/$part"; done
out="${OUT:-runs}/gpu"
rm -rf "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
timeout --signal=INT "${TRAIN_S:-480}" python3 -m antiphon.daemon.cli train --data data/corpus --out "$out" \
    --device "${DEVICE:-cuda}" --steps "${STEPS:-20000}" --batch-size "${BATCH:-32}" --seq-len 1024 \
    --lr 0.001 --min-lr 0.0001 --warmup-steps 200 --weight-decay 0.1 --grad-clip 1.0 \
    --eval-every "${EVAL_EVERY:-500}" --eval-batches 4 --augment --seed 1337 \
    --n-layer 4 --n-head 4 --d-model 256 --context 1024 --dropout 0.0 --rope-base 10000.0 || true
ls -la "$out"
test -f "$out/best.pt"
