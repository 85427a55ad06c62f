#!/usr/bin/env bash
# make compat TORCH=<version>: install this checkout into its own environment with that torch
# and run the `compat` test subset (tests/conftest.py COMPAT_SUBSET) against the installed package.
#
#   tools/compat.sh 2.11.0            (what `make compat TORCH=2.11.0` runs)
#
# - Environment: .venv-compat/<version>/ (git-ignored), created once and reused; torch==<version>
#   (the default PyPI wheel: its CUDA is whatever that release ships by default) plus the test
#   requirements pinned in requirements-dev.txt (setuptools: the venv's own, 65.5 with Python
#   3.11, unless that torch asks for another), and requirements-nodeps.txt (verl) without
#   dependencies, as the main environment has them.
#   pip runs with an empty constraint file (PIP_CONSTRAINT=/dev/null): a machine-wide pip
#   constraint (e.g. one capping torch) must not decide which torch this checks; and without its
#   cache (PIP_NO_CACHE_DIR): a CUDA torch is ~3 GB of wheels that a cache would keep a second
#   copy of, beside the ~6 GB installed - a CI machine once ran out of disk here.
# - Build: the checkout's files (tracked + untracked, not ignored) are copied to <env>/src and
#   installed with `pip install --no-build-isolation --no-deps .` (no-deps: the env's torch must
#   stay the one asked for). <env>/src/build/ is kept between runs, so a rebuild is incremental.
# - Tests: from <env>/run, a copy of the checkout without topk_distill/, so the package under test
#   is the installed one (checked and printed), never the checkout's in-place build.
#
# Environment variables:
#   TOPK_DISTILL_CUDA=auto|0|1  as for setup.py (auto: CUDA kernels when this torch has CUDA and
#                               nvcc's CUDA major version matches it); printed as a yes/no.
#   TORCH_CUDA_ARCH_LIST        as for setup.py (CI narrows it to 9.0 to save build time).
#   COMPAT_TESTS=subset|all     subset (default): pytest -m compat; all: the whole suite (also
#                               installs the rest of requirements-dev.txt, e.g. megatron-core).
#   PYTEST_ARGS                 extra pytest arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
VER="${1:?usage: tools/compat.sh <torch version>, e.g. 2.11.0}"
MODE="${COMPAT_TESTS:-subset}"
case "$MODE" in subset|all) ;; *) echo "COMPAT_TESTS must be subset or all, not $MODE" >&2; exit 2;; esac
ENV_DIR=".venv-compat/$VER"
PY="$ENV_DIR/bin/python"
export PIP_CONSTRAINT=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
export PATH="$PWD/$ENV_DIR/bin:$PATH"  # this env's ninja for torch's cpp_extension
t0=$(date +%s)
step() { echo "== compat $VER: $* ($(( $(date +%s) - t0 )) s)"; }
free_gb() { df -Pk . | awk 'NR==2 {printf "%.1f", $4 / 1048576}'; }  # GB free under the checkout

# --- environment ---------------------------------------------------------------------------
if [ ! -x "$PY" ]; then
  base=$(command -v python3.11 || command -v python3)
  step "creating $ENV_DIR with $($base --version)"
  "$base" -m venv "$ENV_DIR"
fi
# requirements-dev.txt's pins, less torch (ours is $VER) and setuptools (each torch bounds it).
pins() { grep -vE '^\s*(#|$)' requirements-dev.txt | grep -viE '^(torch|setuptools)\b' | \
         { if [ "$MODE" = all ]; then cat; else grep -iE '^(wheel|ninja|numpy|pytest|hypothesis|megatron-core)\b'; fi; }; }
want="torch==$VER $(pins | tr '\n' ' ')|$(cat requirements-nodeps.txt | grep -vE '^\s*(#|$)' | tr '\n' ' ')"
stamp="$ENV_DIR/.deps-$MODE"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  step "installing torch==$VER and the test requirements into $ENV_DIR ($(free_gb) GB free disk; a CUDA torch needs ~9)"
  "$PY" -m pip install -q "torch==$VER" setuptools $(pins) || {
    echo "== compat $VER: pip install failed with $(free_gb) GB free disk (log above)" >&2; exit 1; }
  "$PY" -m pip install -q --no-deps $(grep -vE '^\s*(#|$)' requirements-nodeps.txt)
  echo "$want" > "$stamp"
fi
"$PY" - "$VER" <<'PYEOF'
import sys, torch
want = sys.argv[1]
got = torch.__version__.split("+")[0]
if got != want:
    sys.exit(f"compat: {sys.executable} has torch {torch.__version__}, not {want}")
print(f"== torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
PYEOF

# --- build and install ---------------------------------------------------------------------
copy_tree() {  # copy_tree DEST [EXCLUDE_PREFIX]: the checkout's files, mtimes kept (ninja).
  local dest=$1 skip=${2:-}
  mkdir -p "$dest"
  find "$dest" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
  git ls-files -co --exclude-standard -z | \
    { if [ -n "$skip" ]; then grep -zv "^$skip"; else cat; fi; } | \
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done | \
    tar --null -T - -cf - | tar -xf - -C "$dest"
}
step "pip install --no-build-isolation --no-deps . (TOPK_DISTILL_CUDA=${TOPK_DISTILL_CUDA:-auto}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
copy_tree "$ENV_DIR/src"
b0=$(date +%s)
(cd "$ENV_DIR/src" && "$OLDPWD/$PY" -m pip install --no-build-isolation --no-deps -v . \
   > "../build.log" 2>&1) || { tail -60 "$ENV_DIR/build.log"; echo "== compat $VER: BUILD FAILED (log: $ENV_DIR/build.log)"; exit 1; }
grep -E "^\s*\[topk_distill setup\]" "$ENV_DIR/build.log" | grep -v "sources:" || true
step "built and installed in $(( $(date +%s) - b0 )) s"

# --- tests against the installed package ----------------------------------------------------
copy_tree "$ENV_DIR/run" topk_distill/
cd "$ENV_DIR/run"
../bin/python - <<'PYEOF'
import os, sys, torch, topk_distill
site = os.path.dirname(os.path.dirname(topk_distill.__file__))
if os.path.abspath(site) == os.path.abspath("."):
    sys.exit("compat: the tests would import the checkout's topk_distill, not the installed one")
cuda = torch._C._dispatch_has_kernel_for_dispatch_key("topk_distill::shard_pass", "CUDA")
print(f"== testing the installed {topk_distill.__file__}")
print(f"== CUDA kernels compiled: {'yes' if cuda else 'no'}")
PYEOF
if [ "$MODE" = all ]; then
  sel=(tests)
else  # only the subset's files: the others may import packages this env does not install
  read -r -a files < <(../bin/python -c "import sys; sys.path.insert(0, 'tests'); \
    from conftest import COMPAT_SUBSET; print(' '.join('tests/' + f for f in COMPAT_SUBSET))")
  sel=(-m compat "${files[@]}")
fi
step "pytest ${sel[*]} ${PYTEST_ARGS:-}"
set +e
../bin/python -m pytest "${sel[@]}" -p no:cacheprovider ${PYTEST_ARGS:--q -rfEs}
rc=$?
set -e
step "finished, pytest exit code $rc"
exit $rc
