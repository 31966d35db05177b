# syntax=docker/dockerfile:1.7
#
# The kiln image: one image for the operator and for the driver and executor pods of every
# job. They are one `kiln` binary (`kiln operator`, `kiln driver`, `kiln executor`), so one
# image means one build, one tag to pin, one layer cached per node, and no version skew
# between the operator and the pods it creates (the operator's default job image is its
# own). What a second, operator-only image would save is the engine's share of the binary
# (DataFusion), paid once per node that pulls it.
#
#   docker build -t ghcr.io/kiln-dev/kiln:dev .
#   docker run --rm ghcr.io/kiln-dev/kiln:dev --help
#
# Runtime base: distroless/cc (glibc, libgcc_s, CA certificates, tzdata, a `nonroot` user
# 65532), not a static musl binary on scratch. The binary links DataFusion and Arrow,
# whose many-threaded, allocation-heavy execution runs markedly slower on musl's
# allocator (swapping the allocator would mean a change to the crate, not the image);
# the native pieces (ring for rustls, zstd) build for glibc with no extra toolchain; and
# libgcc_s gives panics their unwinding. TLS is rustls with the system's roots
# (/etc/ssl/certs, which distroless ships): no OpenSSL.
#
# Pods built from this image must match its entrypoint. The operator's job pods and the
# chart's operator pod run `command: [kiln]` (operator/src/pods.rs, ENTRYPOINT) with the
# subcommand and flags as `args`: `kiln` is found on PATH, which therefore names
# /usr/local/bin explicitly. tests/helm/check and the end-to-end helm test check both.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# Line tables are for local debugging; the image keeps symbols (readable backtraces) only.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin kiln \
    && install -D -m 0755 target/release/kiln /out/usr/local/bin/kiln \
    && /out/usr/local/bin/kiln --version

# Same Debian release as the build stage, so the binary's glibc matches.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin
USER 65532:65532
WORKDIR /home/nonroot
ENTRYPOINT ["/usr/local/bin/kiln"]
CMD ["--help"]
