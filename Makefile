# The two commands a newcomer needs:  `make demo` (the main job) and `make test` (the tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# pytest-xdist workers for `make test` (auto: one per core; 0: one process), each running whole test files
PYTEST_WORKERS ?= auto

.PHONY: setup test demo lint bench clean-venv

$(BIN)/heist: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(BIN)/heist

setup: $(BIN)/heist  ## create .venv with torch and Heist (editable) plus dev tools

test: setup  ## lint, then the whole test suite against a real Redis (started here if none runs)
	bash scripts/ensure-tools.sh
	bash scripts/ensure-redis.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: setup  ## the demo campaign on CPU with the bundled corpus; prints where the report is
	bash scripts/ensure-redis.sh
	$(BIN)/heist campaign run configs/campaigns/demo.toml

lint: setup
	$(BIN)/ruff check .

bench: setup  ## every benchmark under bench/, JSON to stdout and bench/results/
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
