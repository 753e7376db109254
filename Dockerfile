# The image docker-compose.yml builds for the worker, the sandbox and the CLI.
FROM python:3.11.10-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tollgate ./tollgate
COPY tollgate_dev ./tollgate_dev
COPY workflows ./workflows
COPY activities ./activities
COPY schema ./schema
COPY worker.py starter.py ./
# Editable, so schema/ stays next to the package where the migration runner looks.
RUN pip install --no-cache-dir -e .
USER nobody
