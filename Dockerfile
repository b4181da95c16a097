# t5qa serve on the CPU: `docker build -t t5qa .`, then
#   docker run -p 8000:8000 -v $PWD/runs/qa/best:/model:ro -e T5QA_API_KEY=... t5qa
# The model is mounted at /model (read-only is enough); flags after the image name replace CMD, e.g.
#   docker run ... t5qa --model /model --host 0.0.0.0 --workers 2 --max-batch-size 16
# GPU variant: start FROM an nvidia/cuda runtime image with Python 3.11 and install torch from the CUDA index
# (https://download.pytorch.org/whl/cu124) instead of the CPU one; run with `docker run --gpus all`. The server
# then answers on the GPU (README, "Scaling up").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# The CPU wheel of torch (an unpinned torch from PyPI is a multi-GB CUDA build).
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[serve,ct2]"

RUN useradd --create-home --uid 10001 t5qa
USER t5qa

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
# Inside a container 0.0.0.0 is the only way in; set T5QA_API_KEY unless the network in front is private.
ENTRYPOINT ["t5qa", "serve"]
CMD ["--model", "/model", "--host", "0.0.0.0", "--port", "8000"]
