# fastlb in a container: the wheel is built in a first stage (compiler, headers, Cython stay
# there); the image gets the wheel, its three runtime dependencies and a non-root user.
#   docker build -t fastlb .
#   docker run --rm -p 8080:8080 -v $PWD/fastlb.toml:/etc/fastlb/fastlb.toml:ro fastlb
# The default config is the sample (`fastlb demo --print-config`); mount your own over it.
# Inside a container bind the metrics port to 0.0.0.0 if a scraper outside must reach it.

FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM python:3.11-slim
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir /tmp/fastlb-*.whl && rm /tmp/fastlb-*.whl \
    && useradd --system --no-create-home --shell /usr/sbin/nologin fastlb \
    && mkdir -p /etc/fastlb /run/fastlb /var/lib/fastlb \
    && fastlb demo --print-config > /etc/fastlb/fastlb.toml \
    && chown fastlb:fastlb /run/fastlb /var/lib/fastlb
USER fastlb
EXPOSE 8080 9100
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2)"
ENTRYPOINT ["fastlb", "run", "-c", "/etc/fastlb/fastlb.toml"]
