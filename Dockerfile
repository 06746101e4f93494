# Multi-stage build: compile with the full Rust toolchain, ship only the binary on a
# distroless base that runs as a non-root user.
#
#   docker build -t abproxy .
#   docker run -p 8080:8080 -p 9090:9090 -v $PWD/config/canary.toml:/etc/abproxy/abproxy.toml:ro abproxy
#
# Mount the config directory (not just the file) when you want live reloads from a
# Kubernetes ConfigMap: abproxy watches the directory for the `..data` symlink swap.
# In a container, set `admin = "0.0.0.0:9090"` so Prometheus can scrape it.

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
COPY config/demo.toml /etc/abproxy/abproxy.toml
USER nonroot:nonroot
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/abproxy"]
CMD ["run", "--config", "/etc/abproxy/abproxy.toml"]
