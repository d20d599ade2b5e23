PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all examples bench bench-quality bench-speed bench-data-aware \
	bench-fidelity lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[ray,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ranksearch demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# every example, the README's Python quick start and the demo, each in a scratch folder
examples: $(STAMP)
	bash .ci/examples

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

bench: $(STAMP)
	$(BIN)/pip install --quiet tensorly-torch || echo "tensorly-torch not installed"
	$(BIN)/python benchmarks/bench_factorize.py
	$(BIN)/python benchmarks/bench_search.py
	$(BIN)/python benchmarks/bench_strategies.py
	$(BIN)/python benchmarks/bench_exhaustive.py
	$(BIN)/python benchmarks/bench_ray.py
	$(BIN)/python benchmarks/bench_quality.py

# the README's results section: Fashion-MNIST, ResNet-20 and the small VGG (about 80 min on
# 2 cores; resumes from benchmarks/out/quality when interrupted)
bench-quality: $(STAMP)
	$(BIN)/pip install --quiet tensorly-torch || echo "tensorly-torch not installed"
	$(BIN)/python benchmarks/bench_quality.py

# the README's speed section: latency search against FLOPs search, uniform ranks and
# torch-pruning on VGG-16, ResNet-56 and a d=512 encoder, batch 1 and 64 (hours on 2 cores;
# resumes from benchmarks/out/speed when interrupted)
bench-speed: $(STAMP)
	$(BIN)/pip install --quiet -e '.[pruning]' || echo "torch-pruning not installed"
	nice -n 10 $(BIN)/python benchmarks/bench_speed.py

# the README's data-aware and proxy-fidelity tables: Fashion-MNIST, ResNet-20 and the small
# VGG (hours on 2 cores; both resume from benchmarks/out when interrupted)
bench-data-aware: $(STAMP)
	nice -n 10 $(BIN)/python benchmarks/bench_data_aware.py

bench-fidelity: $(STAMP)
	nice -n 10 $(BIN)/python benchmarks/bench_fidelity.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
