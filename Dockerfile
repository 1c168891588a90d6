# Cinderblock: one image for every role (controller, agent, node, all).
# Build:  docker build -t cinderblock .
# The runtime carries the host tools the roles drive: lvm2 and thin-provisioning-tools
# (agent), tgt (agent's iSCSI target), open-iscsi, e2fsprogs and xfsprogs (node).

FROM rust:1-bookworm AS build
WORKDIR /src
# protox compiles the protos in build.rs: no protoc needed.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin cinderblock \
 && strip target/release/cinderblock

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      lvm2 thin-provisioning-tools tgt open-iscsi e2fsprogs xfsprogs util-linux ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/cinderblock /usr/local/bin/cinderblock
ENTRYPOINT ["/usr/local/bin/cinderblock"]
CMD ["--help"]
