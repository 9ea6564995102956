# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PY      := .venv/bin/python
STAMP   := .venv/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test lint setup data device-data lm-demo

setup: $(STAMP) data

# setup.py and the C source too: the 1-bit kernel (dynaslice/binary/_bitconv) is rebuilt when they change
$(STAMP): pyproject.toml constraints.txt setup.py dynaslice/binary/csrc/bitconv.c
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST comes from Debian's package; without apt/root we say exactly what to run.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || exit 1; \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install -y dataset-fashion-mnist' (or pass --data-dir)"; exit 1; \
	  fi; \
	fi

test: setup
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check dynaslice tests bench

demo: setup
	$(PY) -m dynaslice.cli run configs/demo.yaml --out runs/demo

# Issue 32's language-model demo (docs/LM.md): Debian's fortunes corpus, pinned by version, then
# the user's model, the widths alone and nested training, one thread on core 0 (about 40 min)
FORTUNES_VERSION := 1:1.99.1-7.3
lm-demo: setup
	@if [ "$$(dpkg-query -W -f='$${Version}' fortunes 2>/dev/null)" != "$(FORTUNES_VERSION)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq fortunes=$(FORTUNES_VERSION)) >/dev/null || exit 1; \
	  else \
	    echo "the corpus is missing: run 'sudo apt-get install -y fortunes=$(FORTUNES_VERSION)'"; exit 1; \
	  fi; \
	fi
	taskset -c 0 $(PY) bench/bench_lm_nested.py

# Fashion-MNIST copied into the checkout for a device machine, which gets only the checkout
# (git-ignored; name it in the device tool's carry: bench/gpu_check.sh)
device-data: data
	mkdir -p data/fashion-mnist && cp $(dir $(FMNIST))*.gz data/fashion-mnist/
