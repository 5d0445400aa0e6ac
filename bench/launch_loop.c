/*
 * A tight loop of kernel launches on the simulated GPU, for counting the
 * hook's instructions per launch with callgrind (bench/callgrind.sh).
 * argv[1]: number of launches. Kernels run for 0 ns on the simulated device
 * (VGPU_SIM_KERNEL_NS=0), so the loop measures the launch path only.
 *
 * Every counted launch goes through bench_launch(), a non-inlined function
 * callgrind toggles collection on: counting on cuLaunchKernel itself would
 * stop at the hook's call into the driver's function of the same name. A
 * warm-up of WARM launches through warm_launch() first pays for the hook's
 * lazy registration, attach and first batches, which are not per-launch.
 */
#include <stdio.h>
#include <stdlib.h>

#include "vgpu_cuda.h"

#define WARM 2048

__attribute__((noinline)) CUresult bench_launch(CUfunction fn);
__attribute__((noinline)) CUresult bench_launch(CUfunction fn)
{
    return cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
}

__attribute__((noinline)) CUresult warm_launch(CUfunction fn);
__attribute__((noinline)) CUresult warm_launch(CUfunction fn)
{
    return cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
}

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
    for (long i = 0; i < WARM; i++) {
        if (warm_launch(fn) != CUDA_SUCCESS) {
            fprintf(stderr, "launch_loop: warm-up launch %ld failed\n", i);
            return 1;
        }
        if (i % 512 == 511)
            cuCtxSynchronize();
    }
    cuCtxSynchronize();
    for (long i = 0; i < n; i++) {
        if (bench_launch(fn) != CUDA_SUCCESS) {
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
