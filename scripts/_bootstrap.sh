# Shared set-up for scripts/serve and scripts/test: each step installs what is missing and
# skips what is there, so a second run is fast. Progress goes to stderr (stdout may be an
# MCP stdio channel). Sourced, not run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STATE="$ROOT/.state"
[ -d "$STATE" ] || mkdir -p "$STATE"

say() { printf '[setup] %s\n' "$*" >&2; }

is_debian_root() { [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; }

ensure_python() {
  local stamp="$VENV/.installed" want have=""
  want="$(sha256sum "$ROOT/pyproject.toml")" && want="${want:0:16}"
  if [ -f "$stamp" ]; then read -r have <"$stamp" || true; fi
  if [ "$have" = "$want" ]; then return; fi
  # A bare Debian has neither git nor venv support; python3-venv brings ensurepip.
  if ! command -v git >/dev/null || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    if is_debian_root; then
      apt_install git python3 python3-venv
    else
      say "git and Python 3 with venv support are needed; install them (e.g. apt install git python3-venv)."
      return 1
    fi
  fi
  say "installing Python dependencies into .venv"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]" >&2
  echo "$want" > "$stamp"
}

apt_install() {
  say "installing $* with apt"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "$@" >&2
}

ensure_docker() {
  if docker info >/dev/null 2>&1; then return; fi
  if ! command -v dockerd >/dev/null; then
    if is_debian_root; then
      apt_install docker.io
    else
      say "no Docker engine is reachable and none can be installed here (that needs root on Debian)."
      say "Install and start Docker, or set DOCKER_HOST, then run this again."
      return 1
    fi
  fi
  if ! docker info >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
      say "dockerd is installed but not running; start it (e.g. sudo systemctl start docker) and run this again."
      return 1
    fi
    say "starting dockerd in the background (log: .state/dockerd.log)"
    (setsid nohup dockerd >"$STATE/dockerd.log" 2>&1 &)
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { say "dockerd did not come up; see .state/dockerd.log"; tail -20 "$STATE/dockerd.log" >&2; return 1; }
  fi
}

# The agent image's tag names a hash of its recipe and the host's extra CA certificates; working it out
# (`agentic-dispatch image tag`) starts Python, most of a second. .state/agent-image keeps the tag last
# found with a fingerprint of every file that goes into it (and of the code that hashes them): while that
# is unchanged, the tag is known without Python.
IMAGE_STAMP="$STATE/agent-image"

image_inputs_fingerprint() {
  local sum
  sum="$(
    shopt -s globstar nullglob
    files=(/dev/null)  # never none: sha256sum without a file would read stdin, the host's MCP channel
    for f in "$ROOT"/images/agent/** "$ROOT"/server/agentic_dispatch/runtime/images.py \
      /usr/local/share/ca-certificates/**/*.crt; do
      if [ -f "$f" ]; then files+=("$f"); fi
    done
    { sha256sum "${files[@]}" </dev/null 2>/dev/null || true; } | sha256sum
  )"
  echo "${sum:0:16}"
}

# A machine set up already: the stamp's tag is current and its image is there, which also shows the engine
# answers. One `docker image inspect`, so that a host starting the server waits for nothing else.
image_is_ready() {
  local fingerprint tag
  [ -f "$IMAGE_STAMP" ] && read -r fingerprint tag <"$IMAGE_STAMP" || return 1
  [ -n "$tag" ] && [ "$fingerprint" = "$(image_inputs_fingerprint)" ] && docker image inspect "$tag" >/dev/null 2>&1
}

ensure_image() {
  local tag fingerprint
  fingerprint="$(image_inputs_fingerprint)"
  tag="$("$VENV/bin/agentic-dispatch" image tag)"
  if ! docker image inspect "$tag" >/dev/null 2>&1; then
    # Where no registry is reachable the base is bootstrapped from Debian's packages.
    if ! command -v debootstrap >/dev/null && is_debian_root; then apt_install debootstrap; fi
    say "building the agent image $tag (first time only)"
    "$VENV/bin/agentic-dispatch" image build >&2
  fi
  echo "$fingerprint $tag" >"$IMAGE_STAMP.$$" && mv -f "$IMAGE_STAMP.$$" "$IMAGE_STAMP"
}

# The board's browser tests (tests/test_board_browser.py) drive Debian's Chromium headless through its own
# chromedriver (Selenium is told both paths: it downloads nothing). Skipped when both are there.
ensure_browser() {
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then return; fi
  if is_debian_root; then
    apt_install chromium chromium-driver
  else
    say "Chromium and its driver are needed for the board's browser tests (e.g. apt install chromium chromium-driver)."
    return 1
  fi
}

# The swarm tests (tests/test_swarm.py) run a registry for their nodes: Debian's docker-registry (the
# distribution registry), started by the tests themselves on the nodes' bridge.
ensure_registry() {
  if command -v docker-registry >/dev/null; then return; fi
  if is_debian_root; then
    apt_install docker-registry
  else
    say "docker-registry is needed for the swarm tests (e.g. apt install docker-registry)."
    return 1
  fi
}

ensure_node() {
  if command -v npx >/dev/null; then return; fi
  if is_debian_root; then apt_install nodejs npm; else say "Node.js (npx) is needed for the MCP Inspector test"; fi
}

# The MCP hosts whose set-up the README prints, at the versions it was checked with (tests/test_hosts.py
# runs them): Codex CLI and Gemini CLI from npm, in .host-clis/ (never a global install of the user's).
# Gemini CLI needs Node >= 20; where the node on PATH is older (Debian bookworm's is 18) or missing, the
# official Node 22 binary comes from npm's node-linux-<arch> package, with npm 10 to run on it, as in the
# agent image. A stamp naming the versions skips it all on the next run.
HOST_CLIS="$ROOT/.host-clis"
HOST_CODEX_VERSION=0.169.0
HOST_GEMINI_VERSION=0.61.0
HOST_NODE_VERSION=22.23.3
HOST_NPM_VERSION=10.9.9

node_major() { "${1:-node}" --version 2>/dev/null | sed -n 's/^v\([0-9]*\)\..*/\1/p'; }

ensure_host_clis() {
  local stamp="$HOST_CLIS/.installed" want arch
  want="codex@$HOST_CODEX_VERSION gemini@$HOST_GEMINI_VERSION"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$HOST_CLIS/bin/codex" ] \
     && [ -x "$HOST_CLIS/bin/gemini" ] && [ "$(PATH="$HOST_CLIS/bin:$PATH" node_major)" -ge 20 ] 2>/dev/null; then
    return
  fi
  if ! command -v npm >/dev/null; then
    if is_debian_root; then apt_install nodejs npm
    else say "npm is needed to install the host CLIs the tests drive (e.g. apt install nodejs npm)."; return 1; fi
  fi
  say "installing the MCP hosts Codex CLI $HOST_CODEX_VERSION and Gemini CLI $HOST_GEMINI_VERSION into .host-clis"
  mkdir -p "$HOST_CLIS"
  export npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false
  if [ "$(node_major)" -lt 20 ] 2>/dev/null || ! command -v node >/dev/null; then
    case "$(uname -m)" in x86_64) arch=x64 ;; aarch64 | arm64) arch=arm64 ;;
      *) say "no Node 22 package for $(uname -m): install Node >= 20 yourself"; return 1 ;; esac
    say "node on PATH is older than 20: adding Node $HOST_NODE_VERSION and npm $HOST_NPM_VERSION to .host-clis"
    npm install --global --prefix "$HOST_CLIS" "node-linux-$arch@$HOST_NODE_VERSION" </dev/null >&2
    PATH="$HOST_CLIS/bin:$PATH" npm install --global --prefix "$HOST_CLIS" "npm@$HOST_NPM_VERSION" </dev/null >&2
  fi
  # No install scripts: only Gemini CLI's optional native modules (a pty, a keychain) have any, and a
  # headless run needs neither; npm 11 skips them anyway, npm 10 would compile them.
  PATH="$HOST_CLIS/bin:$PATH" npm install --global --prefix "$HOST_CLIS" --ignore-scripts \
    "@openai/codex@$HOST_CODEX_VERSION" "@google/gemini-cli@$HOST_GEMINI_VERSION" </dev/null >&2
  check_host_cli codex "codex-cli $HOST_CODEX_VERSION" && check_host_cli gemini "$HOST_GEMINI_VERSION" || return 1
  echo "$want" > "$stamp"
}

check_host_cli() {
  local got
  got="$(PATH="$HOST_CLIS/bin:$PATH" "$1" --version </dev/null 2>&1)" || true
  if [ "$got" != "$2" ]; then say "$1 --version printed '$got', expected '$2'"; return 1; fi
}
