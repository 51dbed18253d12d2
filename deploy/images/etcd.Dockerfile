# etcd from Debian's packages (etcd 3.4), for machines that reach no container registry: the
# compose test's stand-in for gcr.io/etcd-development/etcd. Build from deploy/images:
#   docker build -f etcd.Dockerfile --build-arg BASE=agentmesh/debian-base:bookworm -t agentmesh/etcd:debian .
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server etcd-client >/dev/null \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
 && mkdir -p /var/lib/etcd && chown etcd /var/lib/etcd && chmod 700 /var/lib/etcd
USER etcd
EXPOSE 2379
CMD ["etcd", "--data-dir=/var/lib/etcd"]
