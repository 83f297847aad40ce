# meshinit + meshproxy image. Build: docker build -t meshinit:latest .
# Without a registry: scripts/image.sh builds the same runtime image with podman from
# a Debian rootfs (mmdebstrap) and the binaries built here; a test compares the two.
#
# The base images are build arguments, for a mirror or a local copy:
#   docker build --build-arg BUILD_IMAGE=registry.example/rust:1-bookworm \
#                --build-arg RUNTIME_IMAGE=registry.example/debian:bookworm-slim .
#
# The build step is exactly what CI and scripts/demo.sh run (a test compares them):
#   cargo build --release --locked -p meshinit -p meshproxy
# The binaries link glibc dynamically (aws-lc and the std resolver); the runtime
# stage is the same Debian release as the builder, so they match.
ARG BUILD_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p meshinit -p meshproxy

FROM ${RUNTIME_IMAGE}
# nft and iptables/ip6tables (legacy and nft flavours), which meshinit runs. No file
# capabilities anywhere: the init container runs as root with NET_ADMIN in its
# bounding set, and a binary carrying file capabilities its container lacks (nft and
# xtables-*-multi with cap_net_raw, under `drop: [ALL], add: [NET_ADMIN]`) cannot
# even be executed. See the README's "Capabilities".
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/meshinit /usr/local/bin/meshinit
COPY --from=build /src/target/release/meshproxy /usr/local/bin/meshproxy
# meshinit-cni: the name a conflist's "type" uses; the DaemonSet copies it to the
# node's /opt/cni/bin.
RUN ln -s meshinit /usr/local/bin/meshinit-cni
# The proxy's UID (meshinit's --proxy-uid default): the image runs meshproxy by
# default; the init container overrides the user (see deploy/pod.yaml).
USER 2102:2102
ENTRYPOINT ["/usr/local/bin/meshproxy"]
