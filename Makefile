# The two commands a newcomer needs:  `make demo` (the main job) and `make test` (the tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# pytest-xdist workers for `make test` (auto: one per core; 0: one process), each running whole test files
PYTEST_WORKERS ?= auto

.PHONY: setup test demo lint bench docs clean-venv

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

docs: setup  ## regenerate docs/cli.md (every command and option) from the commands themselves
	$(BIN)/python -m heist.cli.reference docs/cli.md

# `make bench`: a quick, curated set of benchmarks at small settings (minutes on 2 CPU cores), JSON to BENCH_OUT
# (git-ignored); the committed bench/results/*.json come from the full commands in docs/scaling.md.
BENCH_OUT ?= bench/results/local
BENCH_REDIS_URL ?= redis://127.0.0.1:6379/0

bench: setup  ## a quick set of benchmarks (small settings, a few minutes), JSON to bench/results/local/
	bash scripts/ensure-redis.sh
	@mkdir -p $(BENCH_OUT)
	@set -e; run() { echo "== bench/$$*" >&2; t=$$(date +%s); $(BIN)/python bench/"$$@" > /dev/null; \
	    echo "   $$(( $$(date +%s) - t )) s" >&2; }; \
	run codecs.py --images 4 --repeats 3 --out $(BENCH_OUT)/codecs.json; \
	run eval_metrics.py --images 8 --repeats 2 --out $(BENCH_OUT)/eval_metrics.json; \
	run cli_startup.py --repeats 2 --out $(BENCH_OUT)/cli_startup.json; \
	run watermark.py --images 4 --sizes 128 --out $(BENCH_OUT)/watermark.json; \
	run sybil_linking.py --seeds 1 --keys 2 --queries 8 --benign-clients 2 --photos-per-client 1 \
	    --null-prints 2 --out $(BENCH_OUT)/sybil_linking.json; \
	run serve.py --quick --small --levels 1,8 --requests 16 --configs auto,1 --redis-url $(BENCH_REDIS_URL) \
	    --out $(BENCH_OUT)/serve-cpu.json; \
	run monitor.py --quick --redis-url $(BENCH_REDIS_URL) --out $(BENCH_OUT)/monitor.json; \
	run attack_rate.py --quick --seconds 3 --out $(BENCH_OUT)/attack_rate.json; \
	run mia.py --candidates 8 --akd-steps 10 --out $(BENCH_OUT)/mia.json; \
	run attack_train.py --profiles tiny --steps 5 --out $(BENCH_OUT)/attack_train.json
	@echo "bench: quick-settings JSON in $(BENCH_OUT)/ (not committed; full runs: docs/scaling.md)"

clean-venv:
	rm -rf $(VENV)
