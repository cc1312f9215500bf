#!/usr/bin/env bash
# GPU check for a lent GPU machine (issue 2, part 9). Installs nothing: it uses the
# python that has torch (with CUDA) and nvidia-ml-py already. Writes $OUT/gpu_check.json
# (default ./out). Exit 0 pass, 1 a check failed, 3 no NVIDIA driver / no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/agents${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-./out}"
# The project's venv when this checkout has one, else the machine's python3 (set PYTHON to override).
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
fi
# The whole check must end within 9 minutes, whatever hangs (the NCCL settings sweep takes most).
exec timeout --kill-after=10 530 "$PYTHON" bench/gpu_check.py "$@"
