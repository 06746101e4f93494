# Multi-stage build: compile with the full Rust toolchain, ship only the binary on a
# distroless base that runs as a non-root user.
#
#   docker build -t abproxy .
#   docker run -p 8080:8080 -p 9090:9090 -v "$PWD/config:/etc/abproxy:ro" abproxy \
#       run --config /etc/abproxy/canary.toml
#
# The config is read from /etc/abproxy/abproxy.toml unless `--config` says otherwise; mount
# it (for Kubernetes, mount the ConfigMap as the /etc/abproxy directory: abproxy watches the
# directory and sees the `..data` symlink swap). Inside a container the config must listen
# on 0.0.0.0 (`listen = "0.0.0.0:8080"`, `admin = "0.0.0.0:9090"`) to be reachable, and a
# shadow `log` path must be writable by the non-root user (e.g. a volume at /var/log/abproxy).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
COPY loadtest ./loadtest
RUN cargo build --release --locked -p abproxy

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/abproxy /usr/local/bin/abproxy
USER nonroot:nonroot
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/abproxy"]
CMD ["run", "--config", "/etc/abproxy/abproxy.toml"]
