# KoGPT2 sentiment bot: CPU-only image. Build: docker build -t kogpt2-sentiment-bot .   Run: see README "Run in a container".
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# A non-root user owning the one writable place, /data: the model cache and the SQLite store live there. Created
# before anything is copied in, so a code change does not redo it.
RUN groupadd --gid 10001 bot \
    && useradd --create-home --uid 10001 --gid 10001 bot \
    && mkdir -p /data/hf \
    && chown -R 10001:10001 /data

# torch first and alone: the largest layer, rebuilt only when this pin changes. The CPU index has the CPU-only
# wheel; PyPI's torch for Linux pulls gigabytes of CUDA libraries. Same pin as .ci/run, within pyproject.toml's range.
RUN python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# The other dependencies depend on pyproject.toml only: install the project (editable, as the README's
# `pip install -e .`) over an empty package skeleton, so a change to the code does not reinstall them.
COPY pyproject.toml ./
RUN mkdir core bot \
    && touch core/__init__.py bot/__init__.py README.md \
    && python -m pip install --no-cache-dir -e .

# The code last; the editable install above already points at /app. Root owns it: the bot cannot change itself.
COPY . .

VOLUME ["/data"]

# Settings through BOT_* variables (see settings.toml). The web page must listen on all interfaces in a container.
ENV HF_HOME=/data/hf \
    BOT_STORE__PATH=/data/bot.sqlite3 \
    BOT_WEB__HOST=0.0.0.0 \
    BOT_WEB__PORT=8000

# Numeric, so Kubernetes runAsNonRoot and the host can check it without the image's /etc/passwd.
USER 10001:10001
EXPOSE 8000

# The first start may download the model (~500 MB) into HF_HOME, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 CMD ["python", "-m", "bot.healthcheck"]

# Exec form: python is PID 1 and gets SIGTERM itself, so `docker stop` shuts the bot down cleanly.
CMD ["python", "-m", "bot"]
