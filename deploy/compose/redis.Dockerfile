# Redis for the compose stack where no image registry is reachable (docs/compose.md): Debian's redis-server on the
# same base as oneha's image. Where a registry is reachable, the compose file's default redis:7-alpine is simpler.
#   docker build -f deploy/compose/redis.Dockerfile --build-arg BASE_IMAGE=oneha-base:local -t oneha-redis:local .
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o redis -g redis -m 0750 /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
