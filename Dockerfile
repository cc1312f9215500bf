# syntax=docker/dockerfile:1
# The aidc node agent and failover controller image: the aidc package with its `agent` extra
# (device, health, failover with the Kubernetes client, runbooks, audit; no torch).
#
#   make image        # = docker build -t ghcr.io/aidc-project/aidc-agent:0.1.0 .
#
# That tag is the cluster spec's default `agent.image` (aidc.spec.Agent): the agent DaemonSet
# and the failover controller Deployment (infra/aidc_infra) both run it. tests/test_packaging.py
# checks this file against the package metadata.

# Stage 1: build the wheel from the checkout (runbooks, playbooks and example stacks go in as
# package data, see setup.py), and the one requirement line that installs it with the agent
# extra, hashed like every line of the lock (pip checks either all hashes or none).
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
    && cd /dist && wheel="$(ls aidc-*.whl)" \
    && echo "aidc[agent] @ file:///dist/${wheel} --hash=sha256:$(sha256sum "${wheel}" | cut -d' ' -f1)" > requirement.txt

# Stage 2: the runtime. The agent extra's dependencies come from requirements-agent.lock (the
# agent's part of requirements.lock: versions and hashes, no torch); the wheel and the lock are
# mounted for the install only, so neither stays in a layer.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    --mount=type=bind,source=requirements-agent.lock,target=/tmp/requirements-agent.lock \
    pip install --no-cache-dir --require-hashes -r /tmp/requirements-agent.lock -r /dist/requirement.txt
# The unprivileged user the controller Deployment names (runAsUser/runAsGroup 10001). The agent
# DaemonSet overrides it only where the spec's kernel log is /dev/kmsg (privileged).
RUN groupadd --gid 10001 aidc \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin aidc
USER 10001:10001
LABEL org.opencontainers.image.title="aidc-agent" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.ref.name="ghcr.io/aidc-project/aidc-agent:0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["aidc"]
CMD ["agent", "run", "--help"]
