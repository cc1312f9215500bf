# aidc developer entry points. `make lab` and `make test` create .venv when missing.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)/agents

.PHONY: lab test test-fast system-deps lint clean lab-down lock image image-burnin

$(STAMP): requirements.lock requirements-dev.lock requirements-aws.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# Exact pins with hashes: the runtime of every extra (torch is the 2.13.0 CPU build, on
	# local disk here; elsewhere add PyTorch's CPU wheel index as an extra index) and the test
	# tools. `make lock` regenerates them.
	$(VENV)/bin/pip install --quiet --require-hashes -r requirements.lock -r requirements-dev.lock
	# boto3 and moto (the aws-kms provider and its tests): --no-deps because botocore declares
	# python-dateutil<3 and kubernetes 37 >=3; the lock pins everything else they need.
	$(VENV)/bin/pip install --quiet --no-deps --require-hashes -r requirements-aws.lock
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

# Recompile the locks from pyproject.toml's extras (pip-tools, from requirements-dev.lock);
# existing pins are kept unless a requirement changed (add --upgrade to move them). The agent
# lock is the image's (Dockerfile): the agent extra's part of requirements.lock.
LOCK_FLAGS := --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
RUNTIME_EXTRAS := agent burnin lab compress infra ansible postgres
lock: $(STAMP)
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) $(addprefix --extra ,$(RUNTIME_EXTRAS)) -o requirements.lock pyproject.toml
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) --extra dev -c requirements.lock -o requirements-dev.lock pyproject.toml
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) --extra agent -c requirements.lock -o requirements-agent.lock pyproject.toml
	# The aws extras against the other locks' pins, all but python-dateutil (see the install above).
	grep -h '^[A-Za-z0-9_.-]*==' requirements.lock requirements-dev.lock | grep -v '^python-dateutil==' \
	  | sed 's/ .*//' | sort -u > aws-constraints.tmp
	$(VENV)/bin/pip-compile $(filter-out --allow-unsafe,$(LOCK_FLAGS)) --unsafe-package python-dateutil \
	  -c aws-constraints.tmp --extra aws --extra aws-test -o requirements-aws.lock pyproject.toml
	rm -f aws-constraints.tmp

# The agent/controller container image (Dockerfile), tagged as the spec's default agent.image.
VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' agents/aidc/__init__.py)
IMAGE ?= ghcr.io/aidc-project/aidc-agent:$(VERSION)
VCS_REF ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
image:
	docker build --build-arg VCS_REF=$(VCS_REF) -t $(IMAGE) .

# The burn-in image (Dockerfile.burnin: the agent and burnin extras, CUDA torch), tagged as the
# spec's default kubernetes.burnin.image.
BURNIN_IMAGE ?= ghcr.io/aidc-project/aidc-burnin:$(VERSION)
image-burnin:
	docker build -f Dockerfile.burnin --build-arg VCS_REF=$(VCS_REF) -t $(BURNIN_IMAGE) .

lab: $(STAMP)
	$(VENV)/bin/aidc lab run

lab-down: $(STAMP)
	$(VENV)/bin/aidc lab down

# Every test, the slow end-to-end ones included (CI runs exactly this). Two workers (pytest-xdist),
# a test file each at a time: most end-to-end tests wait on daemons they start, so two overlap
# well on two cores; a file's tests share their module fixtures on one worker.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# Unit tests only, for a quick loop while editing.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

# Debian packages that some end-to-end tests drive for real (Prometheus, Alertmanager,
# sshd, Slurm, SoftHSM, chromium for the report's browser test through Playwright, which
# downloads no browser of its own). Tests skip with the reason when these are absent.
SYSTEM_PACKAGES := prometheus prometheus-alertmanager openssh-server iproute2 sqlite3 gcc slurm-wlm munge softhsm2 opensc nftables chromium postgresql
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "system packages present"; fi

clean:
	rm -rf .aidc .pytest_cache
