#!/usr/bin/env bash
# Start a local redis-server on 127.0.0.1:${REDIS_PORT:-6379} unless one already answers there.
set -euo pipefail
port="${REDIS_PORT:-6379}"
if command -v redis-cli >/dev/null 2>&1 && redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1; then
  exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "error: redis-server not found. Install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)." >&2
  exit 1
fi
mkdir -p .cache/redis
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
  --dir "$(pwd)/.cache/redis" --logfile "$(pwd)/.cache/redis/redis.log"
for _ in $(seq 1 50); do
  redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "error: redis-server did not answer on 127.0.0.1:$port (see .cache/redis/redis.log)" >&2
exit 1
