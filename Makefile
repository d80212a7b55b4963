# Entry points. `make install` builds .venv once (re-run when pyproject.toml or constraints.txt change).
PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
EXP        ?= byol_cifar
ARGS       ?=
CKPT       ?=
FMNIST_DEB := /usr/share/datasets/fashion-mnist

.PHONY: install test lint data demo pretrain linear-eval bench quality clean
DEMO_DIR   := runs/demo

install: $(VENV)/.installed

# pip on these machines is configured with a local folder holding a CPU-only torch that PyPI's torchvision
# cannot import against; PIP_FIND_LINKS=" " switches it off so torch and torchvision come from the index together.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON_SYS) -m venv $(VENV)
	PIP_FIND_LINKS=" " $(PY) -m pip install --quiet --upgrade pip
	PIP_FIND_LINKS=" " $(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

# Fashion-MNIST offline: Debian ships it; install it where apt is available and nothing is found.
data:
	@if [ -f data/FashionMNIST/raw/train-images-idx3-ubyte ] || [ -d $(FMNIST_DEB) ]; then \
		echo "Fashion-MNIST found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
		echo "installed Debian's dataset-fashion-mnist into $(FMNIST_DEB)"; \
	else \
		echo "Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist' or set data.download=true"; exit 1; \
	fi

# Offline, CPU, under 5 minutes: BYOL on 10k Fashion-MNIST images, then linear + kNN evaluation of the teacher
# and of the same network at its random initialisation (probe and kNN fitted on 20k training images, full test set).
# Batch 32 for 3 epochs rather than 64 for 4: 1.5x the optimiser steps in about the same time, which a run this short
# needs more (+1.1 linear, +2.0 kNN20 against random init; docs/quality_fmnist.md).
demo: install data
	rm -rf $(DEMO_DIR)
	$(PY) -m ssl.pretrain +experiment=byol_fmnist device=cpu logger=none run_dir=$(DEMO_DIR) \
		data.limit=10000 data.batch_size=32 trainer.epochs=3 trainer.warmup_epochs=1
	$(PY) -m ssl.linear_eval ckpt=$(DEMO_DIR)/teacher.pt device=cpu baseline=random data.limit=20000

pretrain: install
	$(PY) -m ssl.pretrain +experiment=$(EXP) $(ARGS)

linear-eval: install
	$(PY) -m ssl.linear_eval ckpt=$(CKPT) $(ARGS)

# Pictures of an export (embedding map, retrieval grid, dense PCA, ViT attention) beside it; t-SNE needs .[viz].
.PHONY: visualize
visualize: install
	$(PY) -m ssl.visualize ckpt=$(CKPT) $(ARGS)

# Benchmarks print a table and write JSON under bench/ (CPU here; pass DEVICE=cuda on a GPU machine).
DEVICE ?= cpu
bench: install
	$(PY) -m scripts.bench_ema --device $(DEVICE) --json bench/ema.json
	$(PY) -m scripts.bench_augment --device $(DEVICE) --json bench/augment.json
	$(PY) -m scripts.bench_folder --device $(DEVICE) --json bench/folder.json
	$(PY) -m scripts.bench_pretrain --device $(DEVICE) --json bench/pretrain.json
	$(PY) -m scripts.bench_linear_eval --device $(DEVICE) --json bench/linear_eval.json

# Learning quality (about an hour on a 2-core CPU): BYOL and DINO on Fashion-MNIST against random init and a
# supervised reference; writes bench/quality.md and bench/quality.json. Segmentation heads train 5 epochs, not
# ssl.segment's 20, to keep six models' scoring within the hour (the same for every row).
quality: install data
	$(PY) -m scripts.bench_quality --device $(DEVICE) --segment-override train.epochs=5

clean:
	rm -rf runs outputs multirun .pytest_cache .ruff_cache
