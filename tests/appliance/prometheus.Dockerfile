# Test-only stand-in for prom/prometheus (no registry here): Debian's Prometheus on the
# mmdebstrap base image. Same flags and config mount as the real image.
ARG BASE_IMAGE=svllm-test/bookworm-python:1
FROM ${BASE_IMAGE}
RUN set -eu; apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    install -d /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
