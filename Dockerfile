# meshinit + meshproxy image. Build: docker build -t meshinit:latest .
#
# The build step is exactly what CI and scripts/demo.sh run (a test compares them):
#   cargo build --release --locked -p meshinit -p meshproxy
# The binaries link glibc dynamically (aws-lc and the std resolver); the runtime
# stage is the same Debian release as the builder, so they match.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p meshinit -p meshproxy

FROM debian:bookworm-slim
# nft, iptables/ip6tables (legacy and nft flavours) for meshinit; setcap for the
# file capabilities below.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables libcap2-bin \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/meshinit /usr/local/bin/meshinit
COPY --from=build /src/target/release/meshproxy /usr/local/bin/meshproxy
# meshinit-validate: the same binary WITHOUT file capabilities, for the
# unprivileged validator container (a binary with +ep file capabilities cannot
# even be executed where the container's bounding set lacks them).
# meshinit-cni: the name a conflist's "type" uses; the DaemonSet copies it to
# the node's /opt/cni/bin.
RUN cp /usr/local/bin/meshinit /usr/local/bin/meshinit-validate \
 && ln -s meshinit /usr/local/bin/meshinit-cni \
 && setcap cap_net_admin,cap_net_raw+ep /usr/local/bin/meshinit \
 && setcap cap_net_admin,cap_net_raw+ep /usr/sbin/xtables-nft-multi \
 && setcap cap_net_admin,cap_net_raw+ep /usr/sbin/xtables-legacy-multi \
 && setcap cap_net_admin,cap_net_raw+ep /usr/sbin/nft
# The proxy's UID (meshinit's --proxy-uid default): the image runs meshproxy by
# default; the init container overrides the user (see deploy/pod.yaml).
USER 2102:2102
ENTRYPOINT ["/usr/local/bin/meshproxy"]
