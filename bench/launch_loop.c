/*
 * A tight loop of kernel launches on the simulated GPU, for counting the
 * hook's instructions per launch with callgrind (bench/callgrind.sh).
 * argv[1]: number of launches. Kernels run for 0 ns on the simulated device
 * (VGPU_SIM_KERNEL_NS=0), so the loop measures the launch path only.
 */
#include <stdio.h>
#include <stdlib.h>

#include "vgpu_cuda.h"

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 10000;
    CUdevice dev;
    CUcontext ctx;
    CUmodule mod;
    CUfunction fn;
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) ||
        cuCtxSetCurrent(ctx) || cuModuleLoadData(&mod, "vgpu-sim") ||
        cuModuleGetFunction(&fn, mod, "empty")) {
        fprintf(stderr, "launch_loop: CUDA setup failed\n");
        return 1;
    }
    for (long i = 0; i < n; i++) {
        if (cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL) != CUDA_SUCCESS) {
            fprintf(stderr, "launch_loop: launch %ld failed\n", i);
            return 1;
        }
        if (i % 512 == 511)
            cuCtxSynchronize();
    }
    cuCtxSynchronize();
    printf("{\"launches\": %ld}\n", n);
    return 0;
}
