# syntax=docker/dockerfile:1
# coati_ray on Ray 2.60 in a container: the image of deploy/rayjob.yaml (KubeRay), of a cluster that
# takes `ray job submit`, or of a single-machine run (docs/cluster.md#docker).
#
#   docker build -t coati-ray:0.1.0-cpu .                             # CPU: torch's CPU wheel
#   docker build -t coati-ray:0.1.0-cuda --build-arg VARIANT=cuda .   # NVIDIA GPUs: CUDA torch + the vllm extra
#   docker run --rm coati-ray:0.1.0-cpu coati demo                    # the tiny pipeline on an embedded Ray
#
# The tags carry pyproject.toml's version; deploy/rayjob.yaml names the cuda one
# (tests/unit/test_deploy.py checks both). CUDA itself comes inside the torch and vLLM wheels (their
# nvidia-* dependencies): the host needs the NVIDIA driver and container toolkit only, so both
# variants start from the same Python image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# cpu or cuda
ARG VARIANT=cpu
# Installed first and pinned, as scripts/setup.sh does, so that resolving the rest never replaces it.
ARG TORCH_SPEC=torch==2.13.0
# Every node of a cluster runs the same Ray; KubeRay's rayVersion in deploy/rayjob.yaml says this one.
ARG RAY_VERSION=2.60.0
# pyproject.toml extras on top of the base project: serve (coati serve), rewards (--reward_fn math).
# The cuda variant adds vllm (--generator_backend vllm; it pins the same torch).
ARG EXTRAS=serve,rewards

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/coati_venv PATH=/opt/coati_venv/bin:$PATH

# wget: KubeRay's readiness and liveness probes call it. gcc (cuda): Triton, under vLLM, compiles a
# small launcher at run time. The profile.d line: KubeRay runs `ray start` in a login shell
# (bash -lc), whose /etc/profile resets PATH; the environment's bin goes back in front.
RUN set -eux; \
    case "$VARIANT" in \
      cpu) pkgs="" ;; \
      cuda) pkgs="gcc libc6-dev" ;; \
      *) echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 1 ;; \
    esac; \
    apt-get update; \
    apt-get install -y --no-install-recommends wget $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    useradd --create-home --uid 1000 --shell /bin/bash ray; \
    python -m venv "$VIRTUAL_ENV"; \
    chown -R ray:ray "$VIRTUAL_ENV"; \
    echo 'export PATH=/opt/coati_venv/bin:$PATH' > /etc/profile.d/coati_venv.sh

USER ray
WORKDIR /home/ray/coati_ray

# torch from the index of the variant: its CPU wheel index, or PyPI (CUDA build on Linux x86_64).
RUN set -eux; \
    case "$VARIANT" in \
      cpu) index=https://download.pytorch.org/whl/cpu ;; \
      cuda) index=https://pypi.org/simple ;; \
    esac; \
    pip install -q --index-url "$index" "$TORCH_SPEC"

# The project and its extras through scripts/setup.sh (it keeps the torch above: same version).
COPY --chown=ray:ray pyproject.toml README.md ./
COPY --chown=ray:ray scripts/setup.sh scripts/
COPY --chown=ray:ray coati_ray coati_ray/
RUN set -eux; \
    extras="$EXTRAS"; \
    if [ "$VARIANT" = cuda ]; then extras="$extras,vllm"; fi; \
    echo "ray==$RAY_VERSION" > /home/ray/ray-constraint.txt; \
    VENV="$VIRTUAL_ENV" TORCH_SPEC="$TORCH_SPEC" PIP_CONSTRAINT=/home/ray/ray-constraint.txt \
      bash scripts/setup.sh "$extras"; \
    python -c "import torch, ray, coati_ray; print('torch', torch.__version__, 'ray', ray.__version__)"
COPY --chown=ray:ray launchers launchers/
COPY --chown=ray:ray examples examples/

# Ray's head: GCS 6379, dashboard and jobs API 8265, Ray client 10001, metrics 8080 (KubeRay's
# --metrics-export-port). Inside the container an embedded Ray's dashboard listens on 127.0.0.1: for
# `docker run -p 127.0.0.1:8265:8265`, add --dashboard_host 0.0.0.0 (the token stays on).
EXPOSE 6379 8265 10001 8080

CMD ["coati", "--help"]
