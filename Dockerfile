# Container image of relayaudit: a builder stage makes the wheels, a slim runtime runs `relayaudit run` as uid 10001.
#
#   docker build -t relayaudit .
#   docker run -d --name relayaudit \
#       -v /srv/relayaudit/etc:/etc/relayaudit:ro -v relayaudit-state:/var/lib/relayaudit relayaudit
#
# Mount a config at /etc/relayaudit/relayaudit.toml (none is baked in: scope and targets are the
# operator's) with state.path and output.findings under /var/lib/relayaudit and logging.stdout on
# (the default), so `docker logs` shows the JSON log. Connect scans need no capabilities: run with
# `--cap-drop ALL --security-opt no-new-privileges --read-only --tmpfs /tmp` if you like.
#
# RUN --mount needs BuildKit (the default builder since Docker 23).
#
# There is no Docker engine on the project's build machines: tests/test_container_steps.py runs
# these same steps outside Docker (wheels, venv, install, entrypoint, healthcheck) and parses this
# file, so it fails when the two drift apart. scripts/lint-deploy lints this file with hadolint.

FROM python:3.11-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relayaudit/ relayaudit/
# relayaudit's wheel and a wheel of every dependency (uvloop included: the `speed` extra), so
# the runtime stage installs offline
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels '.[speed]'

FROM python:3.11-slim AS runtime
# RELAYAUDIT_HEALTHZ_URL: what HEALTHCHECK asks; the default matches metrics.listen's default
# (127.0.0.1:9425). If your config moves metrics.listen, pass -e RELAYAUDIT_HEALTHZ_URL=... too.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/relayaudit/bin:$PATH \
    RELAYAUDIT_HEALTHZ_URL=http://127.0.0.1:9425/healthz
RUN groupadd --system --gid 10001 relayaudit \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/relayaudit --shell /usr/sbin/nologin relayaudit \
    && install -d -m 0755 /etc/relayaudit \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/relayaudit
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/relayaudit \
    && /opt/relayaudit/bin/python -m pip install --no-cache-dir --no-index --find-links /wheels 'relayaudit[speed]'
VOLUME ["/etc/relayaudit", "/var/lib/relayaudit"]
WORKDIR /var/lib/relayaudit
USER 10001:10001
# /metrics and /healthz (metrics.listen); publish it only if the config listens beyond loopback
EXPOSE 9425
# urlopen raises on a refused connection or any non-2xx answer (503 = no sweep completed in time)
HEALTHCHECK --interval=60s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['RELAYAUDIT_HEALTHZ_URL'], timeout=5)"]
# SIGTERM stops the daemon within its 10 s stop bound; give `docker stop` a bit more (-t 30)
STOPSIGNAL SIGTERM
ENTRYPOINT ["relayaudit"]
CMD ["run", "--config", "/etc/relayaudit/relayaudit.toml"]
