# Two commands for a new user: `make demo` and `make test`. Each creates .venv and installs
# what is missing; the stamp file makes a second run install nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deployopt-installed
FOOLBOX := foolbox==3.3.4

.PHONY: demo test clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[data,test]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(FOOLBOX)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deployopt optimize optimizer/recipes/demo.yaml -o runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
