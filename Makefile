# aidc developer entry points. `make lab` and `make test` create .venv when missing.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)/agents

.PHONY: lab test test-fast system-deps lint clean lab-down

$(STAMP): requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in the lock: it installs a CPU build from local disk.
	$(VENV)/bin/pip install --quiet -r requirements.lock
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

lab: $(STAMP)
	$(VENV)/bin/aidc lab run

lab-down: $(STAMP)
	$(VENV)/bin/aidc lab down

# Every test, the slow end-to-end ones included (CI runs exactly this).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# Unit tests only, for a quick loop while editing.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

# Debian packages that some end-to-end tests drive for real (Prometheus, Alertmanager,
# sshd, Slurm, SoftHSM). Tests skip with the reason when these are absent.
SYSTEM_PACKAGES := prometheus prometheus-alertmanager openssh-server iproute2 sqlite3 gcc slurm-wlm munge softhsm2 opensc nftables
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "system packages present"; fi

clean:
	rm -rf .aidc .pytest_cache
