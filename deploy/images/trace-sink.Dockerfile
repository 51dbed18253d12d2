# The compose test's stand-in for Jaeger (which Debian does not package): `trace-sink` from the
# tests crate receives OTLP/gRPC on 4317 and answers Jaeger's query API (/api/traces/<id>,
# /api/services) on 16686 from memory. scripts/compose-test.sh builds it with the binary in
# the build context.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
COPY trace-sink /usr/local/bin/
USER 10001:10001
EXPOSE 4317 16686
ENTRYPOINT ["trace-sink"]
