#!/usr/bin/env bash
# What the console's browser tests need besides the Python packages: Debian's chromium (Playwright's Python
# API drives it as the system browser). Installed with apt-get when we are root and it is missing; where it
# cannot be installed the browser tests skip, saying why. Never fails the build by itself.
set -u
for candidate in "${ADTR_TESTS_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
        echo "browser tests: using $candidate"
        exit 0
    fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "browser tests: installing Debian's chromium (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; then
        echo "browser tests: installed $(/usr/bin/chromium --version 2>/dev/null)"
        exit 0
    fi
    echo "browser tests: apt-get could not install chromium; they will be skipped" >&2
else
    echo "browser tests: no chromium and no root apt-get to install it (sudo apt-get install chromium);" \
         "they will be skipped" >&2
fi
exit 0
