# Sourced by scripts/test and scripts/serve; defines `acestep_venv [EXTRAS]`, which
# activates the Python environment the scripts run in. It reads none of the
# caller's arguments: the caller names the pip extras explicitly.
#
#   ACESTEP_VENV unset  .venv in the checkout: created on first use and kept in
#                       step with pyproject.toml and constraints.txt. Torch is
#                       installed on its own first, so an existing (CPU or CUDA)
#                       build is kept as it is.
#   ACESTEP_VENV=DIR    an existing environment that already holds the
#                       dependencies, used as it is (nothing is installed).
# The scripts run this checkout's code (`python -m acestep_daemon`), whatever
# the environment has installed.
acestep_venv() {
    local extras="${1:-}"
    local repo_root
    repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if [ -n "${ACESTEP_VENV:-}" ]; then
        if [ ! -f "$ACESTEP_VENV/bin/activate" ]; then
            echo "ACESTEP_VENV=$ACESTEP_VENV is not a virtual environment (no bin/activate)" >&2
            return 1
        fi
        # shellcheck disable=SC1091
        . "$ACESTEP_VENV/bin/activate"
        return 0
    fi
    local venv="$repo_root/.venv"
    local stamp="$venv/.acestep-installed${extras:+-$extras}"
    if [ ! -x "$venv/bin/python" ]; then
        echo "setting up .venv (first run: torch and the dependencies, a minute or more;" \
            "ACESTEP_VENV=DIR uses an existing environment instead)..." >&2
        python3 -m venv "$venv"
    fi
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
    if [ ! -f "$stamp" ] || [ "$repo_root/pyproject.toml" -nt "$stamp" ] \
        || [ "$repo_root/constraints.txt" -nt "$stamp" ]; then
        echo "installing this checkout${extras:+ with [$extras]} into .venv (its first use," \
            "or pyproject.toml or constraints.txt changed)..." >&2
        python -m pip install --quiet --upgrade pip
        python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
        # setuptools warns on every editable install, "be careful with folders named like
        # your package": that is the point of this one (the checkout's code runs).
        PYTHONWARNINGS="ignore:Editable installation" python -m pip install --quiet \
            -c "$repo_root/constraints.txt" -e "$repo_root${extras:+[$extras]}"
        touch "$stamp"
        echo ".venv is ready" >&2
    fi
}
