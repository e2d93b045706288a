# token-sidecar image: build with the official Rust image, run on distroless (no shell, no
# package manager, CA certificates included) as a non-root user.
#   docker build -t token-sidecar .
# The build command below is the one .ci/run proves: cargo build --release --locked

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, in a layer of their own: built against stub sources, so that a change
# under src/ rebuilds only this crate. (The manifest names a bench target, which must exist.)
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > benches/hot_path.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/token-sidecar target/release/deps/token_sidecar-* target/release/deps/libtoken_sidecar-* target/release/.fingerprint/token-sidecar-*
COPY src ./src
# The image ships without the line tables the release profile keeps for profiling: 50 MB of
# the 60 MB image (symbols stay, so a backtrace still names its functions).
RUN cargo build --release --locked \
    && strip --strip-debug target/release/token-sidecar

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/token-sidecar /usr/local/bin/token-sidecar
COPY LICENSE /usr/share/doc/token-sidecar/LICENSE
# Mount the config (a ConfigMap, a compose volume) here; secrets as files beside it.
# DL3064 reads "TOKEN" in the name as a secret: the value is a file path.
# hadolint ignore=DL3064
ENV TOKEN_SIDECAR_CONFIG=/etc/token-sidecar/sidecar.toml
# distroless' "nonroot" user
USER 65532:65532
# 8080: applications' plain HTTP; 9901: admin (health, readiness, metrics, /tokens)
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
# No shell in the image: the binary probes its own admin listener.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["/usr/local/bin/token-sidecar", "probe"]
ENTRYPOINT ["/usr/local/bin/token-sidecar"]
CMD ["run"]
