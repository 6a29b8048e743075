#!/usr/bin/env bash
# GPU check (issue 12): Llama-3.1-8B architecture with random weights on one CUDA GPU, through
# `python -m lora_exp.train`: padded vs padding-free parity, tokens/s and MFU at sequence 2048,
# QLoRA nf4. About 6-8 minutes on one H100/H200; no hub access needed. Run from anywhere:
#
#   bash benchmarks/gpu_check.sh [--steps 30] [--batch 4] [--seq 2048] [--peak-tflops 989] [--work DIR]
#
# Options are those of benchmarks/gpu_check.py (--help). Exit status: 0 every stage passed, 1 a stage
# failed (the summary says which), 2 no CUDA GPU here (nothing was run).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"

if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    if ! "$python" -c 'import torch' 2>/dev/null; then
        echo "gpu_check: cannot import torch with '$python' (set PYTHON=... to the project's interpreter)." >&2
    else
        echo "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False), so nothing was run." \
             "This check needs one H100/H200-class GPU." >&2
    fi
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
# the script stops starting stages after --budget-s (540 s); timeout is the backstop
exec timeout 600 "$python" "$here/gpu_check.py" "$@"
