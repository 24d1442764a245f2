#!/usr/bin/env bash
# System packages the suite needs on a fresh Debian machine. Idempotent: installs only what is missing.
set -euo pipefail
need=()
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)  # tests/test_deploy_files.py lints deploy/
command -v chromium >/dev/null 2>&1 || need+=(chromium)  # the serve page's browser test (Playwright drives it)
command -v mvn >/dev/null 2>&1 || need+=(maven)  # scripts/setup-jars.sh fetches Delta's jars
if ((${#need[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing system packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
