#!/usr/bin/env bash
# Run here, where a package registry is reachable, before a GPU run: downloads into .gpu_wheels/ (or the folder given)
# the wheels that benchmarks/gpu.sh installs on a GPU machine without network: the pure-Python packages probe needs
# beyond that machine's image (diffusers, importlib_metadata, zipp; xarray, in case the image's is another version)
# and attention-map-diffusers for the comparison with it (where this virtualenv has it),
# pinned to the versions of this checkout's virtualenv, for the machine's Python 3.12. The folder is ignored by git;
# a device run carries it (carry: [".gpu_wheels"]).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/.gpu_wheels}
python=${PYTHON:-$root/.venv/bin/python}
packages=(diffusers importlib_metadata zipp xarray)
optional=(attention-map-diffusers)  # the amd stage's peer tool, carried where this virtualenv has it
read -r -a pins < <("$python" -c '
import sys, importlib.metadata as m
def pin(name, required):
    try:
        return f"{name}=={m.version(name)}"
    except m.PackageNotFoundError:
        if required:
            raise
        print(f"{name} is not installed here: the amd stage will say it did not run", file=sys.stderr)
        return ""
need, opt = sys.argv[1].split(), sys.argv[2].split()
print(" ".join(p for p in [pin(n, True) for n in need] + [pin(n, False) for n in opt] if p))' "${packages[*]}" "${optional[*]}")
mkdir -p "$dest"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" "${pins[@]}"
exclude=$(git -C "$root" rev-parse --git-path info/exclude)
case $exclude in /*) ;; *) exclude="$root/$exclude" ;; esac
if [ "$dest" = "$root/.gpu_wheels" ] && ! grep -qx '/.gpu_wheels/' "$exclude" 2>/dev/null; then
  echo '/.gpu_wheels/' >> "$exclude"
fi
echo "wheels in $dest (${pins[*]}):"
ls -1 "$dest"
