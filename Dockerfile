# The example actix-web service (examples/actix_web_service.rs) in a small
# runtime image. Built by docker-compose.yml.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY cli cli
COPY testkit testkit
COPY migrations migrations
COPY examples examples
COPY tests tests
COPY benches benches
COPY README.md README.md
RUN cargo build --release --locked --example actix_web_service

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/examples/actix_web_service /usr/local/bin/actix_web_service
USER nobody
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=3s CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/actix_web_service"]
