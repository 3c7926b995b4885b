#!/usr/bin/env bash
# The product as a user installs it: build the wheel from the committed files, install it with its locked
# dependencies into a fresh virtual environment (no editable install, no checkout on the path), and from an
# empty directory list the datasets and render each listed dataset's template.
#
# Usage: .ci/check_wheel.sh [WHEEL]     WHEEL: check this wheel instead of building one from the checkout.
# PYTHON (default .venv/bin/python, the README's environment) builds the wheel, runs pip and compares templates.
# The dependencies' wheels are kept in ~/.cache/reformatters/ci-wheelhouse/ and downloaded only when missing.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
lock="$repo/requirements.lock"
wheelhouse="${XDG_CACHE_HOME:-$HOME/.cache}/reformatters/ci-wheelhouse"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH REFORMATTERS_EXTRA_DATASETS
# Installed with --no-compile: the first command caches bytecode for the modules it imports, the next reuse it.
unset PYTHONDONTWRITEBYTECODE
started=$SECONDS
failures=0

say() { echo "[check_wheel $((SECONDS - started))s] $*" >&2; }
fail() {
  echo "[check_wheel] FAILED: $*" >&2
  failures=$((failures + 1))
}
# Runs a command, prints its output, fails the check when it exits non-zero.
run() {
  local what="$1"
  shift
  if "$@" >"$work/out" 2>"$work/err"; then
    cat "$work/out"
    [ -s "$work/err" ] && sed 's/^/  stderr: /' "$work/err" >&2
    return 0
  fi
  cat "$work/out"
  sed 's/^/  stderr: /' "$work/err" >&2
  fail "$what"
  return 1
}

# ---- the wheel ----
if [ $# -ge 1 ]; then
  wheel="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
  say "checking the given wheel $wheel"
else
  # A copy of the committed files: what a clone builds, without the checkout's build/ or egg-info.
  mkdir "$work/src" "$work/dist"
  git -C "$repo" ls-files -z | (cd "$repo" && tar --null -T - -cf -) | tar -xf - -C "$work/src"
  "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/src"
  wheel="$(ls "$work"/dist/*.whl)"
  say "built $(basename "$wheel")"
fi

# Every module, template file and manifest of the checkout is in the wheel, where the package expects it.
run "the wheel lacks files of the checkout" "$python" - "$repo" "$wheel" <<'EOF' || true
import subprocess
import sys
import zipfile

repo, wheel = sys.argv[1], sys.argv[2]
tracked = subprocess.run(["git", "-C", repo, "ls-files"], capture_output=True, text=True, check=True).stdout.split()
where = {"reformatters/": "reformatters/", "datasets/": "reformatters_datasets/",
         "templates/": "reformatters/templates/", "cluster/": "reformatters/cluster_manifests/"}
expected = set()
for path in tracked:
    for prefix, target in where.items():
        if path.startswith(prefix) and (path.endswith(".py") or prefix in ("templates/", "cluster/")):
            expected.add(target + path[len(prefix):])
shipped = set(zipfile.ZipFile(wheel).namelist())
missing = sorted(expected - shipped)
if missing:
    print(f"{len(missing)} of {len(expected)} files missing from {wheel}, e.g.:", *missing[:15], sep="\n  ")
    sys.exit(1)
print(f"all {len(expected)} modules, templates and manifests of the checkout are in the wheel")
EOF

# ---- its dependencies, pinned by the lock, from a local wheelhouse ----
python3 -m venv --without-pip "$work/venv"
install() {
  "$python" -m pip --python "$work/venv/bin/python" install -q --no-compile --no-index --find-links "$wheelhouse" \
    -c "$lock" "$wheel"
}
if ! install 2>"$work/err"; then
  # pip resolves before it installs anything: a wheel missing from the wheelhouse leaves the venv empty.
  say "downloading the wheel's locked dependencies missing from $wheelhouse"
  mkdir -p "$wheelhouse"
  "$python" -m pip download -q -c "$lock" -d "$wheelhouse" "$wheel" 2> >(grep -v "is ignored: it is neither" >&2)
  rm -f "$wheelhouse"/reformatters-*.whl
  install 2> >(grep -v "is ignored: it is neither" >&2)
fi
say "installed into a fresh virtual environment"
bin="$work/venv/bin"

# ---- as a user, from an empty directory ----
mkdir "$work/empty"
cd "$work/empty"

listed=""
if run "reformatters list" "$bin/reformatters" list; then
  listed="$(awk '{print $1}' "$work/out")"
  grep -qx "noaa-gfs-forecast" <<<"$listed" || fail "reformatters list does not show noaa-gfs-forecast"
  if grep -qx "example" <<<"$listed"; then fail "reformatters list shows the test-only example dataset"; fi
  if [ -s "$work/err" ]; then fail "reformatters list warned (above)"; fi
fi

for dataset_id in $listed; do
  if run "update-template $dataset_id --output-dir" \
    "$bin/reformatters" update-template "$dataset_id" --output-dir "$work/rendered"; then
    run "the rendered template of $dataset_id differs from templates/$dataset_id" "$python" - \
      "$repo/templates/$dataset_id/latest.zarr" "$work/rendered/$dataset_id/latest.zarr" <<'EOF' || true
import sys
from pathlib import Path

from reformatters.template_config import template_differences

differences = template_differences(Path(sys.argv[1]), Path(sys.argv[2]))
if differences:
    print(*differences, sep="\n")
    sys.exit(1)
print(f"{sys.argv[2]} matches {sys.argv[1]}")
EOF
  fi
done

# Without --output-dir an installed package's templates are not rewritten: the command says what to do.
if "$bin/reformatters" update-template noaa-gfs-forecast >"$work/out" 2>"$work/err"; then
  fail "update-template without --output-dir wrote into the installed package: $(cat "$work/out")"
elif grep -q -- "--output-dir" "$work/err"; then
  say "update-template without --output-dir refused: $(cat "$work/err")"
else
  fail "update-template without --output-dir failed without naming --output-dir: $(cat "$work/err")"
fi

run "the installed package cannot read its templates and manifests" "$bin/python" - "$work/venv" <<'EOF' || true
import sys

import reformatters
import reformatters_datasets
from reformatters.cluster import dask_cluster_resource
from reformatters.registry import all_datasets

venv = sys.argv[1]
for module in (reformatters, reformatters_datasets):
    if not module.__file__ or not module.__file__.startswith(venv):
        sys.exit(f"{module.__name__} imported from {module.__file__}, not from the fresh environment {venv}")
print(f"reformatters imported from {reformatters.__file__}")
for dataset in all_datasets():
    config = dataset.template_config
    template = config.get_template(config.template_append_dim_end())
    print(f"{dataset.dataset_id}: template {config.template_path} expands to {dict(template.sizes)}")
print(f"DaskCluster {dask_cluster_resource()['metadata']['name']} from the installed cluster manifests")
EOF

if [ "$failures" -ne 0 ]; then
  say "$failures check(s) failed for $(basename "$wheel")"
  exit 1
fi
say "the wheel works from outside the checkout"
