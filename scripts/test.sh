#!/usr/bin/env bash
# The whole test suite, on a fresh machine that has only the Rust toolchain.
#
#   scripts/test.sh [extra arguments for the test runner]
#
# 1. Installs the system packages that tests need, when they are missing
#    (apt-get; as root, or through sudo).
# 2. Runs every test of the workspace: with cargo-nextest when it is
#    installed (per-test timeouts from .config/nextest.toml), then the doc
#    tests, which nextest does not run; with `cargo test` otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

# Commands that tests call, as "command:debian-package"; tests that start
# real servers or validators add theirs here.
#   promtool: cli/tests/processes.rs checks /metrics with `promtool check metrics`.
#   dnsmasq: client/tests/discover.rs serves the discovery zone with a real dnsmasq
#            (it fails under CI=true when dnsmasq is missing).
needs=(
    "promtool:prometheus"
    "dnsmasq:dnsmasq-base"
)

missing=()
for need in ${needs[@]+"${needs[@]}"}; do
    command -v "${need%%:*}" >/dev/null 2>&1 || missing+=("${need#*:}")
done
if ((${#missing[@]})); then
    sudo=()
    if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "test dependencies missing (Debian packages): ${missing[*]};" \
            "no apt-get here: install them by hand, or the tests that need them fail" >&2
    elif [[ $(id -u) -ne 0 && ${#sudo[@]} -eq 0 ]]; then
        echo "test dependencies missing (Debian packages): ${missing[*]};" \
            "not root and no sudo: install them by hand, or the tests that need them fail" >&2
    else
        echo "installing test dependencies: apt-get update, then" \
            "apt-get install -y --no-install-recommends ${missing[*]}" >&2
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
fi

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-tests=pass "$@"
    cargo test --workspace --doc
else
    echo "cargo-nextest not found: running cargo test (no per-test timeouts)" >&2
    cargo test --workspace "$@"
fi
