# syntax=docker/dockerfile:1.7
# Two targets:
#   api    - CPU image: FastAPI + SQLAlchemy + Celery client, and CPU torch for validating method options;
#            also runs the webhook worker (`secateurs service webhooks`)
#   worker - CUDA image: the pruning engine + Celery worker (one job per GPU process)
#
#   docker build --target api -t secateurs-api .
#   docker build --target worker -t secateurs-worker .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SECATEURS_DATA_DIR=/var/lib/secateurs
RUN useradd --system --uid 10001 --home-dir /app secateurs && mkdir -p /var/lib/secateurs \
    && chown secateurs /var/lib/secateurs
WORKDIR /app
# Job bodies are validated against the registered methods' option models, and the method modules import torch:
# the CPU build (about 200 MB, no CUDA), then the service dependencies, then the project without deps.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4" numpy
RUN pip install "fastapi>=0.115" "uvicorn[standard]>=0.30" "python-multipart>=0.0.9" "sqlalchemy>=2.0.30,<3" \
        "alembic>=1.13" "psycopg[binary]>=3.1" "celery[redis,sqlalchemy]>=5.4,<6" "kombu>=5.4" "redis>=5" \
        "boto3>=1.34" "prometheus-client>=0.20" "httpx>=0.27" "pydantic>=2.7,<3" "pydantic-settings>=2.3" \
        "typer>=0.12" "rich>=13" "httpcore>=1.0" "standardwebhooks>=1.0" "cryptography>=42"
# lm-eval: job creation checks `evaluation.tasks` names and task files (422) against its task index
RUN pip install "lm-eval>=0.4.13,<0.5"
COPY pyproject.toml README.md alembic.ini ./
COPY core ./core
COPY api ./api
COPY worker ./worker
COPY cli ./cli
COPY client ./client
COPY migrations ./migrations
RUN pip install --no-deps -e .
USER secateurs
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
CMD ["uvicorn", "api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]

# ---------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SECATEURS_DATA_DIR=/var/lib/secateurs HF_HOME=/var/lib/secateurs/hf
RUN useradd --system --uid 10001 --home-dir /app secateurs && mkdir -p /var/lib/secateurs \
    && chown secateurs /var/lib/secateurs
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY core ./core
COPY api ./api
COPY worker ./worker
COPY cli ./cli
COPY client ./client
COPY migrations ./migrations
# torch comes with the base image (CUDA build); pip keeps it when it satisfies the requirement.
RUN pip install -e ".[datasets,lmeval]"
USER secateurs
# One job per process, a fresh child per job, late acks (see worker/celery_app.py).
CMD ["celery", "-A", "worker.main", "worker", "--loglevel=INFO", "--pool=prefork", "--concurrency=1", \
     "--without-gossip", "--without-mingle", "--without-heartbeat", "-Q", "secateurs"]
