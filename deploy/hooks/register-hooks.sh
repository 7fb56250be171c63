#!/usr/bin/env bash
# Register every oneha hook template in this folder with `onehook create` (OpenNebula 5.10+). Run as oneadmin on the
# front-end. Existing hooks of the same NAME are left alone (onehook reports the clash); delete them first to update.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for template in "$here"/*.hook; do
    echo "onehook create $template"
    onehook create "$template"
done
