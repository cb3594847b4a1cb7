# The stream-agg image: every sub-command (worker, migrate, backfill, replay, ...).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY stream_agg ./stream_agg
RUN pip install . \
    && useradd --system --no-create-home --uid 10001 stream-agg

USER stream-agg
EXPOSE 9108
ENTRYPOINT ["stream-agg"]
CMD ["--help"]
