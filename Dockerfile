# moe-viz hosted demo: CPU torch, the default model inside, runs as a non-root user.
#   docker build -t moe-viz .
#   docker run --rm -p 8501:8501 moe-viz          # then open http://localhost:8501
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    MOE_VIZ_HOSTED=1 \
    MOE_VIZ_DEFAULT_MODEL=/srv/moe-viz/assets/moe-viz-mini

WORKDIR /srv/moe-viz
# CPU torch first, pinned, from PyTorch's CPU index so no CUDA wheels are pulled; then the rest
# (requirements.txt pins the engine and the app), then the package with its [app] extra.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY requirements.txt pyproject.toml README.md ./
RUN pip install -r requirements.txt
COPY moe_viz ./moe_viz
COPY app ./app
COPY assets ./assets
COPY scripts ./scripts
RUN pip install --no-deps -e ".[app]" && useradd --create-home --uid 1000 moeviz
USER moeviz

EXPOSE 8501
# The launcher loads the default model (and MOE_VIZ_PRELOAD_MODELS) before it starts the server;
# --check is healthy only once that is done and the server answers (/_stcore/health alone turns
# OK before any model is loaded).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["moe-viz", "app", "--check", "--server.port=8501"]
CMD ["moe-viz", "app", "--server.address=0.0.0.0", "--server.port=8501", "--server.headless=true", "--browser.gatherUsageStats=false"]
