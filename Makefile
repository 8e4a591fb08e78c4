# The two commands: `make run` (the main job on the embedded default) and `make test` (the test suite).
PRESET ?= default
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# img2dataset (driven by `mialib download`) needs pandas < 3, so it lives in its own environment inside .venv.
I2D := $(VENV)/img2dataset
I2D_STAMP := $(I2D)/.installed

.PHONY: run prepare notebooks test test-fast lint format lab install tools clean-outputs benchmark benchmark-sd

run: $(STAMP) ## build data and target if missing, then execute the notebooks with papermill
	$(PY) -m mialib all --preset configs/$(PRESET).yaml

prepare: $(STAMP) ## only build the embedded data and the tiny target
	$(PY) -m mialib prepare --preset configs/$(PRESET).yaml

notebooks: $(STAMP) ## only execute the notebooks (data and target must exist)
	$(PY) -m mialib notebooks --preset configs/$(PRESET).yaml

test: ## the test suite (trains a smoke-size target once, executes every notebook at smoke size), then its numerics on the default CPU kernels
	$(MAKE) -j2 $(STAMP) $(I2D_STAMP)  # the two environments install side by side
	$(MAKE) lint
	$(PY) -m pytest -n 2 --dist loadscope  # two workers, one thread each; a module's tests share a worker (tests/conftest.py)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -m numerics -q -p no:cacheprovider  # the tolerances hold on other instruction sets

test-fast: $(STAMP) ## the tests not marked slow (no target training, no notebooks, none over ~2 s; tests/conftest.py): under 2 minutes
	$(PY) -m pytest -m "not slow" -q

lint: $(STAMP) ## ruff: lint and check the formatting (pyproject.toml [tool.ruff]; notebooks are linted, not formatted)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP) ## ruff: format the code, then apply the safe lint fixes (what `make lint` checks)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

lab: $(STAMP) ## JupyterLab with the project's kernel
	$(VENV)/bin/jupyter lab notebooks

benchmark: $(STAMP) ## speed and memory figures of the attacks on the embedded target
	$(PY) scripts/benchmark.py --preset configs/$(PRESET).yaml

benchmark-sd: $(STAMP) ## random weights in real shapes: SD 1.5 (64 and 256 px, 4 GB disk); ARGS="--family sd3|flux --device cuda": SD3.5-medium / FLUX.1-dev at 1024 px in bf16 (16 / 34 GB); ARGS="--family sd3 --scale tiny" on a CPU
	$(PY) scripts/benchmark_sd.py $(ARGS)

install: $(STAMP)

tools: $(I2D_STAMP) ## the img2dataset command that `mialib download` drives (.venv/img2dataset/bin/img2dataset)

# The environment: a virtual environment with the package and its pinned dependencies (pyproject.toml).
# The base environment is created first (both installs below need its folder; creating .venv and
# .venv/img2dataset at once under `make -j2` can race), then the two installs run side by side.
$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name mialib --display-name "mialib (.venv)" > /dev/null
	touch $(STAMP)

clean-outputs:
	rm -rf outputs

$(I2D_STAMP): | $(PY)
	test -x $(I2D)/bin/python || $(PYTHON) -m venv $(I2D)
	$(I2D)/bin/python -m pip install --quiet "img2dataset==1.47.0"
	touch $(I2D_STAMP)
