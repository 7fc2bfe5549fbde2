# Sourced by scripts/test and scripts/serve: create .venv once, keep it in
# step with pyproject.toml, and activate it. Torch is installed on its own
# first so that an existing (CPU or CUDA) build is kept as it is.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ACESTEP_VENV:-$repo_root/.venv}"
extras="${1:-}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

stamp="$venv/.acestep-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ "$repo_root/pyproject.toml" -nt "$stamp" ] \
    || [ "$repo_root/constraints.txt" -nt "$stamp" ]; then
    python -m pip install --quiet --upgrade pip
    python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
    python -m pip install --quiet -c "$repo_root/constraints.txt" \
        -e "$repo_root${extras:+[$extras]}"
    touch "$stamp"
fi
