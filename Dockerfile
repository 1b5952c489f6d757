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
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4).status == 200 else 1)"
CMD ["streamlit", "run", "app/streamlit_app.py", "--server.address=0.0.0.0", "--server.port=8501", "--server.headless=true", "--browser.gatherUsageStats=false"]
