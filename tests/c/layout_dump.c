/*
 * Prints the size, field offsets and enum values of every CUDA/NVML type
 * that vgpu's own headers re-declare. Built twice, once against NVIDIA's
 * cuda.h/nvml.h (-DUSE_REAL, on a machine with the toolkit) and once
 * against libhook/include; tests/check_cuda_layout.sh diffs the two.
 */
#include <stddef.h>
#include <stdio.h>
#ifdef USE_REAL
#include <cuda.h>
#include <nvml.h>
#else
#include "vgpu_cuda.h"
#include "vgpu_nvml.h"
#endif

#define SZ(t) printf("sizeof %s %zu\n", #t, sizeof(t))
#define OFF(t, f) printf("offsetof %s.%s %zu\n", #t, #f, offsetof(t, f))
#define VAL(v) printf("value %s %lld\n", #v, (long long)(v))

int main(void)
{
    SZ(CUdevice); SZ(CUdeviceptr); SZ(CUuuid); SZ(CUresult);
    SZ(CUDA_ARRAY_DESCRIPTOR);
    OFF(CUDA_ARRAY_DESCRIPTOR, Width); OFF(CUDA_ARRAY_DESCRIPTOR, Height);
    OFF(CUDA_ARRAY_DESCRIPTOR, Format); OFF(CUDA_ARRAY_DESCRIPTOR, NumChannels);
    SZ(CUDA_ARRAY3D_DESCRIPTOR);
    OFF(CUDA_ARRAY3D_DESCRIPTOR, Depth); OFF(CUDA_ARRAY3D_DESCRIPTOR, Format);
    OFF(CUDA_ARRAY3D_DESCRIPTOR, NumChannels); OFF(CUDA_ARRAY3D_DESCRIPTOR, Flags);
    SZ(CUmemLocation); SZ(CUmemAllocationProp);
    OFF(CUmemAllocationProp, type); OFF(CUmemAllocationProp, requestedHandleTypes);
    OFF(CUmemAllocationProp, location); OFF(CUmemAllocationProp, win32HandleMetaData);
    OFF(CUmemAllocationProp, allocFlags);
    SZ(CUmemAccessDesc); OFF(CUmemAccessDesc, flags);
    SZ(CUmemPoolProps); OFF(CUmemPoolProps, maxSize); OFF(CUmemPoolProps, usage);
    SZ(CUlaunchAttributeValue); SZ(CUlaunchAttribute); OFF(CUlaunchAttribute, value);
    SZ(CUlaunchConfig); OFF(CUlaunchConfig, sharedMemBytes); OFF(CUlaunchConfig, hStream);
    OFF(CUlaunchConfig, attrs); OFF(CUlaunchConfig, numAttrs);
    SZ(CUDA_KERNEL_NODE_PARAMS_v2); OFF(CUDA_KERNEL_NODE_PARAMS_v2, kernelParams);
    OFF(CUDA_KERNEL_NODE_PARAMS_v2, extra); OFF(CUDA_KERNEL_NODE_PARAMS_v2, kern);
    OFF(CUDA_KERNEL_NODE_PARAMS_v2, ctx);
    VAL(CUDA_ERROR_OUT_OF_MEMORY); VAL(CUDA_ERROR_NOT_INITIALIZED); VAL(CUDA_ERROR_NO_DEVICE);
    VAL(CUDA_ERROR_INVALID_DEVICE); VAL(CUDA_ERROR_INVALID_CONTEXT); VAL(CUDA_ERROR_NOT_FOUND);
    VAL(CUDA_ERROR_NOT_READY); VAL(CUDA_ERROR_NOT_SUPPORTED); VAL(CUDA_ERROR_NOT_PERMITTED);
    VAL(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED); VAL(CUDA_ERROR_INVALID_HANDLE);
    VAL(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED); VAL(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT);
    VAL(CUDA_ERROR_CAPTURED_EVENT); VAL(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD);
    VAL(CUDA_ERROR_LAUNCH_FAILED); VAL(CUDA_ERROR_ILLEGAL_ADDRESS); VAL(CUDA_ERROR_UNKNOWN);
    VAL(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT); VAL(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
    VAL(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR); VAL(CU_AD_FORMAT_FLOAT); VAL(CU_AD_FORMAT_HALF);
    VAL(CU_MEM_ALLOCATION_TYPE_PINNED); VAL(CU_MEM_LOCATION_TYPE_DEVICE);
    VAL(CU_MEM_ACCESS_FLAGS_PROT_READWRITE); VAL(CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
    VAL(CU_MEMPOOL_ATTR_RELEASE_THRESHOLD); VAL(CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT);
    VAL(CU_MEMPOOL_ATTR_USED_MEM_CURRENT); VAL(CU_LAUNCH_ATTRIBUTE_COOPERATIVE);
    VAL(CU_STREAM_CAPTURE_STATUS_ACTIVE); VAL(CU_STREAM_CAPTURE_STATUS_INVALIDATED);
    VAL(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL); VAL(CU_STREAM_CAPTURE_MODE_RELAXED);
    VAL(CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM); VAL(CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT);
    VAL(CU_EVENT_DISABLE_TIMING); VAL(CU_STREAM_NON_BLOCKING); VAL(CU_MEM_ATTACH_GLOBAL);
    VAL((unsigned long long)CU_STREAM_PER_THREAD); VAL((unsigned long long)CU_STREAM_LEGACY);
    SZ(nvmlMemory_t); SZ(nvmlMemory_v2_t); OFF(nvmlMemory_v2_t, total); OFF(nvmlMemory_v2_t, used);
    VAL(nvmlMemory_v2);
    SZ(nvmlProcessInfo_t); OFF(nvmlProcessInfo_t, usedGpuMemory); OFF(nvmlProcessInfo_t, computeInstanceId);
    SZ(nvmlProcessUtilizationSample_t); OFF(nvmlProcessUtilizationSample_t, timeStamp);
    OFF(nvmlProcessUtilizationSample_t, smUtil); OFF(nvmlProcessUtilizationSample_t, decUtil);
    SZ(nvmlUtilization_t);
    VAL(NVML_ERROR_INSUFFICIENT_SIZE); VAL(NVML_ERROR_NOT_FOUND); VAL(NVML_ERROR_FUNCTION_NOT_FOUND);
    VAL(NVML_ERROR_ARGUMENT_VERSION_MISMATCH); VAL(NVML_DEVICE_UUID_V2_BUFFER_SIZE);
    return 0;
}
