# Minimal image until Step 7 (multi-stage build, non-root user, health check, default model).
FROM python:3.11-slim
WORKDIR /opt/fpgaserve
COPY pyproject.toml README.md ./
COPY fpgaserve ./fpgaserve
COPY hal ./hal
COPY kernels ./kernels
RUN pip install --no-cache-dir .
ENTRYPOINT ["fpgaserve"]
CMD ["devices"]
