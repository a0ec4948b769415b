#!/usr/bin/env bash
# The newcomer's install, measured: `pip install torch==2.13.0 -r REQUIREMENTS` into a fresh venv, for each
# requirements file given, in turn and twice (interleaved: a, b, a, b), all with one pip cache
# ($PIP_CACHE_DIR, default /tmp/agd-pip-cache). Prints seconds, the size of site-packages (du), and whether
# pandas, scikit-learn or matplotlib came along.
#
#   git show main:requirements.txt > /tmp/requirements-main.txt
#   flock /tmp/agd-heavy.lock bash bench/install.sh /tmp/requirements-main.txt requirements.txt
set -euo pipefail
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-/tmp/agd-pip-cache}
PYTHON=${PYTHON:-python3}
for round in 1 2; do
  for req in "$@"; do
    venv=/tmp/venv-install-$round-$(basename "$req" .txt)
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    start=$(date +%s.%N)
    "$venv/bin/pip" install -q torch==2.13.0 -r "$req"
    seconds=$(echo "$(date +%s.%N) - $start" | bc)
    site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    mb=$(du -sm "$site" | cut -f1)
    packages=$("$venv/bin/pip" list --format=freeze | wc -l)
    heavy=$("$venv/bin/pip" list --format=freeze | grep -i -E "^(pandas|scikit-learn|matplotlib)==" | tr '\n' ' ' || true)
    printf "round %s  %-28s %6.1f s  %5s MB  %3s packages  heavy: %s\n" "$round" "$req" "$seconds" "$mb" \
      "$packages" "${heavy:-none}"
    [ "$round" = 2 ] || rm -rf "$venv"  # the second round's venvs stay, to be looked at
  done
done
