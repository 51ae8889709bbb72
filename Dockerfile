# fpgaserve: `fpgaserve serve` with gRPC on port 8500 and Prometheus metrics on port 8501.
#
#   docker build -t fpgaserve:0.1.0 .
#   docker run --rm -p 8500:8500 -p 8501:8501 fpgaserve:0.1.0
#
# Stages: builder (a virtual environment in /opt/venv) -> model (the default model, compiled
# here) -> runtime (slim Python, the venv and the model, non-root). docs/deployment.md explains
# the build arguments, configuration and how to pass an FPGA board in.
# tests/test_deployment.py lints this file with hadolint and replays the builder stage's RUN steps
# in a fresh virtual environment: keep them plain POSIX shell.

ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first (TensorFlow is most of the image): this layer is rebuilt only when
# pyproject.toml changes, not on every source change.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

# The package itself (the design card's top-level folders install as fpgaserve.* subpackages).
COPY fpgaserve ./fpgaserve
COPY hal ./hal
COPY kernels ./kernels
COPY protos ./protos
COPY server ./server
COPY client ./client
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && fpgaserve --version

# ---------------------------------------------------------------------------------------------
FROM builder AS model

# The model baked into the image, served from /models/<MODEL>/1/model.zip. MODEL=none bakes no
# model: mount a model repository at /models (or point FPGASERVE_MODEL_REPOSITORY elsewhere).
# MODEL_WEIGHTS=auto takes ImageNet weights when Keras can download them during the build and
# otherwise random weights, with a warning here and in the model's metadata.
ARG MODEL=resnet50
ARG MODEL_FORMAT=msfp16
ARG MODEL_WEIGHTS=auto
RUN mkdir -p /models \
    && if [ "$MODEL" != none ]; then \
        mkdir -p "/models/$MODEL/1" \
        && fpgaserve build "$MODEL" --format "$MODEL_FORMAT" --weights "$MODEL_WEIGHTS" \
            -o "/models/$MODEL/1/model.zip"; \
    fi

# ---------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime

LABEL org.opencontainers.image.title="fpgaserve" \
      org.opencontainers.image.description="gRPC image-model inference with the featurizer on an FPGA (OpenCL) or its bit-exact emulator" \
      org.opencontainers.image.licenses="MIT"

# A fixed numeric UID/GID so Kubernetes can check runAsNonRoot and volumes can be chowned.
# /etc/OpenCL/vendors is where a board's OpenCL ICD file is mounted (docs/deployment.md).
RUN groupadd --system --gid 10001 fpgaserve \
    && useradd --system --uid 10001 --gid fpgaserve --home-dir /home/fpgaserve --create-home \
        --shell /usr/sbin/nologin fpgaserve \
    && mkdir -p /etc/OpenCL/vendors

COPY --from=builder /opt/venv /opt/venv
COPY --from=model /models /models

# Every `fpgaserve serve` flag can be set as FPGASERVE_<FLAG>; command-line flags win.
# The PoCL CPU OpenCL platform ships inside the venv (pyopencl's ICD loader finds it there and
# any vendor ICD in /etc/OpenCL/vendors).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    FPGASERVE_MODEL_REPOSITORY=/models \
    FPGASERVE_HOST=0.0.0.0 \
    FPGASERVE_PORT=8500 \
    FPGASERVE_METRICS_PORT=8501 \
    FPGASERVE_DEVICE=emulator \
    FPGASERVE_DRAIN_SECONDS=30 \
    FPGASERVE_LOG_FORMAT=json

USER 10001:10001
WORKDIR /home/fpgaserve
EXPOSE 8500 8501

# grpc.health.v1 on the gRPC port; overall health is SERVING once every model is loaded and
# warm. The start period covers TensorFlow's import and the warm-up run.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["sh", "-c", "fpgaserve health --address \"localhost:${FPGASERVE_PORT}\" --timeout 3"]

# SIGTERM (docker stop, Kubernetes) drains in-flight requests for up to FPGASERVE_DRAIN_SECONDS.
STOPSIGNAL SIGTERM
ENTRYPOINT ["fpgaserve", "serve"]
CMD []
