# Shared environment for Kiln's scripts: sourced, never run. Sets the repository root, the private
# state directory (.kiln/, ignored by git), keeps wrangler offline and quiet, and small helpers.
# shellcheck shell=bash

KILN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KILN_ROOT
KILN_DIR="$KILN_ROOT/.kiln"
KILN_DOCKER_DIR="$KILN_DIR/docker"
KILN_DOCKER_SOCK="$KILN_DOCKER_DIR/docker.sock"
KILN_IMAGE="kiln-busybox:latest"
# The job image with git and the real agent CLIs (scripts/agent-image), and where
# scripts/agent-clis installs those CLIs on the host (node_modules/.bin/claude, .../codex).
KILN_AGENT_IMAGE="kiln-agent:latest"
KILN_AGENTS_DIR="$KILN_DIR/agents"

# Pinned tool versions (see PLATFORM.md: the wasm-bindgen library in Cargo.toml must match the CLI).
WORKER_BUILD_VERSION="0.8.7"
WASM_BINDGEN_VERSION="0.2.129"

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$KILN_ROOT/node_modules/.bin:$PATH"

# wrangler works fully offline; these only stop it from trying to reach the network, and keep its
# config and caches inside the repository instead of $HOME.
export WRANGLER_SEND_METRICS=false
export WRANGLER_SEND_ERROR_REPORTS=false
export CLOUDFLARE_CF_FETCH_ENABLED=false
export WRANGLER_HIDE_BANNER=true
export XDG_CONFIG_HOME="$KILN_DIR/xdg/config"
export XDG_CACHE_HOME="$KILN_DIR/xdg/cache"
mkdir -p "$XDG_CONFIG_HOME" "$XDG_CACHE_HOME"

log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Runs a command as root (directly when we are root, else through sudo).
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# A value from .dev.vars (KEY="value" or KEY=value lines), empty when absent.
dev_var() {
  local key="$1" file="$KILN_ROOT/.dev.vars" line value
  [ -f "$file" ] || return 0
  line="$(grep -E "^[[:space:]]*${key}[[:space:]]*=" "$file" | tail -n 1)" || return 0
  value="${line#*=}"
  value="$(printf '%s' "$value" | sed -E 's/^[[:space:]]+//; s/[[:space:]]+$//')"
  case "$value" in
    \"*\") value="${value#\"}"; value="${value%\"}" ;;
    \'*\') value="${value#\'}"; value="${value%\'}" ;;
  esac
  printf '%s' "$value"
}

# True when the private dockerd answers on its socket.
docker_ping() {
  [ -S "$KILN_DOCKER_SOCK" ] &&
    curl -fsS --max-time 2 --unix-socket "$KILN_DOCKER_SOCK" http://localhost/_ping >/dev/null 2>&1
}

# Sends SIGTERM to a process group, then SIGKILL to what is left after a grace period.
kill_group() {
  local pgid="$1" grace="${2:-10}" i
  [ -n "$pgid" ] || return 0
  kill -TERM -- "-$pgid" 2>/dev/null || return 0
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 -- "-$pgid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL -- "-$pgid" 2>/dev/null || true
}

# The native linux-x64 executable of an agent CLI installed by scripts/agent-clis (the npm
# packages' commands are a copy of it for claude, a Node launcher of it for codex).
agent_binary() {
  local modules="$KILN_AGENTS_DIR/node_modules"
  case "$1" in
    claude) printf '%s' "$modules/@anthropic-ai/claude-code-linux-x64/claude" ;;
    codex) printf '%s' "$modules/@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex" ;;
    *) die "no agent CLI named $1" ;;
  esac
}
