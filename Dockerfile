# Container image of relayaudit: a builder stage makes the venv from the lock, a slim runtime runs `relayaudit run` as uid 10001.
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
# The image's SBOM (CycloneDX JSON, Python packages only) is /usr/share/doc/relayaudit/sbom.cdx.json:
#   docker run --rm --entrypoint cat relayaudit /usr/share/doc/relayaudit/sbom.cdx.json
#
# There is no Docker engine on the project's build machines: tests/test_container_steps.py runs
# these same steps outside Docker (wheel, venvs, install, SBOM, entrypoint, healthcheck) and parses this
# file, so it fails when the two drift apart. scripts/lint-deploy lints this file with hadolint.

FROM python:3.11-slim AS builder
WORKDIR /src
# Everything below is installed from uv.lock's exports, hashes required (pip's --require-hashes;
# scripts/lock writes them, tests/test_lock.py keeps them in step). First the build tools, in a
# venv of their own that never reaches the runtime image: setuptools (the build backend) and
# cyclonedx-bom (the SBOM).
COPY requirements/ requirements/
RUN python -m venv /opt/tools \
    && /opt/tools/bin/pip install --no-cache-dir --require-hashes --no-deps -r requirements/build.txt
COPY pyproject.toml README.md ./
COPY relayaudit/ relayaudit/
# relayaudit's wheel, built without isolation by the locked setuptools: nothing is downloaded
RUN /opt/tools/bin/pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /wheels .
# The runtime venv, made without pip (and so without setuptools): the locked runtime and `speed`
# dependencies, then relayaudit's own wheel without dependencies. The tools' pip installs into it.
RUN python -m venv --without-pip /opt/relayaudit \
    && /opt/tools/bin/pip --python /opt/relayaudit/bin/python install --no-cache-dir \
        --require-hashes --no-deps -r requirements/runtime.txt \
    && /opt/tools/bin/pip --python /opt/relayaudit/bin/python install --no-cache-dir \
        --no-index --no-deps /wheels/relayaudit-*.whl
# The SBOM: a CycloneDX JSON document of every Python package in the runtime venv (name, version,
# purl, licence), read offline from the venv's metadata, relayaudit itself (from pyproject.toml) as
# its main component. It covers Python packages only, not the base image's Debian packages or
# Python itself.
RUN install -d /usr/share/doc/relayaudit \
    && /opt/tools/bin/cyclonedx-py environment --output-reproducible --output-format JSON \
        --pyproject pyproject.toml --mc-type application \
        --output-file /usr/share/doc/relayaudit/sbom.cdx.json /opt/relayaudit/bin/python

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
# the venv at the same path as in the builder (its scripts name /opt/relayaudit/bin/python), and
# the SBOM of it
COPY --from=builder /opt/relayaudit /opt/relayaudit
COPY --from=builder /usr/share/doc/relayaudit /usr/share/doc/relayaudit
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
