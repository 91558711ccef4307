# Multi-stage build of the single `observer` binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p observer \
 && cp target/release/observer /observer

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /observer /usr/local/bin/observer
ENV LOG_FORMAT=json
# SIGTERM → graceful shutdown (worker flushes its batch and closes the gateway resumably).
STOPSIGNAL SIGTERM
ENTRYPOINT []
CMD ["observer", "api"]
