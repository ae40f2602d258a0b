# syntax=docker/dockerfile:1
# Two targets: `runtime` (default, serving only: no TensorFlow) and `train` (adds
# TensorFlow to fit the autoencoder). Both run as a non-root user.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin anomalyd \
 && mkdir -p /app/models /app/state && chown anomalyd /app/models /app/state
WORKDIR /app
# The dependencies first, read from pyproject.toml alone, each set in its own layer: a
# change to the code rebuilds only the small layers after them (TensorFlow alone is
# hundreds of MB). `pip check` after the code's install fails the build if they drift.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
open('/tmp/runtime.txt', 'w').write('\n'.join(p['dependencies'])); \
open('/tmp/train.txt', 'w').write('\n'.join(p['optional-dependencies']['train']))" \
 && pip install -r /tmp/runtime.txt

FROM base AS train
RUN pip install -r /tmp/train.txt
COPY README.md ./
COPY daemon ./daemon
COPY config ./config
RUN pip install --no-deps . && pip check
USER anomalyd
ENTRYPOINT ["anomalyd"]
CMD ["train"]

FROM base AS runtime
COPY README.md ./
COPY daemon ./daemon
COPY config ./config
RUN pip install --no-deps . && pip check
USER anomalyd
# Per-device state (windows, baselines, alert states) must survive the container: mount a
# volume on /app/state (docker-compose.yml does). The daemon refuses to start if it cannot
# write there.
ENV HEALTH_HOST=0.0.0.0 HEALTH_PORT=8000 MODEL_DIR=/app/models STATE_DIR=/app/state
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('HEALTH_PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["anomalyd"]
CMD ["run"]
