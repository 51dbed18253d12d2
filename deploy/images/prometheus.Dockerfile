# Prometheus from Debian's packages (2.42, with promtool), for machines that reach no container
# registry: the compose test's stand-in for prom/prometheus (same entrypoint, so the compose
# file's arguments work for both). Build from deploy/images:
#   docker build -f prometheus.Dockerfile --build-arg BASE=agentmesh/debian-base:bookworm -t agentmesh/prometheus:debian .
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
 && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
