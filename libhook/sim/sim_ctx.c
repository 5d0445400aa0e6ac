/*
 * sim_ctx.c - contexts (primary and created) and the calling thread's context
 * stack, streams (with stream capture into graphs and its rules for other
 * calls) and events.
 */
#include "sim_internal.h"

/* ---- stream capture: what CUDA lets other calls do meanwhile ----
 *
 * Modeled on the driver's documented rules (cuStreamBeginCapture,
 * cuThreadExchangeStreamCaptureMode), because the hook's own threads and
 * calls must live by them inside programs that capture CUDA graphs:
 *
 *  - Each thread has a capture interaction mode, GLOBAL until it calls
 *    cuThreadExchangeStreamCaptureMode; each capture keeps the mode it was
 *    begun with, and the thread that began it.
 *  - A thread in GLOBAL mode may not make a potentially unsafe call while it
 *    has a capture of its own not begun RELAXED, nor while another thread
 *    has one begun GLOBAL; a THREAD_LOCAL thread only the former; a RELAXED
 *    thread may always. A forbidden call fails with
 *    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED ("operation not permitted when
 *    stream is capturing", what PyTorch's NCCL watchdog got from
 *    cudaEventQuery) and invalidates every capture that forbade it.
 *  - Potentially unsafe, here: what synchronizes or is not stream-ordered,
 *    so a graph could not replay it: cuCtxSynchronize, cuStreamSynchronize,
 *    cuStreamQuery, cuEventSynchronize, cuEventQuery, cuMemAlloc_v2,
 *    cuMemAllocPitch_v2, cuMemAllocManaged, cuMemFree_v2, and the
 *    synchronous cuMemcpyHtoD_v2, cuMemcpyDtoH_v2 and cuMemsetD8_v2.
 *    Creating streams and events, recording events, asking
 *    cuStreamIsCapturing, timing events and setting the context are not.
 *  - Whatever the modes, some calls necessarily conflict with a capture and
 *    invalidate it: synchronizing or querying the capturing stream itself
 *    (STREAM_CAPTURE_UNSUPPORTED); querying, synchronizing or timing an
 *    event last recorded into a capture (CUDA_ERROR_CAPTURED_EVENT); work on
 *    the legacy stream while a blocking stream of its context captures (the
 *    legacy stream would wait for it: CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
 *    cuStreamIsCapturing on the legacy stream then says so, invalidating
 *    nothing).
 *  - Work for a capturing stream joins the capture, whichever thread
 *    enqueues it: an event recorded there becomes a captured event, not a
 *    timing mark. Into an invalidated capture it fails with
 *    STREAM_CAPTURE_INVALIDATED; cuStreamIsCapturing says INVALIDATED, and
 *    cuStreamEndCapture ends the capture with STREAM_CAPTURE_INVALIDATED and
 *    no graph. Only the thread that began a capture not begun RELAXED may
 *    end it (else STREAM_CAPTURE_WRONG_THREAD). An invalidated capture
 *    forbids nothing more.
 */
__thread CUstreamCaptureMode t_capmode = CU_STREAM_CAPTURE_MODE_GLOBAL;
__thread char t_self;
CUstream g_capturing;
static uint64_t g_capture_ids;

static void capture_unlink_locked(CUstream s)
{
    for (CUstream *pp = &g_capturing; *pp; pp = &(*pp)->cap_next)
        if (*pp == s) {
            *pp = s->cap_next;
            break;
        }
    s->cap_next = NULL;
}

CUresult capture_unsafe_locked(void)
{
    if (t_capmode == CU_STREAM_CAPTURE_MODE_RELAXED)
        return CUDA_SUCCESS;
    CUresult r = CUDA_SUCCESS;
    for (CUstream s = g_capturing; s; s = s->cap_next) {
        if (s->cap_invalid)
            continue;
        bool forbids = s->cap_thread == &t_self
                           ? s->cap_mode != CU_STREAM_CAPTURE_MODE_RELAXED
                           : t_capmode == CU_STREAM_CAPTURE_MODE_GLOBAL && s->cap_mode == CU_STREAM_CAPTURE_MODE_GLOBAL;
        if (forbids) {
            s->cap_invalid = true;
            r = CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
        }
    }
    return r;
}

CUresult capture_legacy_locked(CUcontext c, bool invalidate)
{
    CUresult r = CUDA_SUCCESS;
    for (CUstream s = g_capturing; s; s = s->cap_next) {
        if (s->cap_invalid || s->h.ctx != c || (s->flags & CU_STREAM_NON_BLOCKING))
            continue;
        if (invalidate)
            s->cap_invalid = true;
        r = CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    }
    return r;
}

/* A query, wait or timing of e: CUDA_ERROR_CAPTURED_EVENT (invalidating its
 * capture if that is still on) if e was last recorded into a capture. */
static CUresult event_captured_locked(CUevent e)
{
    if (!e->cap_id)
        return CUDA_SUCCESS;
    for (CUstream s = g_capturing; s; s = s->cap_next)
        if (s->cap_id == e->cap_id)
            s->cap_invalid = true;
    return CUDA_ERROR_CAPTURED_EVENT;
}

CUresult cuThreadExchangeStreamCaptureMode(CUstreamCaptureMode *mode)
{
    CHECK_INIT();
    if (mode == NULL || (*mode != CU_STREAM_CAPTURE_MODE_GLOBAL && *mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
                         *mode != CU_STREAM_CAPTURE_MODE_RELAXED))
        return CUDA_ERROR_INVALID_VALUE;
    CUstreamCaptureMode old = t_capmode;
    t_capmode = *mode;
    *mode = old;
    return CUDA_SUCCESS;
}

/* ---- contexts ---- */

static CUstream stream_new_locked(CUcontext c, unsigned flags)
{
    CUstream s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    s->h.type = T_STREAM;
    s->h.ctx = c;
    s->flags = flags;
    if (!reg_add(s, T_STREAM)) {
        free(s);
        return NULL;
    }
    pthread_mutex_lock(&c->m);
    s->next = c->streams;
    c->streams = s;
    pthread_mutex_unlock(&c->m);
    return s;
}

static CUresult ctx_new_locked(int dev, bool primary, unsigned flags, CUcontext *out)
{
    if (g_nctx[dev] == 0 && g_overhead && sim_mem_charge(g_s, phys(dev), g_overhead) != 0)
        return CUDA_ERROR_OUT_OF_MEMORY;
    CUcontext c = calloc(1, sizeof *c);
    if (c == NULL)
        goto oom;
    c->h.type = T_CTX;
    c->h.ctx = c;
    c->dev = dev;
    c->primary = primary;
    c->flags = flags;
    pthread_mutex_init(&c->m, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (!reg_add(c, T_CTX))
        goto oom_free;
    c->def = stream_new_locked(c, 0);
    if (c->def == NULL) {
        reg_del(c);
        goto oom_free;
    }
    if (pthread_create(&c->worker, NULL, worker_main, c) != 0) {
        reg_del(c->def);
        free(c->def);
        reg_del(c);
        goto oom_free;
    }
    g_nctx[dev]++;
    *out = c;
    return CUDA_SUCCESS;
oom_free:
    free(c);
oom:
    if (g_nctx[dev] == 0 && g_overhead)
        sim_mem_uncharge(g_s, phys(dev), g_overhead);
    return CUDA_ERROR_OUT_OF_MEMORY;
}

void event_unref(CUevent e)
{
    if (__atomic_sub_fetch(&e->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(e);
}


/* Stops the worker, drops queued work, frees everything the context owns. */
static void ctx_free_locked(CUcontext c)
{
    pthread_mutex_lock(&c->m);
    __atomic_store_n(&c->stop, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->m);
    pthread_join(c->worker, NULL);
    reg_del(c);
    for (CUstream s = c->streams, n; s; s = n) {
        n = s->next;
        for (uint64_t i = s->head; i < s->tail; i++)
            op_discard(&s->q[i % QCAP]);
        if (s->capture) {
            capture_unlink_locked(s);
            graph_free_locked(s->capture);
        }
        reg_del(s);
        free(s);
    }
    /* Objects and allocations owned by the context. */
    for (size_t i = 0; i < g_reg.cap; i++) {
        if (g_reg.k[i] <= 1)
            continue;
        struct obj *o = (struct obj *)g_reg.k[i];
        if (o->ctx != c)
            continue;
        switch (g_reg.v[i]) {
        case T_EVENT: reg_del(o); event_unref((CUevent)o); break;
        case T_MODULE: module_free_locked((CUmodule)o); break;
        case T_ARRAY:
            sim_mem_uncharge(g_s, phys(((CUarray)o)->dev), ((CUarray)o)->bytes);
            reg_del(o);
            free(o);
            break;
        case T_MIPMAP:
            sim_mem_uncharge(g_s, phys(((CUmipmappedArray)o)->dev), ((CUmipmappedArray)o)->bytes);
            reg_del(o);
            free(o);
            break;
        default: break;
        }
    }
    for (size_t i = 0; i < g_allocs.cap; i++) {
        if (g_allocs.k[i] <= 1)
            continue;
        struct alloc *a = (struct alloc *)g_allocs.v[i];
        if (a->ctx == c)
            alloc_free_locked(a);
    }
    pools_sync_trim(c->dev);
    if (--g_nctx[c->dev] == 0 && g_overhead)
        sim_mem_uncharge(g_s, phys(c->dev), g_overhead);
    /* The calling thread's stack forgets it; other threads see INVALID_CONTEXT. */
    int j = 0;
    for (int i = 0; i < t_depth; i++)
        if (t_stack[i] != c)
            t_stack[j++] = t_stack[i];
    t_depth = j;
    pthread_mutex_destroy(&c->m);
    pthread_cond_destroy(&c->cv);
    free(c);
}

static CUresult push_ctx(CUcontext c)
{
    if (t_depth >= (int)(sizeof t_stack / sizeof t_stack[0]))
        return CUDA_ERROR_INVALID_VALUE;
    t_stack[t_depth++] = c;
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    CHECK_INIT();
    if (pctx == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    CUresult r = CUDA_SUCCESS;
    pthread_mutex_lock(&g_mu);
    if (g_primary[dev].ctx == NULL)
        r = ctx_new_locked(dev, true, g_primary[dev].flags, &g_primary[dev].ctx);
    if (r == CUDA_SUCCESS) {
        g_primary[dev].refs++;
        *pctx = g_primary[dev].ctx;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    CHECK_INIT();
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    CUresult r = CUDA_SUCCESS;
    pthread_mutex_lock(&g_mu);
    if (g_primary[dev].refs <= 0) {
        r = CUDA_ERROR_INVALID_CONTEXT;
    } else if (--g_primary[dev].refs == 0) {
        ctx_free_locked(g_primary[dev].ctx);
        g_primary[dev].ctx = NULL;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev)
{
    CHECK_INIT();
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_mu);
    if (g_primary[dev].ctx != NULL)
        ctx_free_locked(g_primary[dev].ctx);
    g_primary[dev].ctx = NULL;
    g_primary[dev].refs = 0;
    g_primary[dev].flags = 0;
    pthread_mutex_unlock(&g_mu);
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int *flags, int *active)
{
    CHECK_INIT();
    if (flags == NULL || active == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_mu);
    *flags = g_primary[dev].flags;
    *active = g_primary[dev].ctx != NULL;
    pthread_mutex_unlock(&g_mu);
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice dev, unsigned int flags)
{
    CHECK_INIT();
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_mu);
    g_primary[dev].flags = flags;
    pthread_mutex_unlock(&g_mu);
    return CUDA_SUCCESS;
}

CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev)
{
    CHECK_INIT();
    if (pctx == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    if (t_depth >= (int)(sizeof t_stack / sizeof t_stack[0]))
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r = ctx_new_locked(dev, false, flags, pctx);
    pthread_mutex_unlock(&g_mu);
    if (r == CUDA_SUCCESS)
        push_ctx(*pctx);
    return r;
}

CUresult cuCtxCreate_v4(CUcontext *pctx, CUctxCreateParams *ctxCreateParams, unsigned int flags, CUdevice dev)
{
    (void)ctxCreateParams; /* execution affinity / CIG params: nothing to simulate */
    return cuCtxCreate_v2(pctx, flags, dev);
}

CUresult cuCtxDestroy_v2(CUcontext ctx)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_SUCCESS;
    if (!reg_is(ctx, T_CTX) || ctx->primary)
        r = CUDA_ERROR_INVALID_CONTEXT;
    else
        ctx_free_locked(ctx);
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuCtxSetCurrent(CUcontext ctx)
{
    CHECK_INIT();
    if (ctx == NULL) {
        if (t_depth > 0)
            t_depth--;
        return CUDA_SUCCESS;
    }
    pthread_mutex_lock(&g_mu);
    bool ok = reg_is(ctx, T_CTX);
    pthread_mutex_unlock(&g_mu);
    if (!ok)
        return CUDA_ERROR_INVALID_CONTEXT;
    if (t_depth == 0)
        return push_ctx(ctx);
    t_stack[t_depth - 1] = ctx;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext *pctx)
{
    CHECK_INIT();
    if (pctx == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    *pctx = current_ctx();
    pthread_mutex_unlock(&g_mu);
    return CUDA_SUCCESS;
}

CUresult cuCtxPushCurrent_v2(CUcontext ctx)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    bool ok = reg_is(ctx, T_CTX);
    pthread_mutex_unlock(&g_mu);
    if (!ok)
        return CUDA_ERROR_INVALID_CONTEXT;
    return push_ctx(ctx);
}

CUresult cuCtxPopCurrent_v2(CUcontext *pctx)
{
    CHECK_INIT();
    if (t_depth == 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    CUcontext c = t_stack[--t_depth];
    if (pctx != NULL)
        *pctx = c;
    return CUDA_SUCCESS;
}


CUresult cuCtxGetDevice(CUdevice *device)
{
    CHECK_INIT();
    if (device == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    WITH_CTX(c);
    *device = c->dev;
    pthread_mutex_unlock(&g_mu);
    return CUDA_SUCCESS;
}

static void ctx_wait_idle(CUcontext c, CUstream only)
{
    pthread_mutex_lock(&c->m);
    for (;;) {
        bool busy = false;
        for (CUstream s = c->streams; s; s = s->next)
            if ((only == NULL || s == only) && s->head != s->tail)
                busy = true;
        if (!busy || c->stop)
            break;
        pthread_cond_wait(&c->cv, &c->m);
    }
    pthread_mutex_unlock(&c->m);
}

static void sync_trim(int dev)
{
    pthread_mutex_lock(&g_mu);
    pools_sync_trim(dev);
    pthread_mutex_unlock(&g_mu);
}

CUresult cuCtxSynchronize(void)
{
    CHECK_INIT();
    WITH_CTX(c);
    CUresult r = capture_unsafe_locked();
    pthread_mutex_unlock(&g_mu);
    if (r != CUDA_SUCCESS)
        return r;
    ctx_wait_idle(c, NULL);
    sync_trim(c->dev);
    return CUDA_SUCCESS;
}

/* ---- streams ---- */
CUresult cuStreamCreate(CUstream *phStream, unsigned int Flags)
{
    CHECK_INIT();
    if (phStream == NULL || (Flags & ~CU_STREAM_NON_BLOCKING) != 0)
        return CUDA_ERROR_INVALID_VALUE;
    WITH_CTX(c);
    *phStream = stream_new_locked(c, Flags);
    pthread_mutex_unlock(&g_mu);
    return *phStream ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

CUresult cuStreamCreateWithPriority(CUstream *phStream, unsigned int flags, int priority)
{
    (void)priority;
    return cuStreamCreate(phStream, flags);
}

CUresult cuStreamDestroy_v2(CUstream hStream)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    if (!reg_is(hStream, T_STREAM) || hStream == hStream->h.ctx->def) {
        pthread_mutex_unlock(&g_mu);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    CUcontext c = hStream->h.ctx;
    reg_del(hStream);
    pthread_mutex_unlock(&g_mu);
    /* Like the driver: returns at once, queued work completes first. */
    ctx_wait_idle(c, hStream);
    pthread_mutex_lock(&g_mu);
    pthread_mutex_lock(&c->m);
    for (CUstream *pp = &c->streams; *pp; pp = &(*pp)->next)
        if (*pp == hStream) {
            *pp = hStream->next;
            break;
        }
    if (c->rr == hStream)
        c->rr = NULL;
    pthread_mutex_unlock(&c->m);
    if (hStream->capture) {
        capture_unlink_locked(hStream);
        graph_free_locked(hStream->capture);
    }
    free(hStream);
    pthread_mutex_unlock(&g_mu);
    return CUDA_SUCCESS;
}

static CUresult stream_flags(CUstream hs, unsigned *flags)
{
    CHECK_INIT();
    if (flags == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS)
        *flags = s->flags;
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuStreamGetFlags(CUstream hStream, unsigned int *flags)
{
    return stream_flags(hStream, flags);
}

CUresult cuStreamGetFlags_ptsz(CUstream hStream, unsigned int *flags)
{
    return stream_flags(hStream, flags);
}

/* CUDA 3.x's name, still exported by the driver (cuda.h maps the name to
 * _v2, so programs built against it never call this one; the hook does not
 * intercept it, and its tests use it as a path it cannot see). */
__attribute__((visibility("default"))) CUresult cuStreamDestroy(CUstream hStream);
CUresult cuStreamDestroy(CUstream hStream)
{
    return cuStreamDestroy_v2(hStream);
}

/* What synchronizing with or querying stream hs (of an entry point's _ptsz
 * variant when ptsz) may do during captures. g_mu held. */
static CUresult stream_wait_allowed_locked(CUstream hs, bool ptsz, CUstream *s)
{
    CUresult r = resolve_stream(hs, s);
    if (r == CUDA_SUCCESS)
        r = capture_unsafe_locked();
    if (r == CUDA_SUCCESS && is_legacy(hs, ptsz))
        r = capture_legacy_locked((*s)->h.ctx, true);
    if (r == CUDA_SUCCESS && (*s)->capture != NULL) {
        (*s)->cap_invalid = true;
        r = CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    return r;
}

static CUresult stream_sync(CUstream hs, bool ptsz)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = stream_wait_allowed_locked(hs, ptsz, &s);
    pthread_mutex_unlock(&g_mu);
    if (r != CUDA_SUCCESS)
        return r;
    ctx_wait_idle(s->h.ctx, s);
    sync_trim(s->h.ctx->dev);
    return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream hStream)
{
    return stream_sync(hStream, false);
}

CUresult cuStreamSynchronize_ptsz(CUstream hStream)
{
    return stream_sync(hStream, true);
}

static CUresult stream_query(CUstream hs, bool ptsz)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = stream_wait_allowed_locked(hs, ptsz, &s);
    pthread_mutex_unlock(&g_mu);
    if (r != CUDA_SUCCESS)
        return r;
    pthread_mutex_lock(&s->h.ctx->m);
    r = s->head == s->tail ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
    pthread_mutex_unlock(&s->h.ctx->m);
    return r;
}

CUresult cuStreamQuery(CUstream hStream)
{
    return stream_query(hStream, false);
}

CUresult cuStreamQuery_ptsz(CUstream hStream)
{
    return stream_query(hStream, true);
}

static CUresult stream_wait_event(CUstream hs, CUevent e, unsigned flags, bool ptsz)
{
    CHECK_INIT();
    if (flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && !reg_is(e, T_EVENT))
        r = CUDA_ERROR_INVALID_HANDLE;
    if (r == CUDA_SUCCESS && is_legacy(hs, ptsz))
        r = capture_legacy_locked(s->h.ctx, true);
    if (r == CUDA_SUCCESS && s->capture != NULL) {
        r = capture_join_locked(s); /* a dependency inside the graph: nothing to wait for */
        pthread_mutex_unlock(&g_mu);
        return r;
    }
    struct op op = {.kind = OP_WAIT};
    if (r == CUDA_SUCCESS) {
        op.seq = __atomic_load_n(&e->rec_seq, __ATOMIC_ACQUIRE);
        op.ev = e;
        __atomic_add_fetch(&e->refs, 1, __ATOMIC_ACQ_REL);
    }
    pthread_mutex_unlock(&g_mu);
    if (r != CUDA_SUCCESS || op.seq == 0) {
        if (op.ev)
            event_unref(op.ev);
        return r;
    }
    r = enqueue(s, &op);
    if (r != CUDA_SUCCESS)
        event_unref(e);
    return r;
}

CUresult cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int Flags)
{
    return stream_wait_event(hStream, hEvent, Flags, false);
}

CUresult cuStreamWaitEvent_ptsz(CUstream hStream, CUevent hEvent, unsigned int Flags)
{
    return stream_wait_event(hStream, hEvent, Flags, true);
}

static CUresult is_capturing(CUstream hs, CUstreamCaptureStatus *st, bool ptsz)
{
    CHECK_INIT();
    if (st == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && is_legacy(hs, ptsz))
        r = capture_legacy_locked(s->h.ctx, false);
    if (r == CUDA_SUCCESS)
        *st = !s->capture     ? CU_STREAM_CAPTURE_STATUS_NONE
              : s->cap_invalid ? CU_STREAM_CAPTURE_STATUS_INVALIDATED
                               : CU_STREAM_CAPTURE_STATUS_ACTIVE;
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuStreamIsCapturing(CUstream hStream, CUstreamCaptureStatus *captureStatus)
{
    return is_capturing(hStream, captureStatus, false);
}

CUresult cuStreamIsCapturing_ptsz(CUstream hStream, CUstreamCaptureStatus *captureStatus)
{
    return is_capturing(hStream, captureStatus, true);
}

static CUresult begin_capture(CUstream hs, CUstreamCaptureMode mode, bool ptsz)
{
    CHECK_INIT();
    if (mode != CU_STREAM_CAPTURE_MODE_GLOBAL && mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
        mode != CU_STREAM_CAPTURE_MODE_RELAXED)
        return CUDA_ERROR_INVALID_VALUE;
    if (is_legacy(hs, ptsz))
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED; /* the legacy stream cannot be captured */
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && s->capture != NULL)
        r = CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS && (s->capture = graph_new_locked()) == NULL)
        r = CUDA_ERROR_OUT_OF_MEMORY;
    if (r == CUDA_SUCCESS) {
        s->cap_mode = mode;
        s->cap_thread = &t_self;
        s->cap_invalid = false;
        s->cap_id = ++g_capture_ids;
        s->cap_next = g_capturing;
        g_capturing = s;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuStreamBeginCapture_v2(CUstream hStream, CUstreamCaptureMode mode)
{
    return begin_capture(hStream, mode, false);
}

CUresult cuStreamBeginCapture_v2_ptsz(CUstream hStream, CUstreamCaptureMode mode)
{
    return begin_capture(hStream, mode, true);
}

static CUresult end_capture(CUstream hs, CUgraph *out)
{
    CHECK_INIT();
    if (out == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && s->capture == NULL)
        r = CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS && s->cap_mode != CU_STREAM_CAPTURE_MODE_RELAXED && s->cap_thread != &t_self)
        r = CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD;
    if (r == CUDA_SUCCESS) {
        capture_unlink_locked(s);
        if (s->cap_invalid) {
            graph_free_locked(s->capture);
            *out = NULL;
            r = CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
        } else {
            *out = s->capture;
        }
        s->capture = NULL;
        s->cap_invalid = false;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuStreamEndCapture(CUstream hStream, CUgraph *phGraph)
{
    return end_capture(hStream, phGraph);
}

CUresult cuStreamEndCapture_ptsz(CUstream hStream, CUgraph *phGraph)
{
    return end_capture(hStream, phGraph);
}

/* ---- events ---- */
CUresult cuEventCreate(CUevent *phEvent, unsigned int Flags)
{
    CHECK_INIT();
    if (phEvent == NULL || (Flags & ~(unsigned)(CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING | 0x4)) != 0)
        return CUDA_ERROR_INVALID_VALUE;
    WITH_CTX(c);
    CUevent e = calloc(1, sizeof *e);
    CUresult r = CUDA_ERROR_OUT_OF_MEMORY;
    if (e != NULL) {
        e->h.type = T_EVENT;
        e->h.ctx = c;
        e->flags = Flags;
        e->refs = 1;
        if (reg_add(e, T_EVENT)) {
            *phEvent = e;
            r = CUDA_SUCCESS;
        } else {
            free(e);
        }
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

static CUresult event_record(CUevent e, CUstream hs, bool ptsz)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && !reg_is(e, T_EVENT))
        r = CUDA_ERROR_INVALID_HANDLE;
    if (r == CUDA_SUCCESS && e->h.ctx != s->h.ctx)
        r = CUDA_ERROR_INVALID_HANDLE;
    if (r == CUDA_SUCCESS && is_legacy(hs, ptsz))
        r = capture_legacy_locked(s->h.ctx, true);
    if (r == CUDA_SUCCESS && s->capture != NULL) {
        /* Joins the capture: a captured event, no timed work. */
        r = capture_join_locked(s);
        if (r == CUDA_SUCCESS)
            e->cap_id = s->cap_id;
    }
    if (r != CUDA_SUCCESS || s->capture != NULL) {
        pthread_mutex_unlock(&g_mu);
        return r;
    }
    e->cap_id = 0;
    pthread_mutex_lock(&s->h.ctx->m);
    struct op op = {.kind = OP_RECORD, .ev = e, .seq = ++e->rec_seq};
    __atomic_add_fetch(&e->refs, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&s->h.ctx->m);
    pthread_mutex_unlock(&g_mu);
    r = enqueue(s, &op);
    if (r != CUDA_SUCCESS)
        event_unref(e);
    return r;
}

CUresult cuEventRecord(CUevent hEvent, CUstream hStream)
{
    return event_record(hEvent, hStream, false);
}

CUresult cuEventRecord_ptsz(CUevent hEvent, CUstream hStream)
{
    return event_record(hEvent, hStream, true);
}

static bool event_done(CUevent e)
{
    return __atomic_load_n(&e->done_seq, __ATOMIC_ACQUIRE) >= __atomic_load_n(&e->rec_seq, __ATOMIC_ACQUIRE);
}

CUresult cuEventQuery(CUevent hEvent)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = reg_is(hEvent, T_EVENT) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
    if (r == CUDA_SUCCESS)
        r = capture_unsafe_locked();
    if (r == CUDA_SUCCESS)
        r = event_captured_locked(hEvent);
    if (r == CUDA_SUCCESS && !event_done(hEvent))
        r = CUDA_ERROR_NOT_READY;
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuEventSynchronize(CUevent hEvent)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = reg_is(hEvent, T_EVENT) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
    if (r == CUDA_SUCCESS)
        r = capture_unsafe_locked();
    if (r == CUDA_SUCCESS)
        r = event_captured_locked(hEvent);
    if (r != CUDA_SUCCESS) {
        pthread_mutex_unlock(&g_mu);
        return r;
    }
    CUcontext c = hEvent->h.ctx;
    pthread_mutex_unlock(&g_mu);
    pthread_mutex_lock(&c->m);
    while (!event_done(hEvent) && !c->stop)
        pthread_cond_wait(&c->cv, &c->m);
    pthread_mutex_unlock(&c->m);
    sync_trim(c->dev);
    return CUDA_SUCCESS;
}

CUresult cuEventElapsedTime(float *pMilliseconds, CUevent hStart, CUevent hEnd)
{
    CHECK_INIT();
    if (pMilliseconds == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_SUCCESS;
    if (!reg_is(hStart, T_EVENT) || !reg_is(hEnd, T_EVENT) || (hStart->flags & CU_EVENT_DISABLE_TIMING) ||
        (hEnd->flags & CU_EVENT_DISABLE_TIMING))
        r = CUDA_ERROR_INVALID_HANDLE;
    if (r == CUDA_SUCCESS)
        r = event_captured_locked(hStart);
    if (r == CUDA_SUCCESS)
        r = event_captured_locked(hEnd);
    if (r == CUDA_SUCCESS && (hStart->rec_seq == 0 || hEnd->rec_seq == 0))
        r = CUDA_ERROR_INVALID_HANDLE;
    if (r == CUDA_SUCCESS && (!event_done(hStart) || !event_done(hEnd)))
        r = CUDA_ERROR_NOT_READY;
    if (r == CUDA_SUCCESS)
        *pMilliseconds = (float)(((double)hEnd->t_ns - (double)hStart->t_ns) / 1e6);
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuEventElapsedTime_v2(float *pMilliseconds, CUevent hStart, CUevent hEnd)
{
    return cuEventElapsedTime(pMilliseconds, hStart, hEnd);
}

CUresult cuEventDestroy_v2(CUevent hEvent)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_HANDLE;
    if (reg_is(hEvent, T_EVENT)) {
        reg_del(hEvent);
        event_unref(hEvent); /* freed once queued ops naming it are done */
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}
