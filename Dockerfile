# The flotilla binary, built on the host (`deploy/build`), on Debian slim: it links only glibc
# (ldd), so nothing is installed. The health check speaks HTTP through bash's /dev/tcp, so no
# curl and no extra code in the image; it probes /readyz of whichever component runs on 5000.
FROM debian:bookworm-slim

RUN useradd --system --uid 10001 --home-dir /data --create-home flotilla
COPY deploy/probe /usr/local/bin/flotilla-probe
ARG BINARY=target/release/flotilla
COPY ${BINARY} /usr/local/bin/flotilla
USER flotilla
WORKDIR /data
EXPOSE 5000
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/flotilla-probe", "5000", "/readyz"]
ENTRYPOINT ["flotilla"]
# Last, so that a new revision rebuilds no layer.
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=https://github.com/flotilla/flotilla
LABEL org.opencontainers.image.title="flotilla" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
