/*
 * sim_worker.c - the worker thread of each context: it executes the context's
 * queued operations in stream order, and runs a kernel by holding the shared
 * device (sim_shm.c's robust FIFO lock) for at most one time slice before
 * letting other contexts' workers in, like the hardware's time-slicing.
 * Worker threads never take g_mu.
 */
#include "sim_internal.h"

/* ---- worker: executes queued operations, time-sliced on the shared device ---- */
void op_discard(struct op *op)
{
    if (op->ev)
        event_unref(op->ev);
    free(op->graph_ns);
    memset(op, 0, sizeof *op);
}

static void sleep_until(uint64_t t)
{
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static void release_device(CUcontext c)
{
    if (c->holding) {
        sim_dev_release(g_s, phys(c->dev), c->token);
        c->holding = false;
    }
}

/* "Runs" a kernel: sleeps while holding the device, at most one slice at a time. */
static void run_kernel(CUcontext c, uint64_t ns)
{
    uint64_t left = ns;
    while (left > 0 && !__atomic_load_n(&c->stop, __ATOMIC_ACQUIRE)) {
        if (!c->holding) {
            c->token = sim_dev_acquire(g_s, phys(c->dev));
            c->holding = true;
            c->slice_end = sim_now_ns() + g_slice_ns;
        }
        uint64_t t0 = sim_now_ns();
        uint64_t until = t0 + left;
        if (c->slice_end > t0 && until > c->slice_end)
            until = c->slice_end;
        sleep_until(until);
        uint64_t t1 = sim_now_ns();
        uint64_t ran = t1 - t0;
        sim_account_busy(g_s, phys(c->dev), ran);
        left -= ran < left ? ran : left;
        if (t1 >= c->slice_end) {
            if (sim_dev_has_waiters(g_s, phys(c->dev)))
                release_device(c); /* hand over: re-queue behind the waiters */
            else
                c->slice_end = t1 + g_slice_ns;
        }
    }
}

static bool op_ready(const struct op *op)
{
    if (op->kind != OP_WAIT)
        return true;
    return __atomic_load_n(&op->ev->done_seq, __ATOMIC_ACQUIRE) >= op->seq;
}

void *worker_main(void *arg)
{
    CUcontext c = arg;
    pthread_mutex_lock(&c->m);
    while (!c->stop) {
        CUstream pick = NULL;
        bool blocked = false;
        CUstream start = c->rr && c->rr->next ? c->rr->next : c->streams;
        CUstream s = start;
        do {
            if (s == NULL)
                break;
            if (s->head != s->tail) {
                if (op_ready(&s->q[s->head % QCAP])) {
                    pick = s;
                    break;
                }
                blocked = true;
            }
            s = s->next ? s->next : c->streams;
        } while (s != start);
        if (pick == NULL) {
            release_device(c);
            if (blocked) {
                /* waiting on another context's event: poll */
                struct timespec ts;
                clock_gettime(CLOCK_MONOTONIC, &ts);
                ts.tv_nsec += 200000;
                if (ts.tv_nsec >= 1000000000) {
                    ts.tv_sec++;
                    ts.tv_nsec -= 1000000000;
                }
                pthread_cond_timedwait(&c->cv, &c->m, &ts);
            } else {
                pthread_cond_wait(&c->cv, &c->m);
            }
            continue;
        }
        c->rr = pick;
        struct op op = pick->q[pick->head % QCAP];
        pthread_mutex_unlock(&c->m);
        switch (op.kind) {
        case OP_KERNEL: run_kernel(c, op.ns); break;
        case OP_GRAPH:
            for (size_t i = 0; i < op.graph_n; i++)
                run_kernel(c, op.graph_ns[i]);
            break;
        case OP_RECORD:
            __atomic_store_n(&op.ev->t_ns, sim_now_ns(), __ATOMIC_RELAXED);
            __atomic_store_n(&op.ev->done_seq, op.seq, __ATOMIC_RELEASE);
            break;
        default: break;
        }
        pthread_mutex_lock(&c->m);
        op_discard(&pick->q[pick->head % QCAP]);
        pick->head++;
        pthread_cond_broadcast(&c->cv);
    }
    release_device(c);
    pthread_mutex_unlock(&c->m);
    return NULL;
}

CUresult enqueue(CUstream s, const struct op *op)
{
    CUcontext c = s->h.ctx;
    pthread_mutex_lock(&c->m);
    while (s->tail - s->head >= QCAP && !c->stop)
        pthread_cond_wait(&c->cv, &c->m); /* a full queue blocks, like the driver's push buffer */
    if (c->stop) {
        pthread_mutex_unlock(&c->m);
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    s->q[s->tail % QCAP] = *op;
    s->tail++;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->m);
    return CUDA_SUCCESS;
}
