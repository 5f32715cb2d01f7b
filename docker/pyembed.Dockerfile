# pyembed itself (the CLI, the worker, the metrics endpoint), without PostgreSQL.
#   docker build -f docker/pyembed.Dockerfile -t pyembed .      (from the repository root)
#   docker run --rm -e PYEMBED_DSN=... pyembed pyembed worker --forever
FROM python:3.12-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
COPY pyproject.toml README.md /src/pyembed/
COPY pyembed /src/pyembed/pyembed
COPY sql /src/pyembed/sql
COPY alembic /src/pyembed/alembic
RUN pip install --no-cache-dir /src/pyembed \
 && useradd --system --uid 10001 --home-dir /home/pyembed --create-home pyembed
COPY docker/pyembed-entrypoint.sh /usr/local/bin/pyembed-entrypoint
USER pyembed
WORKDIR /home/pyembed
ENTRYPOINT ["pyembed-entrypoint"]
CMD ["pyembed", "--help"]
