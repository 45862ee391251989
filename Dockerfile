# syntax=docker/dockerfile:1
# Build stage: a wheel and its dependencies in a virtual environment.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY daemon ./daemon
COPY sql ./sql
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir '.[chain]'

# Runtime stage: the virtual environment only, run by an unprivileged user.
FROM python:3.11-slim
RUN groupadd --system --gid 10001 workflowd \
    && useradd --system --uid 10001 --gid workflowd --no-create-home workflowd
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PORT=3000 \
    WORKFLOWD_HOST=0.0.0.0
USER 10001:10001
EXPOSE 3000
# Slim images have no curl: probe /healthz with Python itself.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '3000')}/healthz\", timeout=4).status == 200 else 1)"]
ENTRYPOINT ["workflowd", "run"]
