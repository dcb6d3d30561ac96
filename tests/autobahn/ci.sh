#!/usr/bin/env bash
# Runs the Autobahn case set (via kosoku) against comet's echo endpoint on
# both I/O backends and compares with tests/autobahn/expected.json.
# Usage: tests/autobahn/ci.sh [path/to/comet]   (default: target/debug/comet)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/debug/comet}
status=0
for io in uring epoll; do
  log=$(mktemp)
  "$bin" --frontend 127.0.0.1:0 --backend 127.0.0.1:0 --api off --ephemeral --echo-path /echo --max-message-size 1048576 --shards 2 --io "$io" 2>"$log" &
  pid=$!
  addr=""
  for _ in $(seq 100); do
    addr=$(sed -n 's/^comet: frontend listening on //p' "$log")
    [ -n "$addr" ] && break
    sleep 0.1
  done
  if [ -z "$addr" ]; then
    echo "autobahn: comet did not start on $io:"; cat "$log"; kill "$pid" 2>/dev/null || true; exit 1
  fi
  python3 tests/autobahn/run.py "ws://$addr/echo" tests/autobahn/expected.json || status=1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -f "$log"
done
exit $status
