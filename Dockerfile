# syntax=docker/dockerfile:1
# Cinderblock: one image for every role (controller, node, agent, all) and for tgtd, which
# the Helm chart (deploy/helm/cinderblock) runs beside the agent.
#   docker build -t cinderblock .
# Lint: tests/kube/lint-dockerfile.sh (hadolint). No image is built in CI: there is no
# container engine on the CI machines.

# ---- build -------------------------------------------------------------------------------
# The toolchain the project is developed with (Cargo.toml's rust-version is the minimum).
FROM rust:1.95-bookworm AS build
WORKDIR /src
# build.rs compiles the protos with protox (pure Rust): no protoc in the image.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
# Cargo.toml declares the benches, so their files must be present to build anything.
COPY benches ./benches
COPY src ./src
# --locked: exactly the dependency versions of Cargo.lock, or fail.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin cinderblock \
 && install -D -m 0755 -s target/release/cinderblock /out/cinderblock

# ---- runtime -----------------------------------------------------------------------------
FROM debian:bookworm-slim
# The host tools the roles drive:
#   agent: lvm2 + thin-provisioning-tools (LVM thick and thin pools), tgt (tgtd, tgtadm);
#   node:  open-iscsi (iscsiadm), e2fsprogs and xfsprogs (mkfs, resize, fsck),
#          util-linux (mount, blkid, nsenter to reach the host's iscsid);
#   all:   ca-certificates (TLS to S3 backup repositories).
# Versions are bookworm's, updated by rebuilding (see .hadolint.yaml about DL3008).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      lvm2 thin-provisioning-tools tgt open-iscsi e2fsprogs xfsprogs util-linux ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/cinderblock /usr/local/bin/cinderblock
# No USER: the image runs as root on purpose. The agent creates logical volumes and
# device-mapper devices and drives tgtd; the node service logs in to iSCSI targets, makes
# filesystems and mounts them into the kubelet's directory (nsenter into the host's
# namespaces): all of it needs root and CAP_SYS_ADMIN in privileged pods. The controller
# needs none of that and could run as any user; it shares the image, so its pod spec is
# where a non-root user would be set.
ENTRYPOINT ["/usr/local/bin/cinderblock"]
CMD ["--help"]
