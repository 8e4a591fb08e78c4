# The two commands: `make run` (the main job on the embedded default) and `make test` (the test suite).
PRESET ?= default
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run prepare notebooks test lab install clean-outputs benchmark

run: $(STAMP) ## build data and target if missing, then execute the notebooks with papermill
	$(PY) -m mialib all --preset configs/$(PRESET).yaml

prepare: $(STAMP) ## only build the embedded data and the tiny target
	$(PY) -m mialib prepare --preset configs/$(PRESET).yaml

notebooks: $(STAMP) ## only execute the notebooks (data and target must exist)
	$(PY) -m mialib notebooks --preset configs/$(PRESET).yaml

test: $(STAMP) ## the test suite (trains a smoke-size target once, executes every notebook at smoke size)
	$(PY) -m pytest

lab: $(STAMP) ## JupyterLab with the project's kernel
	$(VENV)/bin/jupyter lab notebooks

benchmark: $(STAMP) ## speed and memory figures of the attacks on the embedded target
	$(PY) scripts/benchmark.py --preset configs/$(PRESET).yaml

install: $(STAMP)

# The environment: a virtual environment with the package and its pinned dependencies (pyproject.toml).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name mialib --display-name "mialib (.venv)" > /dev/null
	touch $(STAMP)

clean-outputs:
	rm -rf outputs
