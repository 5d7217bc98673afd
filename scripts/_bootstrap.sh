# Shared set-up for scripts/serve and scripts/test: each step installs what is missing and
# skips what is there, so a second run is fast. Progress goes to stderr (stdout may be an
# MCP stdio channel). Sourced, not run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STATE="$ROOT/.state"
mkdir -p "$STATE"

say() { printf '[setup] %s\n' "$*" >&2; }

is_debian_root() { [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; }

ensure_python() {
  local stamp="$VENV/.installed" want
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
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

ensure_image() {
  local tag
  tag="$("$VENV/bin/agentic-dispatch" image tag)"
  if docker image inspect "$tag" >/dev/null 2>&1; then return; fi
  # Where no registry is reachable the base is bootstrapped from Debian's packages.
  if ! command -v debootstrap >/dev/null && is_debian_root; then apt_install debootstrap; fi
  say "building the agent image $tag (first time only)"
  "$VENV/bin/agentic-dispatch" image build >&2
}

ensure_node() {
  if command -v npx >/dev/null; then return; fi
  if is_debian_root; then apt_install nodejs npm; else say "Node.js (npx) is needed for the MCP Inspector test"; fi
}
