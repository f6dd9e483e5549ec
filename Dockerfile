# Builds the pgduplex binary into a small runtime image (used by docker-compose.yml).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sql ./sql
# Declared in Cargo.toml, so the manifest needs it present (it is not built here).
COPY benches ./benches
RUN cargo build --release --locked --bin pgduplex

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/pgduplex /usr/local/bin/pgduplex
ENTRYPOINT ["pgduplex"]
CMD ["run", "--config", "/etc/pgduplex/pgduplex.toml"]
