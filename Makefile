# Two commands on a fresh machine (Python 3.11): `make demo` (install + quantize/export/sample the
# shipped digits model on CPU) and `make test` (install + the test suite, one thread; what CI runs).
# `make test-fast` is the fast tier for development (under 3 minutes on one thread).
PY ?= python3
OUT ?= out
RECIPE ?= w8a8
# the fast tier's one end-to-end path: quantize (default w8a8 recipe) -> export (ORT layout) -> check
FAST_E2E = tests/integration/test_export_e2e.py::test_default_artifact_matches_both_graphs[ort]
export HF_HUB_OFFLINE = 1
export OMP_NUM_THREADS = 1

.PHONY: install demo test test-fast lint bench-quality bench-latency

install:
	$(PY) -m pip install -q torch==2.13.0   # the CPU wheel; install it before anything that pulls torch
	$(PY) -m pip install -q -e '.[dev]'

demo: install
	rm -rf $(OUT)/digits-$(RECIPE) $(OUT)/digits-$(RECIPE)-ort $(OUT)/digits-$(RECIPE)-trt-onnx
	dqdeploy quantize dqdeploy/assets/digits-ddpm --recipe $(RECIPE) --out $(OUT)/digits-$(RECIPE) --scheduler ddim --calib-samples 512 --iters 100 --layout ort
	dqdeploy inspect $(OUT)/digits-$(RECIPE)
	dqdeploy export $(OUT)/digits-$(RECIPE) --target ort --out $(OUT)/digits-$(RECIPE)-ort
	dqdeploy export $(OUT)/digits-$(RECIPE) --target onnx --out $(OUT)/digits-$(RECIPE)-trt-onnx
	dqdeploy lint $(OUT)/digits-$(RECIPE)-trt-onnx
	dqdeploy check $(OUT)/digits-$(RECIPE) $(OUT)/digits-$(RECIPE)-ort
	dqdeploy sample $(OUT)/digits-$(RECIPE)-ort --n 64 --out $(OUT)/digits-$(RECIPE)-ort.png --overwrite

test: install lint  # the whole suite, `slow` tests included
	$(PY) -m pytest -q tests

test-fast: install lint  # unit tests not marked `slow` + one end-to-end path; tests/integration, hostile, bench: `make test`
	$(PY) -m pytest -q -m "not slow" tests/unit '$(FAST_E2E)'

lint:  # static checks of the package (configured in pyproject.toml); `make test` runs them first
	$(PY) -m ruff check dqdeploy tests bench scripts examples
	$(PY) -m mypy

bench-quality: install
	$(PY) bench/quality.py

bench-latency: install
	$(PY) bench/latency.py
