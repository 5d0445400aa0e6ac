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
 *
 * The hook's own timing events must never land in a capture: recorded onto
 * a capturing stream, an event joins the capture, and querying it (as the
 * accountant does) is an error that invalidates the capture; recorded onto
 * the legacy stream while a blocking stream of its context captures, it
 * invalidates the capture at once. So a BeginCapture lists its stream
 * before it calls the driver (the entry is pending until the driver has
 * answered), and a record of the hook's (vgpu_capture_record) checks the
 * list and records under the list's lock: either the record comes first, or
 * it sees the capture and does not happen.
 */
#include "hook_services.h"

_Atomic int vgpu_active_captures;

#define MAX_CAPTURES 64
static struct {
    _Atomic(CUstream) stream; /* NULL: free; CU_STREAM_PER_THREAD: some thread's per-thread stream */
    int ptsz;
    _Atomic int pending;      /* the driver has not yet answered the BeginCapture */
    bool blocking;            /* the stream synchronizes with the legacy stream */
    CUcontext ctx;
    unsigned gen;             /* bumped each time the entry is taken (capmu) */
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

/* The table's name for stream s as an entry point of its _ptsz variant (when
 * ptsz) saw it: stream 0 there is the per-thread stream. */
static CUstream capture_key(CUstream s, int ptsz)
{
    return ptsz && s == NULL ? CU_STREAM_PER_THREAD : s;
}

int vgpu_capture_begin(CUstream s, int ptsz)
{
    CUstream key = capture_key(s, ptsz);
    CUcontext ctx = NULL;
    real_cuCtxGetCurrent(&ctx);
    /* Default streams synchronize with the legacy stream, and so does any
     * stream not created non-blocking; when in doubt, assume it does. */
    bool blocking = true;
    unsigned flags = 0;
    if (key != CU_STREAM_PER_THREAD && key != CU_STREAM_LEGACY && key != NULL && real_cuStreamGetFlags &&
        real_cuStreamGetFlags(key, &flags) == CUDA_SUCCESS)
        blocking = !(flags & CU_STREAM_NON_BLOCKING);
    int ticket = -1;
    pthread_mutex_lock(&capmu);
    for (int i = 0; i < MAX_CAPTURES; i++) {
        if (atomic_load(&captures[i].stream) == NULL) {
            captures[i].ptsz = ptsz;
            captures[i].ctx = ctx;
            captures[i].blocking = blocking;
            captures[i].gen++;
            atomic_store(&captures[i].pending, 1);
            atomic_store(&captures[i].stream, key);
            ticket = (int)(captures[i].gen % 0x1000000u) * MAX_CAPTURES + i;
            break;
        }
    }
    /* With the table full the capture still counts (and is found again
     * only by EndCapture): launches stay correct, just pay the query, and
     * the hook's records treat every stream as maybe capturing. */
    atomic_fetch_add(&vgpu_active_captures, 1);
    pthread_mutex_unlock(&capmu);
    return ticket;
}

static void count_down_locked(void)
{
    int c = atomic_load(&vgpu_active_captures);
    while (c > 0 && !atomic_compare_exchange_weak(&vgpu_active_captures, &c, c - 1))
        ;
}

void vgpu_capture_begun(int ticket, bool ok)
{
    pthread_mutex_lock(&capmu);
    int i = ticket % MAX_CAPTURES;
    /* Still our entry (not dropped meanwhile with its context)? */
    bool ours = ticket >= 0 && (int)(captures[i].gen % 0x1000000u) == ticket / MAX_CAPTURES &&
                atomic_load(&captures[i].stream) != NULL;
    if (ok) {
        if (ours)
            atomic_store(&captures[i].pending, 0);
    } else if (ours || ticket < 0) {
        if (ours)
            atomic_store(&captures[i].stream, NULL);
        count_down_locked();
    }
    pthread_mutex_unlock(&capmu);
}

/* Drop the entry of stream s (all of ctx's when any_of_ctx, those still
 * beginning included; by stream, only one whose capture has begun). */
void vgpu_capture_drop(CUstream s, CUcontext ctx, bool any_of_ctx)
{
    pthread_mutex_lock(&capmu);
    bool found = false;
    for (int i = 0; i < MAX_CAPTURES; i++) {
        CUstream cs = atomic_load(&captures[i].stream);
        if (cs == NULL)
            continue;
        if ((any_of_ctx && captures[i].ctx == ctx) ||
            (!any_of_ctx && cs == s && !atomic_load(&captures[i].pending))) {
            atomic_store(&captures[i].stream, NULL);
            found = true;
            count_down_locked();
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

void vgpu_capture_end(CUstream s, int ptsz)
{
    vgpu_capture_drop(capture_key(s, ptsz), NULL, false);
}

void vgpu_capture_forget_ctx(CUcontext ctx)
{
    vgpu_capture_drop(NULL, ctx, true);
}

/* Whether an event recorded onto s (of context ctx) now could touch a
 * capture: s is being captured, or its capture is beginning; or s is the
 * legacy stream and a blocking stream of ctx is being captured (the legacy
 * stream would wait for it). The per-thread stream is the caller's own,
 * which it is not capturing (a capture closes the caller's batches on the
 * stream it captures first, and launches into a capture open none). capmu
 * held. */
static bool touches_capture_locked(CUstream s, CUcontext ctx)
{
    int active = atomic_load(&vgpu_active_captures);
    if (active == 0 || s == CU_STREAM_PER_THREAD)
        return false;
    bool legacy = s == NULL || s == CU_STREAM_LEGACY;
    int entries = 0;
    for (int i = 0; i < MAX_CAPTURES; i++) {
        CUstream cs = atomic_load(&captures[i].stream);
        if (cs == NULL)
            continue;
        entries++;
        if (legacy ? captures[i].blocking && (captures[i].ctx == ctx || !captures[i].ctx) : cs == s)
            return true;
    }
    if (legacy)
        return entries < active; /* a capture the table could not hold: assume the worst */
    /* A capture begun some way the table did not see (it was full). */
    return vgpu_stream_capturing(s, 0);
}

int vgpu_capture_record(CUevent ev, CUstream s, CUcontext ctx)
{
    pthread_mutex_lock(&capmu);
    int r = 0;
    if (!touches_capture_locked(s, ctx))
        r = real_cuEventRecord(ev, s) == CUDA_SUCCESS ? 1 : -1;
    pthread_mutex_unlock(&capmu);
    return r;
}

void vgpu_capture_sweep(void)
{
    for (int i = 0; i < MAX_CAPTURES; i++) {
        pthread_mutex_lock(&capmu);
        CUstream s = atomic_load(&captures[i].stream);
        unsigned gen = captures[i].gen;
        /* The per-thread default stream is another thread's: only that
         * thread's EndCapture (or its context's end) can tell. A capture
         * still beginning is not capturing yet. */
        bool skip = s == NULL || s == CU_STREAM_PER_THREAD || captures[i].ptsz || atomic_load(&captures[i].pending);
        pthread_mutex_unlock(&capmu);
        if (skip)
            continue;
        CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
        CUresult r = real_cuStreamIsCapturing ? real_cuStreamIsCapturing(s, &st) : CUDA_ERROR_UNKNOWN;
        if (r == CUDA_SUCCESS && st != CU_STREAM_CAPTURE_STATUS_NONE)
            continue;
        /* Only this entry, if it is still the one we asked about. */
        pthread_mutex_lock(&capmu);
        if (captures[i].gen == gen && atomic_load(&captures[i].stream) == s) {
            atomic_store(&captures[i].stream, NULL);
            count_down_locked();
        }
        pthread_mutex_unlock(&capmu);
    }
}

void vgpu_capture_atfork_child(void)
{
    atomic_store(&vgpu_active_captures, 0);
    pthread_mutex_init(&capmu, NULL);
    for (int i = 0; i < MAX_CAPTURES; i++)
        atomic_store(&captures[i].stream, NULL);
}
