# Redis from Debian's packages (Redis 7.0), for machines that reach no container registry: the
# compose test's stand-in for redis:7.0. Build from deploy/images:
#   docker build -f redis.Dockerfile --build-arg BASE=agentmesh/debian-base:bookworm -t agentmesh/redis:debian .
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
 && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no", "--dir", "/data"]
