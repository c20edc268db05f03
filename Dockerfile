# Heist: one image for the victim service, the attacker and the campaign runner (entrypoint: `heist`).
#
#   docker build -t heist:local .                                   # CPU torch (default)
#   docker build -t heist:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#
# `docker compose up` builds it and runs redis + victim + campaign (see docker-compose.yml and
# docs/evaluation.md). Model weights and datasets are never baked in: the zoo trains on first use
# and caches under HEIST_DATA_DIR (/data, a volume).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_PINS="torch==2.14.1 torchvision==0.29.1"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HEIST_DATA_DIR=/data \
    MPLBACKEND=Agg

WORKDIR /app

# torch first, from the wheel index matching the build (CPU by default): the largest, slowest layer.
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple ${TORCH_PINS}

# Then Heist itself (non-editable; package data such as Lua scripts and templates included).
COPY pyproject.toml README.m[d] ./
COPY heist ./heist
COPY translators ./translators
COPY victim_service ./victim_service
COPY defenses ./defenses
COPY attacker ./attacker
COPY evaluation ./evaluation
RUN pip install . && heist --help > /dev/null

COPY configs ./configs

RUN useradd --create-home --uid 10001 heist \
    && mkdir -p /data /app/runs \
    && chown -R heist:heist /data /app/runs
USER heist
VOLUME ["/data"]
EXPOSE 8000

ENTRYPOINT ["heist"]
CMD ["--help"]
