#!/usr/bin/env bash
# System packages the dashboard and paper tests need: Debian's chromium (driven by Playwright's Python client, which
# downloads no browser here) and a small TeX Live for pdflatex. Idempotent: installs only what is missing.
set -euo pipefail

PACKAGES=(chromium texlive-latex-base texlive-latex-recommended)  # booktabs, graphicx, geometry: nothing more

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "ci-system-deps: all present (${PACKAGES[*]})"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "ci-system-deps: need root or sudo to apt-get install ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
echo "ci-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
command -v chromium >/dev/null && command -v pdflatex >/dev/null
