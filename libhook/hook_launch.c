/*
 * hook_launch.c - the launch entry points (every kernel and graph launch the
 * driver exports, with their per-thread-stream variants) and the stream
 * capture entry points.
 *
 * A launch runs the gate's fast path (hook_services.h, inlined here): see
 * hook_gate.c for the gate and hook_account.c for how the batches it opens
 * are timed. A launch into a stream that is being captured into a graph is
 * recorded, not run, so it is neither gated nor measured (hook_capture.c).
 */
#include "hook_interpose.h"

#define GATED(name, stream, ptsz, graph, call)                                             \
    {                                                                                      \
        ENTER(name);                                                                       \
        if (mode_ != VGPU_MODE_REGISTERED)                                                 \
            return call;                                                                   \
        CUstream orig_ = (stream);                                                         \
        CUstream s_ = ((ptsz) && orig_ == NULL) ? CU_STREAM_PER_THREAD : orig_;            \
        struct vgpu_launch l_;                                                             \
        vgpu_gate_enter(&l_, s_, orig_, (ptsz), (graph));                                  \
        CUresult r_ = call;                                                                \
        vgpu_gate_leave(&l_);                                                              \
        return r_;                                                                         \
    }

VGPU_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                                    unsigned int bx, unsigned int by, unsigned int bz, unsigned int shmem,
                                    CUstream hStream, void **params, void **extra)
    GATED(cuLaunchKernel, hStream, 0, 0,
          real_cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shmem, hStream, params, extra))

VGPU_EXPORT CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                                         unsigned int bx, unsigned int by, unsigned int bz, unsigned int shmem,
                                         CUstream hStream, void **params, void **extra)
    GATED(cuLaunchKernel_ptsz, hStream, 1, 0,
          real_cuLaunchKernel_ptsz(f, gx, gy, gz, bx, by, bz, shmem, hStream, params, extra))

VGPU_EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra)
    GATED(cuLaunchKernelEx, config ? config->hStream : NULL, 0, 0,
          real_cuLaunchKernelEx(config, f, params, extra))

VGPU_EXPORT CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f, void **params,
                                           void **extra)
    GATED(cuLaunchKernelEx_ptsz, config ? config->hStream : NULL, 1, 0,
          real_cuLaunchKernelEx_ptsz(config, f, params, extra))

VGPU_EXPORT CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                                               unsigned int bx, unsigned int by, unsigned int bz,
                                               unsigned int shmem, CUstream hStream, void **params)
    GATED(cuLaunchCooperativeKernel, hStream, 0, 0,
          real_cuLaunchCooperativeKernel(f, gx, gy, gz, bx, by, bz, shmem, hStream, params))

VGPU_EXPORT CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy,
                                                    unsigned int gz, unsigned int bx, unsigned int by,
                                                    unsigned int bz, unsigned int shmem, CUstream hStream,
                                                    void **params)
    GATED(cuLaunchCooperativeKernel_ptsz, hStream, 1, 0,
          real_cuLaunchCooperativeKernel_ptsz(f, gx, gy, gz, bx, by, bz, shmem, hStream, params))

VGPU_EXPORT CUresult cuGraphLaunch(CUgraphExec g, CUstream hStream)
    GATED(cuGraphLaunch, hStream, 0, 1, real_cuGraphLaunch(g, hStream))

VGPU_EXPORT CUresult cuGraphLaunch_ptsz(CUgraphExec g, CUstream hStream)
    GATED(cuGraphLaunch_ptsz, hStream, 1, 1, real_cuGraphLaunch_ptsz(g, hStream))

/* Every variant the driver exports (CUDA 10.0's and _v2, each with _ptsz).
 * Before the driver begins the capture: this thread's open batches are
 * ended (the one on the stream it captures, say: its end event recorded
 * outside the capture, not held open through it), and the capture is
 * listed, so that no record of the hook's lands in it (hook_capture.c); the
 * entry goes again if the driver refuses. */
#define BEGIN_CAPTURE(name, ptsz)                                                          \
    VGPU_EXPORT CUresult name(CUstream s, CUstreamCaptureMode mode)                        \
    {                                                                                      \
        ENTER(name);                                                                       \
        vgpu_batch_close_mine();                                                           \
        int ticket_ = vgpu_capture_begin(s, (ptsz));                                       \
        CUresult r = real_##name(s, mode);                                                 \
        vgpu_capture_begun(ticket_, r == CUDA_SUCCESS);                                    \
        return r;                                                                          \
    }

BEGIN_CAPTURE(cuStreamBeginCapture, 0)
BEGIN_CAPTURE(cuStreamBeginCapture_ptsz, 1)
BEGIN_CAPTURE(cuStreamBeginCapture_v2, 0)
BEGIN_CAPTURE(cuStreamBeginCapture_v2_ptsz, 1)

VGPU_EXPORT CUresult cuStreamEndCapture(CUstream s, CUgraph *g)
{
    ENTER(cuStreamEndCapture);
    CUresult r = real_cuStreamEndCapture(s, g);
    if (!vgpu_stream_capturing(s, 0))
        vgpu_capture_end(s, 0);
    return r;
}

VGPU_EXPORT CUresult cuStreamEndCapture_ptsz(CUstream s, CUgraph *g)
{
    ENTER(cuStreamEndCapture_ptsz);
    CUresult r = real_cuStreamEndCapture_ptsz(s, g);
    if (!vgpu_stream_capturing(s, 1))
        vgpu_capture_end(s, 1);
    return r;
}

VGPU_EXPORT CUresult cuStreamDestroy_v2(CUstream s)
{
    ENTER(cuStreamDestroy_v2);
    if (atomic_load_explicit(&vgpu_active_captures, memory_order_relaxed) > 0)
        vgpu_capture_drop(s, NULL, false);
    return real_cuStreamDestroy_v2(s);
}
