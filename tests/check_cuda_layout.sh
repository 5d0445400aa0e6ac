#!/usr/bin/env bash
# Checks libhook/include/vgpu_cuda.h and vgpu_nvml.h against NVIDIA's own
# headers: every layout and value, and every prototype. Needs a CUDA toolkit
# (run on the GPU machine); exits 0 with a note where there is none.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
inc=${CUDA_HOME:-/usr/local/cuda}/include
if [ ! -f "$inc/cuda.h" ]; then echo "check_cuda_layout: no $inc/cuda.h, skipped"; exit 0; fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cc -std=gnu11 -Wall -Werror -DUSE_REAL -I"$inc" "$here/tests/c/layout_dump.c" -o "$tmp/real"
cc -std=gnu11 -Wall -Werror -I"$here/libhook/include" "$here/tests/c/layout_dump.c" -o "$tmp/ours"
"$tmp/real" > "$tmp/real.txt"; "$tmp/ours" > "$tmp/ours.txt"
diff -u "$tmp/real.txt" "$tmp/ours.txt" && echo "layouts: $(wc -l < "$tmp/ours.txt") checks identical"
# Prototypes: declare ours after NVIDIA's; any mismatch is a compile error.
{ echo '#define __CUDA_API_VERSION_INTERNAL 1'; echo '#include <cuda.h>'; echo '#include <nvml.h>';
  grep -hE '^(CUresult|nvmlReturn_t|const char \*)[ ]*(cu|nvml)[A-Za-z0-9_]+\(' \
     "$here/libhook/include/vgpu_cuda.h" "$here/libhook/include/vgpu_nvml.h"; } > "$tmp/protos.c"
cc -std=gnu11 -Wall -Werror -fsyntax-only -I"$inc" "$tmp/protos.c" && echo "prototypes: identical to NVIDIA's"
