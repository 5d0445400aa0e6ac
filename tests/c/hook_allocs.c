/*
 * hook_allocs - exercises every allocation path the hook accounts, each one
 * allocated and freed once, in a fixed order, printing each return code as
 * one JSON object. The test compares it with the reserve/release messages
 * its scripted daemon received.
 */
#include <stdio.h>

#include "vgpu_cuda.h"

#define MB (1u << 20)

int main(void)
{
    CUdevice dev;
    CUcontext ctx;
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) || cuCtxSetCurrent(ctx)) {
        printf("{\"init\": 1}\n");
        return 1;
    }
    CUstream s;
    cuStreamCreate(&s, 0);
    int r[24], k = 0;
    CUdeviceptr p;
    size_t pitch;
    r[k++] = cuMemAlloc_v2(&p, 1 * MB);
    r[k++] = cuMemFree_v2(p);
    r[k++] = cuMemAllocPitch_v2(&p, &pitch, 1000, 100, 4);
    r[k++] = cuMemFree_v2(p);
    r[k++] = cuMemAllocManaged(&p, 2 * MB, CU_MEM_ATTACH_GLOBAL);
    r[k++] = cuMemFree_v2(p);
    CUarray a;
    CUDA_ARRAY_DESCRIPTOR d2 = {.Width = 256, .Height = 64, .Format = CU_AD_FORMAT_FLOAT, .NumChannels = 4};
    r[k++] = cuArrayCreate_v2(&a, &d2);
    r[k++] = cuArrayDestroy(a);
    CUDA_ARRAY3D_DESCRIPTOR d3 = {.Width = 64, .Height = 32, .Depth = 8, .Format = CU_AD_FORMAT_UNSIGNED_INT8,
                                  .NumChannels = 2};
    r[k++] = cuArray3DCreate_v2(&a, &d3);
    r[k++] = cuArrayDestroy(a);
    CUmipmappedArray m;
    r[k++] = cuMipmappedArrayCreate(&m, &d3, 3);
    r[k++] = cuMipmappedArrayDestroy(m);
    CUmemAllocationProp prop = {.type = CU_MEM_ALLOCATION_TYPE_PINNED,
                                .location = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = 0}};
    size_t gran = 2 * MB;
    cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
    CUmemGenericAllocationHandle h;
    r[k++] = cuMemCreate(&h, 2 * gran, &prop, 0);
    r[k++] = cuMemRelease(h);
    r[k++] = cuMemAllocAsync(&p, 3 * MB, s);
    r[k++] = cuMemFreeAsync(p, s);
    CUmemoryPool pool;
    cuDeviceGetDefaultMemPool(&pool, dev);
    r[k++] = cuMemAllocFromPoolAsync(&p, 4 * MB, pool, s);
    r[k++] = cuMemFreeAsync(p, s);
    cuStreamSynchronize(s);
    printf("{\"init\": 0, \"pitch\": %zu, \"gran\": %zu, \"rc\": [", pitch, gran);
    for (int i = 0; i < k; i++)
        printf("%s%d", i ? ", " : "", r[i]);
    printf("]}\n");
    return 0;
}
