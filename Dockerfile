# syntax=docker/dockerfile:1
# rag-sidecar container image: built with the same `make release` as on a
# developer machine, run from a distroless image as a non-root user.
#   docker build -t rag-sidecar:0.1.0 \
#     --build-arg RAG_SIDECAR_COMMIT=$(git rev-parse --short=7 HEAD) .
# (.git is not in the build context: without the argument, --version says
# the version alone.)
# The final image holds the binary and the default config only.

# --- build: Debian bookworm, the glibc the runtime image has ---------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock Makefile build.rs ./
COPY src ./src
# The mock app is a workspace member: cargo needs its manifest to build at all.
COPY mock-app ./mock-app
COPY benches ./benches
COPY config ./config
# The commit --version names (build.rs reads it when .git is absent).
ARG RAG_SIDECAR_COMMIT=
RUN make release

# --- runtime: distroless (glibc, CA certificates, no shell), non-root ---------
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /src/target/release/rag-sidecar /usr/local/bin/rag-sidecar
COPY --from=build /src/config/rag-sidecar.toml /etc/rag-sidecar/rag-sidecar.toml
# distroless's "nonroot" user (65532); the config and binary are read-only.
USER 65532:65532
WORKDIR /tmp
EXPOSE 5003
ENTRYPOINT ["/usr/local/bin/rag-sidecar", "--config", "/etc/rag-sidecar/rag-sidecar.toml"]
CMD ["run"]
