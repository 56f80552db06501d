# syntax=docker/dockerfile:1
# pyexec replica image. Build from the repository root:
#   docker build -t pyexec:0.1.0 .
# Two stages: the builder has a compiler and network access and turns the project and every
# dependency into wheels (and fetches the nltk data); the runtime stage installs those wheels
# offline and carries no compiler.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# build-essential only matters for a dependency without a wheel for this platform; everything
# it builds ends up as a wheel in /wheels, and the compiler stays in this stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
# DL3008 (pin apt versions) is ignored on purpose: Debian replaces the bookworm versions with
# each point and security release, so pinned versions stop resolving and the build breaks. The
# base image tag is the pin; the packages are build tools that never reach the runtime stage.

WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/runtime.lock ./requirements/
COPY client ./client
COPY consumer ./consumer
COPY sandbox ./sandbox
# The locked versions, each checked against its hash (the door inventory and the attack tests
# were run against exactly these), then the client package (the wire messages) and the service
# itself, without resolving anything again.
RUN pip wheel --no-cache-dir --require-hashes --wheel-dir /wheels -r requirements/runtime.lock \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ./client .

# nltk data the scripts use, fetched at build time so the runtime never downloads anything.
# nltk is installed from the wheel just built, so the data matches the shipped nltk.
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/nltk-*.whl \
    && python -m nltk.downloader -d /usr/share/nltk_data punkt_tab stopwords

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="pyexec" \
      org.opencontainers.image.description="Sandboxed Python execution service over NATS" \
      org.opencontainers.image.licenses="Apache-2.0"

# The wheels are bind-mounted from the builder, not copied, so they add no layer.
# --no-index: nothing is fetched from a registry in this stage.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --disable-pip-version-check /wheels/*.whl

# /usr/share/nltk_data is one of the paths the sandbox lets runs read (sandbox/isolation.py).
COPY --from=builder /usr/share/nltk_data /usr/share/nltk_data

# A fixed, non-root uid: the service's "user" isolation layer counts as active when the service
# is not root, and seccomp and Landlock work unprivileged, so EXECUTOR_REQUIRE_ISOLATION=1 holds.
RUN groupadd --system --gid 10001 pyexec \
    && useradd --system --no-log-init --uid 10001 --gid pyexec \
       --home-dir /var/lib/pyexec --create-home --shell /usr/sbin/nologin pyexec

ENV EXECUTOR_REQUIRE_ISOLATION=1 \
    EXECUTOR_LOG_FORMAT=json \
    EXECUTOR_DATA_DIR=/var/lib/pyexec \
    EXECUTOR_METRICS_PORT=9464 \
    NLTK_DATA=/usr/share/nltk_data \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /var/lib/pyexec
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# Prometheus /metrics, /healthz and /readyz.
EXPOSE 9464

# No curl in the slim image: the standard library does the probe. /healthz is liveness only.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=3)"]

# Graceful stop: finish runs in flight within EXECUTOR_SHUTDOWN_GRACE (30 s), drain, exit 0.
# Give the container more than that before it is killed (compose: stop_grace_period 60s).
STOPSIGNAL SIGTERM

ENTRYPOINT ["pyexec"]
CMD ["serve"]
