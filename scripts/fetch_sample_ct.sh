#!/usr/bin/env bash
# Fetch (or verify) the two real sample chest CTs; see scripts/fetch_sample_ct.py --help.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python scripts/fetch_sample_ct.py "$@"
