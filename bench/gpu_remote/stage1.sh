#!/usr/bin/env bash
# First call on the GPU machine (uploads: .devcarry/ga, .devcarry/traces): stage them in /tmp.
set -euo pipefail
mkdir -p /tmp/m /tmp/traces
cp .devcarry/ga /tmp/m/ga
cp .devcarry/traces/*.jsonl /tmp/traces/
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
