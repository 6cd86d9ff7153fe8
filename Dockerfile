# istio-vault-webhook container image.
#
#   docker build -t REGISTRY/istio-vault-webhook:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Two stages: a pinned Rust toolchain builds the release binary with the committed Cargo.lock
# (--locked); the runtime is distroless "cc" (glibc, libgcc, CA roots, tzdata, a nonroot user;
# no shell, no package manager), because the binary links glibc dynamically. The builder is
# Debian 12 like the runtime, so the glibc the binary was linked against is the one it runs on.
#
# Base images are pinned by tag AND digest (multi-arch index digests). Refresh both together:
#   docker buildx imagetools inspect rust:1.95.0-slim-bookworm
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot

FROM docker.io/library/rust:1.95.0-slim-bookworm@sha256:d7482085ff5b415f84dba5647ae71606650bdef00db7aeb69f4b3d170c3e4082 AS build
WORKDIR /src
# Everything the crate needs to build; .dockerignore keeps target/, .git and tool caches out.
COPY . .
# The cache mounts only speed up rebuilds on one builder; the result does not depend on them.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin istio-vault-webhook \
    && install -D -m 0555 target/release/istio-vault-webhook /out/istio-vault-webhook

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="istio-vault-webhook" \
      org.opencontainers.image.description="Mutating admission webhook that makes istiod and Istio gateways read their CA from Vault via the Vault Agent Injector" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot" \
      org.opencontainers.image.base.digest="sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f"

COPY --from=build /out/istio-vault-webhook /usr/local/bin/istio-vault-webhook

# Numeric, so the kubelet can verify runAsNonRoot without a runAsUser (the manifests set it too).
USER 65532:65532
# 8443: HTTPS admission (POST /mutate); 8080: admin (/healthz, /readyz, /metrics).
EXPOSE 8443 8080
ENTRYPOINT ["/usr/local/bin/istio-vault-webhook"]
CMD ["serve"]
