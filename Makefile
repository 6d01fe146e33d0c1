# Every target installs what it needs: a fresh clone runs `make demo` or `make test` and nothing else.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-fast test-detection lint bench bench-speed bench-mnist bench-cifar10 bench-varied bench-gtsrb bench-families bench-families-cifar10 bench-scaling bench-onnx clean

# One pip call (one resolution), without pip's byte-compiling, which runs on one core (a minute for torch's and the
# hub libraries' 15,000 files); compileall then runs on every core. The scanning child writes no bytecode, so what
# it imports must be compiled here: everything but the tools and the libraries only unconfined processes import
# (Ray's workers, transformers beside the test that builds its folder, which compile their own on first use). A
# file some package ships that does not compile is left, as pip leaves it.
$(STAMP): pyproject.toml lab/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile $(TORCH) -e ".[dev,hub,ray]" -e ./lab
	$(BIN)/python -m compileall -q -j 0 -x '/site-packages/(ray|transformers|pip|setuptools|mypy|hypothesis|_pytest)/' \
		"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /dev/null || true
	touch $(STAMP)

setup: $(STAMP)

# The main job on the bundled example: scan a BadNets-trojaned MNIST model (exit 1 = backdoor found, expected),
# the clean one (exit 0), then screen a mixed set of clean and triggered digits.
demo: $(STAMP)
	$(BIN)/backdoorscan model models/mnist_badnets_3x3.pt2 --data data/mnist/test_2000.npz \
		--out demo-out/badnets --markdown demo-out/badnets.md || [ $$? -eq 1 ]
	$(BIN)/backdoorscan model models/mnist_clean.pt2 --data data/mnist/test_2000.npz --out demo-out/clean
	$(BIN)/backdoorscan filter models/mnist_badnets_3x3.pt2 --clean data/mnist/test_2000.npz \
		--input data/mnist/screen_demo.npz --out demo-out/screening || [ $$? -eq 1 ]
	@echo "Reversed triggers: demo-out/badnets/triggers.png; screening manifest: demo-out/screening/manifest.csv"

# What CI runs (.ci/run): lint, then every test but the default-size detection claims, on two workers (one torch
# thread each; a module's tests stay on one worker so its fixtures run once); the slowest are listed.
test: $(STAMP) lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not detection" -n 2 --dist loadfile --durations=12 --timeout=900

# The detection claims on real models at default size (minutes more): before a release, after a method change.
test-detection: $(STAMP)
	$(BIN)/python -m pytest -q -m detection --durations=12 --timeout=900

# Before every commit (< 1 minute on 2 cores): decision, staging selection, settings/CLI parity, the pickle reader,
# the graph allowlist, the shape grammar, samples, labels, escapes and the fuzzed parsers; no training, no full scan.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --timeout=120

# Lint, format and types: ruff (check and format) everywhere, mypy on the package.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts lab
	$(BIN)/ruff format --check src tests benchmarks scripts lab
	$(BIN)/mypy

# Benchmarks read ../shared/data when present and say so when it is absent (CIFAR-10 needs it).
# On 2 CPU cores: bench-mnist ~35 min, bench-cifar10 ~90 min (docs/results.md has the figures they print).
bench: bench-speed bench-mnist bench-cifar10 bench-varied bench-gtsrb bench-families bench-scaling bench-onnx

bench-mnist: $(STAMP)
	$(BIN)/python benchmarks/zoo.py --dataset mnist --out bench-out/zoo --per-group 5
	$(BIN)/python benchmarks/detection.py --zoo bench-out/zoo --methods usb,nc
	$(BIN)/python benchmarks/filtering.py --zoo bench-out/zoo

bench-cifar10: $(STAMP)
	$(BIN)/python benchmarks/zoo.py --dataset cifar10 --out bench-out/zoo-cifar10 --per-group 3
	$(BIN)/python benchmarks/detection.py --zoo bench-out/zoo-cifar10 --methods usb,nc
	$(BIN)/python benchmarks/filtering.py --zoo bench-out/zoo-cifar10

# The varied zoo (issue 11): 48 MNIST and 24 CIFAR-10 models from random recipes, a quarter set aside before
# tuning; rebuilds resume, so a rerun only scans. On 2 CPU cores: MNIST ~15 min to train, CIFAR-10 ~90 min;
# scans ~30 s (MNIST) and ~100 s (CIFAR-10) per model and method.
bench-varied: $(STAMP)
	$(BIN)/python benchmarks/zoo.py --dataset mnist --recipes 48 --out bench-out/zoo-varied-mnist
	$(BIN)/python benchmarks/detection.py --zoo bench-out/zoo-varied-mnist --methods usb,nc
	$(BIN)/python benchmarks/filtering.py --zoo bench-out/zoo-varied-mnist --methods uap,uap1,strip
	$(BIN)/python benchmarks/zoo.py --dataset cifar10 --recipes 24 --out bench-out/zoo-varied-cifar10
	$(BIN)/python benchmarks/detection.py --zoo bench-out/zoo-varied-cifar10 --methods usb,nc
	$(BIN)/python benchmarks/filtering.py --zoo bench-out/zoo-varied-cifar10 --methods uap,uap1,strip
	$(BIN)/python benchmarks/cost.py

bench-gtsrb: $(STAMP)  # 43 classes: staged USB and NC, full scans for the comparison (hours on a CPU)
	$(BIN)/python benchmarks/zoo.py --dataset gtsrb --recipes 20 --out bench-out/zoo-varied-gtsrb
	$(BIN)/python benchmarks/detection.py --zoo bench-out/zoo-varied-gtsrb --methods usb,nc --name staged
	$(BIN)/python benchmarks/detection.py --zoo bench-out/zoo-varied-gtsrb --methods usb --refine all --name full
	$(BIN)/python benchmarks/detection.py --staged-from bench-out/zoo-varied-gtsrb/full.json

# Issue 25's families zoo (source-specific, all-to-all, WaNet, three kinds of clean control; MNIST): 16 models a
# family, every fourth aside; rebuilds resume. On one CPU thread ~1 min to train and ~1.5 min to scan a model.
bench-families: $(STAMP)
	$(BIN)/python benchmarks/zoo_families.py --out bench-out/zoo-families --per-family 16
	$(BIN)/python benchmarks/detection_families.py --zoo bench-out/zoo-families
	$(BIN)/python benchmarks/filtering_families.py --zoo bench-out/zoo-families

# The families on CIFAR-10 (needs ../shared's archive; about 2 hours on 2 CPU cores): the first batch of docs/results.md
bench-families-cifar10: $(STAMP)
	$(BIN)/python benchmarks/zoo_families.py --dataset cifar10 --out bench-out/zoo-families-cifar10 \
		--families source_specific --per-family 8
	$(BIN)/python benchmarks/zoo_families.py --dataset cifar10 --out bench-out/zoo-families-cifar10 \
		--families all_to_all,clean --per-family 2
	$(BIN)/python benchmarks/zoo_families.py --dataset cifar10 --out bench-out/zoo-families-cifar10 \
		--families clean --start 4 --per-family 2
	$(BIN)/python benchmarks/zoo_families.py --dataset cifar10 --out bench-out/zoo-families-cifar10 \
		--families wanet --per-family 1
	$(BIN)/python benchmarks/detection_families.py --zoo bench-out/zoo-families-cifar10

bench-scaling: $(STAMP)
	$(BIN)/python benchmarks/scaling.py --classes 10,43,100,1000 --sides 32,64 --eta

bench-speed: $(STAMP)
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf demo-out bench-out .pytest_cache

# Which ONNX exports convert, and how close their logits are to onnxruntime's (docs/formats.md); ~5 min.
bench-onnx: $(STAMP)
	$(BIN)/python benchmarks/onnx_formats.py
