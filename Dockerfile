# syntax=docker/dockerfile:1
# Two targets: `runtime` (default, serving only: no TensorFlow) and `train` (adds
# TensorFlow to fit the autoencoder). Both run as a non-root user.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin anomalyd \
 && mkdir -p /app/models /app/state && chown anomalyd /app/models /app/state
WORKDIR /app
COPY pyproject.toml README.md ./
COPY daemon ./daemon
COPY config ./config

FROM base AS train
RUN pip install ".[train]"
USER anomalyd
ENTRYPOINT ["anomalyd"]
CMD ["train"]

FROM base AS runtime
RUN pip install .
USER anomalyd
# Per-device state (windows, baselines, alert states) must survive the container: mount a
# volume on /app/state (docker-compose.yml does). The daemon refuses to start if it cannot
# write there.
ENV HEALTH_HOST=0.0.0.0 HEALTH_PORT=8000 MODEL_DIR=/app/models STATE_DIR=/app/state
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('HEALTH_PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["anomalyd"]
CMD ["run"]
