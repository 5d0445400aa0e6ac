/*
 * hook_batch.c - the batch records: per launching thread, per stream it
 * launches on, a ring of batches (vgpu_batch, hook_services.h) that the
 * thread fills (hook_gate.c) and the accountant times (hook_account.c),
 * handed between the two through each batch's atomic state word, never a
 * lock. Records of exited threads are reused once all their batches are
 * free. Also the accountant's wake-up word, which a thread that opens a
 * batch uses to end the accountant's idle sleep.
 */
#include <limits.h>
#include <stdlib.h>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "hook_services.h"

_Atomic(struct vgpu_thread *) vgpu_threads;
_Atomic uint64_t vgpu_lost_batches;

static _Thread_local struct vgpu_thread *tls_thr __attribute__((tls_model("initial-exec")));
_Thread_local struct vgpu_tstream *vgpu_tls_ts __attribute__((tls_model("initial-exec")));
static pthread_key_t thr_key;
static pthread_once_t key_once = PTHREAD_ONCE_INIT;

static void thr_exit(void *p)
{
    struct vgpu_thread *t = p;
    /* Open batches are closed by the accountant once idle; the struct is
     * reused by a later thread when all its batches are free. */
    atomic_store(&t->alive, 0);
}

static void make_key(void)
{
    pthread_key_create(&thr_key, thr_exit);
}

static bool all_free(struct vgpu_thread *t)
{
    for (int i = 0; i < VGPU_THREAD_STREAMS; i++)
        for (int j = 0; j < VGPU_BATCH_RING; j++)
            if (atomic_load(&t->ts[i].b[j].state) != VGPU_B_FREE)
                return false;
    return true;
}

struct vgpu_thread *vgpu_thread_state(void)
{
    struct vgpu_thread *t = tls_thr;
    if (__builtin_expect(t != NULL, 1))
        return t;
    pthread_once(&key_once, make_key);
    for (t = atomic_load(&vgpu_threads); t; t = t->next) {
        int dead = 0;
        if (atomic_compare_exchange_strong(&t->alive, &dead, 1)) {
            if (all_free(t))
                break;
            atomic_store(&t->alive, 0);
        }
    }
    if (!t) {
        t = calloc(1, sizeof *t);
        if (!t)
            return NULL;
        for (int i = 0; i < VGPU_THREAD_STREAMS; i++)
            t->ts[i].cur = -1;
        atomic_store(&t->alive, 1);
        struct vgpu_thread *head = atomic_load(&vgpu_threads);
        do
            t->next = head;
        while (!atomic_compare_exchange_weak(&vgpu_threads, &head, t));
    } else {
        for (int i = 0; i < VGPU_THREAD_STREAMS; i++) {
            t->ts[i].ctx = NULL;
            t->ts[i].stream = NULL;
            t->ts[i].cur = -1;
        }
    }
    pthread_setspecific(thr_key, t);
    tls_thr = t;
    vgpu_tls_ts = NULL;
    return t;
}

struct vgpu_thread *vgpu_thread_peek(void)
{
    return tls_thr;
}

void vgpu_batch_atfork_child(void)
{
    tls_thr = NULL;
    vgpu_tls_ts = NULL;
    atomic_store(&vgpu_threads, NULL);
}

/* The accountant's deep sleep when the process launches nothing; a launching
 * thread that opens a batch kicks it awake (one futex wake, only then). */
_Atomic uint32_t vgpu_account_wake_word;
_Atomic int vgpu_account_asleep;
_Atomic int vgpu_account_started;

void vgpu_account_kick(void)
{
    if (atomic_exchange_explicit(&vgpu_account_asleep, 0, memory_order_acq_rel)) {
        atomic_fetch_add_explicit(&vgpu_account_wake_word, 1, memory_order_release);
        syscall(SYS_futex, &vgpu_account_wake_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
}
bool vgpu_account_running(void)
{
    return atomic_load_explicit(&vgpu_account_started, memory_order_relaxed);
}
