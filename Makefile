# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs histolens into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HL := $(VENV)/bin/histolens
STAMP := $(VENV)/.histolens-installed
# The CPU/CUDA build of PyTorch to install; override e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO ?= demo-output
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED = 1

.PHONY: demo test install lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	@rm -rf $(DEMO)
	@echo "== 1/4 Synthetic H&E data (no download needed)"
	$(HL) data synth $(DEMO)/data --n 240 --seed 0
	@echo "== 2/4 Train (frozen EfficientNet-Lite0, offline weights; estimate by patient-level CV)"
	$(HL) train --data $(DEMO)/data --out $(DEMO)/run --quiet
	@echo "== 3/4 Explain a few images (Grad-CAM) and measure faithfulness"
	$(HL) explain $(DEMO)/run --split all --limit 6 --out $(DEMO)/run/explanations --quiet
	$(HL) explain $(DEMO)/run --split all --evaluate --max-images 8 --no-road \
		--method gradcam,gradcam++,eigencam --out $(DEMO)/run/explanations --quiet
	@echo "== 4/4 Report"
	$(HL) report $(DEMO)/run
	@echo "Open $(DEMO)/run/report.html in a browser."
	@echo "Note: synthetic data is easy (a lesion of another colour): the perfect 1.000 above shows"
	@echo "that the pipeline works, not how good the model is. The model's figures on real images"
	@echo "of patients it never saw (BreakHis): docs/results.md."

# The suite: one pytest run, its test files shared out to TEST_WORKERS pytest-xdist workers (each
# file's tests in one worker, each worker computing on its share of the cores: tests/conftest.py);
# 2 min 28 s on a 2-core CPU against 3 min 40 s in one process. TEST_WORKERS=0 runs it in one
# process. (One long process used to die of SIGSEGV late in the run: OpenVINO's CPU plugin left
# the main thread's signal stack unmapped; the fix and its test: histolens/models/openvino_core.py.)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(DEMO) build dist .pytest_cache .ruff_cache
