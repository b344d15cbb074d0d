#!/usr/bin/env bash
# The GPU machine's bundle for bench/gpu.py: ../shared/gpu/make-bundle (Ray trimmed, its missing dependencies, a
# Fashion-MNIST subset), plus the wheels vaegen needs there beyond Ray's: deflate (its version is part of every
# PNG's bytes, so it is pinned, and no GPU image ships it) and huggingface_hub (the dataset card of every job).
# matplotlib (the loss curves of a published model) is too big for the 64 MiB copy limit with Ray in it; the
# check at the end says whether the machine must have it already.
#   bench/gpu_bundle.sh      # from the project root; then on the device: . .gpu/on-device.sh && python3 bench/gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
"${VAEGEN_SHARED:-../shared}"/gpu/make-bundle        # VAEGEN_SHARED: where shared/ is, when not beside the checkout
pins=$(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(" ".join(d.split("#")[0].strip() for d in deps if re.match(r"(deflate|huggingface_hub)\b", d)))
PY
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .gpu/whl $pins filelock fsspec 2>&1 | grep -v '^WARNING: Location' || true
echo "bundle .gpu/: $(du -sm .gpu | cut -f1) MiB of the 64 MiB that run's carry takes (carry: [\".gpu\"])"
echo "on the device, first: python3 -c 'import matplotlib' (the loss curves; not in the bundle)"
