#!/usr/bin/env bash
# Runtime benchmark: needs wrk (Debian package) and the project's venv. Prints a table of ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
command -v taskset >/dev/null || { echo "taskset (util-linux) is required" >&2; exit 1; }
exec .venv/bin/python benchmarks/runtime_bench.py "$@"
