# syntax=docker/dockerfile:1
# The aidc node agent and failover controller image: the aidc package with its `agent` extra
# (device, health, failover with the Kubernetes client, runbooks, audit; no torch).
#
#   make image        # = docker build --build-arg VCS_REF=$(git rev-parse HEAD) -t ghcr.io/aidc-project/aidc-agent:0.1.0 .
#
# That tag is the cluster spec's default `agent.image` (aidc.spec.Agent): the agent DaemonSet
# and the failover controller Deployment (infra/aidc_infra) both run it. tests/test_packaging.py
# checks this file against the package metadata.
#
# The base is pinned by digest (a tag moves; a digest is the exact image that was tested). The
# digest of python:3.11.10-slim-bookworm below was taken from a Renovate-maintained public digest
# file (github.com/nalabelle/build, images/digests.Dockerfile), not pulled here. Refresh it with
#   docker buildx imagetools inspect python:3.11-slim-bookworm
# (the "Digest:" line of the multi-platform index), changing tag and digest in both FROM lines
# here and in Dockerfile.burnin (tests/test_packaging.py holds them equal).

# Stage 1: build the wheel from the checkout (runbooks, playbooks and example stacks go in as
# package data, see setup.py), and the one requirement line that installs it with the agent
# extra, hashed like every line of the lock (pip checks either all hashes or none).
FROM python:3.11.10-slim-bookworm@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16 AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
    && cd /dist && wheel="$(ls aidc-*.whl)" \
    && echo "aidc[agent] @ file:///dist/${wheel} --hash=sha256:$(sha256sum "${wheel}" | cut -d' ' -f1)" > requirement.txt

# Stage 2: the runtime. The agent extra's dependencies come from requirements-agent.lock (the
# agent's part of requirements.lock: versions and hashes, no torch) in a layer of their own,
# before the wheel: a source change rebuilds only the small wheel layer, the dependency layer
# stays cached until the lock changes. The lock and the wheel are mounted for their install
# only, so neither stays in a layer; `pip check` fails the build if the lock misses a dependency.
FROM python:3.11.10-slim-bookworm@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN --mount=type=bind,source=requirements-agent.lock,target=/tmp/requirements-agent.lock \
    pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements-agent.lock
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install --no-cache-dir --require-hashes --no-deps -r /dist/requirement.txt && pip check
# The unprivileged user the controller Deployment names (runAsUser/runAsGroup 10001). The agent
# DaemonSet overrides it only where the spec's kernel log is /dev/kmsg (privileged).
RUN groupadd --gid 10001 aidc \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin aidc
USER 10001:10001
# The commit the image is built from: `make image` passes it (git rev-parse HEAD).
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="aidc-agent" \
      org.opencontainers.image.source="https://github.com/aidc-project/aidc" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.ref.name="ghcr.io/aidc-project/aidc-agent:0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
# Liveness of the agent (its metrics port, 9402) or of a controller run with --metrics-port
# $AIDC_HEALTH_PORT: /healthz answers 200 while the main loop turns (aidc.probes). Kubernetes
# ignores HEALTHCHECK and uses the pods' own probes (infra/aidc_infra) on the same path.
ENV AIDC_HEALTH_PORT=9402
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['AIDC_HEALTH_PORT'], timeout=4)"]
ENTRYPOINT ["aidc"]
CMD ["agent", "run", "--help"]
