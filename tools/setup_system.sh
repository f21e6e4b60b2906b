#!/usr/bin/env bash
# System packages the tests need beyond Python (Debian): idempotent, quiet when all are present.
#   chromium, chromium-driver: the page's browser test (tests/test_browser.py, Selenium)
#   dcmtk: DCMTK's storescu/echoscu/storescp, the second DICOM sender of tests/test_listen_*.py
#          and the plain receiver of benchmarks/listen.py
# Run as root (CI is) or with sudo; a package already installed is not fetched again.
set -euo pipefail
PACKAGES=(
  chromium chromium-driver
  dcmtk
)
missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup_system: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
