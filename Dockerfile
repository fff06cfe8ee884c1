# fastjob-server (and the example worker) in a slim image: the Cython extensions are compiled in
# a build stage, the run stage holds only the installed wheel, runs as a non-root user, and
# reports healthy when /readyz answers (the store answers and the server's lease is valid).
#
#   docker build -t fastjob .
#   docker run -p 7700:7700 -p 7701:7701 fastjob        # SQLite in the container's volume
#   docker compose up                                   # MariaDB and three servers: docker-compose.yml
FROM python:3.11-slim AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md protocol.md ./
COPY fastjob ./fastjob
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[mysql]"

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 fastjob
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && python -c "import fastjob.timewheel as t, sys; sys.exit(0 if t.USING_CYTHON else 'no compiled wheel')"
COPY examples /home/fastjob/examples
RUN mkdir -p /home/fastjob/data && chown 10001 /home/fastjob/data
USER 10001
WORKDIR /home/fastjob
VOLUME ["/home/fastjob/data"]
EXPOSE 7700 7701
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7701/readyz', timeout=2)"]
ENTRYPOINT ["fastjob-server"]
CMD ["--host", "0.0.0.0", "--db", "sqlite:////home/fastjob/data/fastjob.db", "--insecure"]
