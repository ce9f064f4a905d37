# Two commands on a fresh clone:  `make demo` (the main job)  and  `make test` (the test suite).
# Both create or reuse ./.venv; set TORCH_SPEC to install another torch build (e.g. CUDA).
PY := .venv/bin/python

.PHONY: setup demo test lint

setup:
	@bash scripts/setup_venv.sh

demo: setup
	$(PY) -m benchmarks.main

test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
