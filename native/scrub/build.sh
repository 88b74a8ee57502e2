#!/bin/sh
# Build native/scrub/scrub.ptx from scrub.cu; the PTX is committed, so nodes need no CUDA toolkit
# (the driver JIT-compiles PTX when agent/scrub/cuda/kernels.py loads it with cuModuleLoadDataEx).
#
#   native/scrub/build.sh [OUTPUT]      (default: native/scrub/scrub.ptx next to this script)
#
# Target: compute_80 (A100); the driver JIT-compiles it for sm_90 (H100) and later.
# ISA: nvcc 13 stamps `.version 9.0`, which only drivers >= R580 accept. The kernels use nothing
# newer than PTX ISA 7.0 (CUDA 11.0, the first with sm_80), so the stamp is lowered to 7.0 and the
# result is assembled with ptxas for sm_80 and sm_90: ptxas rejects any instruction or target that
# the declared ISA version does not have. Any R450+ driver can then load the PTX.
# tests/scrub_cuda/test_ptx.py runs this script and compares with the committed file.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
output=${1:-"$here/scrub.ptx"}
NVCC=${NVCC:-nvcc}
PTXAS=${PTXAS:-ptxas}
PTX_ISA=7.0

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$NVCC" -arch=compute_80 --ptx -O3 -o "$work/nvcc.ptx" "$here/scrub.cu"

if [ "$(grep -c '^\.version ' "$work/nvcc.ptx")" != 1 ]; then
    echo "build.sh: expected exactly one .version line in nvcc's PTX" >&2
    exit 1
fi
sed -e "s|^\.version .*\$|// .version lowered to $PTX_ISA by native/scrub/build.sh (see there)\n.version $PTX_ISA|" \
    "$work/nvcc.ptx" > "$work/scrub.ptx"

"$PTXAS" -arch=sm_80 -o "$work/sm_80.cubin" "$work/scrub.ptx"
"$PTXAS" -arch=sm_90 -o "$work/sm_90.cubin" "$work/scrub.ptx"

cp "$work/scrub.ptx" "$output"
