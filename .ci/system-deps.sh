#!/usr/bin/env bash
# The system packages claude-code-cluster needs beside Python and git, installed when
# missing. Idempotent, and fast when nothing is missing (no apt-get at all then), so the
# README's commands and CI (.ci/run) call it first, every time.
#
#   bubblewrap  `bwrap`: the sandbox every command of the coder and every repository's
#               tests run in (infra/adapters/git/sandbox.py); the agents refuse to run
#               commands without it unless started with --sandbox none
#   ripgrep     `rg`: the coder's search tool (a subprocess with a timeout, not Python's re)
#   util-linux  `prlimit`: the sandbox's resource limits (Essential on Debian: always there)
#   chromium    the browser the dashboard's tests drive headless (Playwright launches this
#               system binary; nothing is downloaded at run time)
set -euo pipefail

missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v rg >/dev/null 2>&1 || missing+=(ripgrep)
command -v prlimit >/dev/null 2>&1 || missing+=(util-linux)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${missing[*]}, and this is not a Debian/Ubuntu system (no apt-get):" \
       "install them with the system's package manager" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "system-deps: missing ${missing[*]}; run as root or install sudo" >&2
    exit 1
  fi
  sudo=(sudo)
fi
echo "system-deps: installing ${missing[*]}" >&2
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
