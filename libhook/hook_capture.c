/*
 * hook_capture.c - which streams are being captured into a CUDA graph. A
 * launch into a capturing stream is recorded, not run: neither gated nor
 * measured. Only while a capture is active anywhere do launches pay for
 * cuStreamIsCapturing (vgpu_active_captures is the fast path's one load).
 * Each capturing stream has an entry; the count is the number of entries. An
 * entry goes when its capture ends through the hooked EndCapture, when its
 * stream is destroyed, or when the accountant's sweep finds the stream no
 * longer capturing (a capture ended some way we do not see): a leaked entry
 * would make every later launch pay the query.
 */
#include "hook_services.h"

_Atomic int vgpu_active_captures;

#define MAX_CAPTURES 64
static struct {
    _Atomic(CUstream) stream; /* NULL: free */
    int ptsz;
    CUcontext ctx;
} captures[MAX_CAPTURES];
static pthread_mutex_t capmu = PTHREAD_MUTEX_INITIALIZER;


bool vgpu_stream_capturing(CUstream s, int ptsz)
{
    CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
    __typeof__(real_cuStreamIsCapturing) f = ptsz ? real_cuStreamIsCapturing_ptsz : real_cuStreamIsCapturing;
    if (f && f(s, &st) == CUDA_SUCCESS)
        return st != CU_STREAM_CAPTURE_STATUS_NONE;
    return false;
}

void vgpu_capture_add(CUstream s, int ptsz)
{
    CUcontext ctx = NULL;
    real_cuCtxGetCurrent(&ctx);
    pthread_mutex_lock(&capmu);
    for (int i = 0; i < MAX_CAPTURES; i++) {
        if (atomic_load(&captures[i].stream) == NULL) {
            captures[i].ptsz = ptsz;
            captures[i].ctx = ctx;
            atomic_store(&captures[i].stream, s);
            break;
        }
    }
    /* With the table full the capture still counts (and is found again
     * only by EndCapture): launches stay correct, just pay the query. */
    atomic_fetch_add(&vgpu_active_captures, 1);
    pthread_mutex_unlock(&capmu);
}

/* Drop the entry of stream s (all of them when s is NULL and ctx matches). */
void vgpu_capture_drop(CUstream s, CUcontext ctx, bool any_of_ctx)
{
    pthread_mutex_lock(&capmu);
    bool found = false;
    for (int i = 0; i < MAX_CAPTURES; i++) {
        CUstream cs = atomic_load(&captures[i].stream);
        if (cs == NULL)
            continue;
        if ((any_of_ctx && captures[i].ctx == ctx) || (!any_of_ctx && cs == s)) {
            atomic_store(&captures[i].stream, NULL);
            found = true;
            int c = atomic_load(&vgpu_active_captures);
            while (c > 0 && !atomic_compare_exchange_weak(&vgpu_active_captures, &c, c - 1))
                ;
            if (!any_of_ctx)
                break;
        }
    }
    /* A capture begun while the table was full has no entry. */
    if (!found && !any_of_ctx) {
        int c = atomic_load(&vgpu_active_captures);
        int entries = 0;
        for (int i = 0; i < MAX_CAPTURES; i++)
            entries += atomic_load(&captures[i].stream) != NULL;
        while (c > entries && !atomic_compare_exchange_weak(&vgpu_active_captures, &c, c - 1))
            ;
    }
    pthread_mutex_unlock(&capmu);
}

void vgpu_capture_forget_ctx(CUcontext ctx)
{
    vgpu_capture_drop(NULL, ctx, true);
}

void vgpu_capture_sweep(void)
{
    for (int i = 0; i < MAX_CAPTURES; i++) {
        CUstream s = atomic_load(&captures[i].stream);
        /* The per-thread default stream is another thread's: only that
         * thread's EndCapture (or its context's end) can tell. */
        if (s == NULL || s == CU_STREAM_PER_THREAD || captures[i].ptsz)
            continue;
        CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
        CUresult r = real_cuStreamIsCapturing ? real_cuStreamIsCapturing(s, &st) : CUDA_ERROR_UNKNOWN;
        if (r != CUDA_SUCCESS || st == CU_STREAM_CAPTURE_STATUS_NONE)
            vgpu_capture_drop(s, NULL, false);
    }
}

void vgpu_capture_atfork_child(void)
{
    atomic_store(&vgpu_active_captures, 0);
    pthread_mutex_init(&capmu, NULL);
    for (int i = 0; i < MAX_CAPTURES; i++)
        atomic_store(&captures[i].stream, NULL);
}
