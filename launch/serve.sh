#!/usr/bin/env bash
# Serve a model with sparse decode attention (SGLang 0.5.17 + the sgl-sparse plugin).
#   launch/serve.sh PRESET MODEL [more launch_server flags]
#   PRESET: quest | twilight | vattention | dense | path/to/config.yaml
# Example: launch/serve.sh quest meta-llama/Llama-3.1-8B-Instruct --port 30000 --context-length 131072
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n 2,5p "$0" >&2
    exit 2
fi
preset=$1 model=$2
shift 2
page=$(python3 -c "from sgl_sparse.config import SparseConfig; print(SparseConfig.load('$preset').sglang_page_size)")
exec python3 -m sglang.launch_server --model-path "$model" --attention-backend sgl_sparse \
    --sparse-config "$preset" --page-size "$page" "$@"
