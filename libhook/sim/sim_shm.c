/*
 * sim_shm.c - the shared device state: creation, the process table, memory
 * accounting, and the FIFO time-slice lock.
 *
 * Robustness matters more than speed here: any process may be SIGKILLed at
 * any point, so every mutex is robust (EOWNERDEAD is recovered), no mutex is
 * ever held while sleeping, and "who holds the device" is data guarded by a
 * mutex rather than a lock held across a time slice. A holder or waiter that
 * died is noticed by pid liveness checks when a waiter times out.
 */
#include "sim_shm.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_MEM (16ull << 30)

static pthread_mutex_t g_attach_mu = PTHREAD_MUTEX_INITIALIZER;
static struct sim_shm *g_shm;
static char g_name[256];
static int g_own_slot = -1;
static int g_own_pid;

uint64_t sim_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t sim_realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t sim_parse_size(const char *s, uint64_t dflt)
{
    if (s == NULL || *s == '\0')
        return dflt;
    errno = 0;
    char *end = NULL;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *s == '-')
        goto bad;
    unsigned shift = 0;
    switch (*end) {
    case '\0': break;
    case 'k': case 'K': shift = 10; end++; break;
    case 'm': case 'M': shift = 20; end++; break;
    case 'g': case 'G': shift = 30; end++; break;
    case 't': case 'T': shift = 40; end++; break;
    default: goto bad;
    }
    if (*end != '\0')
        goto bad;
    if (shift != 0 && v > (UINT64_MAX >> shift))
        goto bad;
    return (uint64_t)v << shift;
bad:
    fprintf(stderr, "vgpu-sim: invalid size '%s', using %llu\n", s, (unsigned long long)dflt);
    return dflt;
}

uint64_t sim_env_u64(const char *name, uint64_t dflt)
{
    return sim_parse_size(getenv(name), dflt);
}

void sim_lock(pthread_mutex_t *m)
{
    int r = pthread_mutex_lock(m);
    if (r == EOWNERDEAD)
        pthread_mutex_consistent(m); /* the dead owner's update may be partial; fields stay valid */
}

void sim_unlock(pthread_mutex_t *m)
{
    pthread_mutex_unlock(m);
}

static void init_shared_mutex(pthread_mutex_t *m)
{
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
}

bool sim_pid_alive(int pid)
{
    if (pid <= 0)
        return false;
    if (pid == getpid())
        return true;
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return false;
    /* A zombie still answers kill(); it holds no GPU memory any more. */
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno != ENOENT;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return true;
    buf[n] = '\0';
    char *rp = strrchr(buf, ')');
    if (rp == NULL || rp[1] == '\0' || rp[2] == '\0')
        return true;
    return rp[2] != 'Z' && rp[2] != 'X';
}

static void shm_path(const char *name, char *out, size_t len)
{
    snprintf(out, len, "%s%s", name[0] == '/' ? "" : "/", name);
}

static void init_layout(struct sim_shm *s)
{
    memset(s, 0, sizeof *s);
    s->magic = SIM_MAGIC;
    s->version = SIM_LAYOUT_VERSION;
    uint64_t ndev = sim_env_u64("VGPU_SIM_DEVICES", 1);
    if (ndev < 1 || ndev > SIM_MAX_DEVS) {
        fprintf(stderr, "vgpu-sim: VGPU_SIM_DEVICES must be 1..%d, using 1\n", SIM_MAX_DEVS);
        ndev = 1;
    }
    s->ndev = (uint32_t)ndev;
    s->total_mem = sim_env_u64("VGPU_SIM_MEM", DEFAULT_MEM);
    init_shared_mutex(&s->table_mu);
    for (int i = 0; i < SIM_MAX_DEVS; i++)
        init_shared_mutex(&s->dev[i].mu);
}

static struct sim_shm *map_fd(int fd)
{
    void *p = mmap(NULL, sizeof(struct sim_shm), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : (struct sim_shm *)p;
}

/* Opens an existing object and waits (bounded) for its creator to finish. */
static struct sim_shm *open_existing(const char *path, bool *enoent)
{
    *enoent = false;
    int fd = shm_open(path, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        *enoent = errno == ENOENT;
        return NULL;
    }
    struct sim_shm *s = NULL;
    for (int i = 0; i < 5000; i++) {
        struct stat st;
        if (fstat(fd, &st) == 0 && (size_t)st.st_size >= sizeof(struct sim_shm)) {
            if (s == NULL)
                s = map_fd(fd);
            if (s != NULL && __atomic_load_n(&s->ready, __ATOMIC_ACQUIRE) == 1)
                break;
        }
        usleep(1000);
    }
    close(fd);
    if (s == NULL)
        return NULL;
    if (__atomic_load_n(&s->ready, __ATOMIC_ACQUIRE) != 1 || s->magic != SIM_MAGIC ||
        s->version != SIM_LAYOUT_VERSION) {
        fprintf(stderr, "vgpu-sim: shm %s is not a ready vgpu-sim v%u object\n", path, SIM_LAYOUT_VERSION);
        munmap(s, sizeof *s);
        return NULL;
    }
    return s;
}

struct sim_shm *sim_shm_open_named(const char *name)
{
    char path[300];
    shm_path(name, path, sizeof path);
    for (int attempt = 0; attempt < 10; attempt++) {
        int fd = shm_open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd >= 0) {
            (void)fchmod(fd, 0666);
            if (ftruncate(fd, (off_t)sizeof(struct sim_shm)) != 0) {
                close(fd);
                shm_unlink(path);
                return NULL;
            }
            struct sim_shm *s = map_fd(fd);
            close(fd);
            if (s == NULL)
                return NULL;
            init_layout(s);
            __atomic_store_n(&s->ready, 1, __ATOMIC_RELEASE);
            return s;
        }
        if (errno != EEXIST)
            return NULL;
        bool enoent;
        struct sim_shm *s = open_existing(path, &enoent);
        if (s != NULL || !enoent)
            return s;
        /* unlinked between our two opens: try creating again */
    }
    return NULL;
}

struct sim_shm *sim_shm_attach(void)
{
    struct sim_shm *s = __atomic_load_n(&g_shm, __ATOMIC_ACQUIRE);
    if (s != NULL)
        return s;
    pthread_mutex_lock(&g_attach_mu);
    if (g_shm == NULL) {
        const char *name = getenv("VGPU_SIM_SHM");
        if (name == NULL || *name == '\0')
            name = "vgpu-sim";
        snprintf(g_name, sizeof g_name, "%s", name);
        s = sim_shm_open_named(g_name);
        __atomic_store_n(&g_shm, s, __ATOMIC_RELEASE);
    }
    s = g_shm;
    pthread_mutex_unlock(&g_attach_mu);
    return s;
}

struct sim_shm *sim_shm_map_existing(const char *name)
{
    char path[300];
    bool enoent;
    shm_path(name, path, sizeof path);
    return open_existing(path, &enoent);
}

void sim_shm_detach(struct sim_shm *s)
{
    if (s != NULL)
        munmap(s, sizeof *s);
}

const char *sim_shm_name(void)
{
    return g_name;
}

void sim_reap_locked(struct sim_shm *s)
{
    for (int i = 0; i < SIM_MAX_PROCS; i++) {
        struct sim_proc *p = &s->proc[i];
        if (p->alive && !sim_pid_alive(p->pid)) {
            p->alive = 0;
            memset(p->mem, 0, sizeof p->mem);
        }
    }
}

int sim_proc_slot_locked(struct sim_shm *s, int pid, bool create)
{
    for (int i = 0; i < SIM_MAX_PROCS; i++)
        if (s->proc[i].alive && s->proc[i].pid == pid)
            return i;
    if (!create)
        return -1;
    for (int pass = 0; pass < 2; pass++) {
        /* Prefer never-used slots so dead processes' stats stay readable. */
        for (int i = 0; i < SIM_MAX_PROCS; i++)
            if (s->proc[i].pid == 0)
                goto take;
        for (int i = 0; i < SIM_MAX_PROCS; i++)
            if (!s->proc[i].alive) {
                memset(&s->proc[i], 0, sizeof s->proc[i]);
                s->proc[i].pid = pid;
                s->proc[i].alive = 1;
                return i;
            }
        sim_reap_locked(s);
        continue;
    take:
        for (int i = 0; i < SIM_MAX_PROCS; i++)
            if (s->proc[i].pid == 0) {
                memset(&s->proc[i], 0, sizeof s->proc[i]);
                s->proc[i].pid = pid;
                s->proc[i].alive = 1;
                return i;
            }
    }
    return -1;
}

/* This process's slot; cached, re-looked-up after fork or if recycled. */
static struct sim_proc *own_proc(struct sim_shm *s)
{
    int pid = getpid();
    int slot = __atomic_load_n(&g_own_slot, __ATOMIC_ACQUIRE);
    if (slot >= 0 && __atomic_load_n(&g_own_pid, __ATOMIC_RELAXED) == pid && s->proc[slot].pid == pid &&
        s->proc[slot].alive)
        return &s->proc[slot];
    sim_lock(&s->table_mu);
    slot = sim_proc_slot_locked(s, pid, true);
    sim_unlock(&s->table_mu);
    if (slot < 0)
        return NULL;
    __atomic_store_n(&g_own_pid, pid, __ATOMIC_RELAXED);
    __atomic_store_n(&g_own_slot, slot, __ATOMIC_RELEASE);
    return &s->proc[slot];
}

static uint64_t used_locked(struct sim_shm *s, int dev)
{
    uint64_t used = 0;
    for (int i = 0; i < SIM_MAX_PROCS; i++)
        if (s->proc[i].alive)
            used += s->proc[i].mem[dev];
    return used;
}

int sim_mem_charge(struct sim_shm *s, int dev, uint64_t n)
{
    int rc = -1;
    sim_lock(&s->table_mu);
    uint64_t used = used_locked(s, dev);
    if (used + n > s->total_mem || used + n < used) {
        sim_reap_locked(s); /* dead processes give their memory back lazily */
        used = used_locked(s, dev);
    }
    if (used + n <= s->total_mem && used + n >= used) {
        int slot = sim_proc_slot_locked(s, getpid(), true);
        if (slot >= 0) {
            s->proc[slot].mem[dev] += n;
            rc = 0;
        }
    }
    sim_unlock(&s->table_mu);
    return rc;
}

void sim_mem_uncharge(struct sim_shm *s, int dev, uint64_t n)
{
    sim_lock(&s->table_mu);
    int slot = sim_proc_slot_locked(s, getpid(), false);
    if (slot >= 0) {
        uint64_t *m = &s->proc[slot].mem[dev];
        *m = *m >= n ? *m - n : 0;
    }
    sim_unlock(&s->table_mu);
}

uint64_t sim_mem_used(struct sim_shm *s, int dev)
{
    sim_lock(&s->table_mu);
    sim_reap_locked(s);
    uint64_t used = used_locked(s, dev);
    sim_unlock(&s->table_mu);
    return used;
}

static long futex(uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

/* Wake the waiter at the head of the queue, and only it: each waiter sleeps
 * on its own queue entry's word. Waking every waiter at each hand-over made
 * 200 waiting contexts a thundering herd (load average past 200). */
static void bump_and_wake(struct sim_dev *d)
{
    __atomic_add_fetch(&d->seq, 1, __ATOMIC_RELEASE);
    if (d->qhead != d->qtail) {
        struct sim_waiter *h = &d->q[d->qhead % SIM_QUEUE];
        __atomic_add_fetch(&h->wake, 1, __ATOMIC_RELEASE);
        futex(&h->wake, FUTEX_WAKE, 1, NULL);
    }
}

static void take(struct sim_dev *d, int pid, uint64_t token)
{
    d->held = 1;
    d->holder_pid = pid;
    d->holder_token = token;
}

/* Drops a dead holder and dead waiters at the head of the queue. */
static void recover_dead_locked(struct sim_dev *d, uint64_t my_token)
{
    bool changed = false;
    if (d->held && !sim_pid_alive(d->holder_pid)) {
        d->held = 0;
        changed = true;
    }
    while (d->qhead != d->qtail) {
        struct sim_waiter *w = &d->q[d->qhead % SIM_QUEUE];
        if (w->token == my_token || sim_pid_alive(w->pid))
            break;
        d->qhead++;
        changed = true;
    }
    if (changed)
        bump_and_wake(d);
}

uint64_t sim_dev_acquire(struct sim_shm *s, int dev)
{
    struct sim_dev *d = &s->dev[dev];
    int me = getpid();
    sim_lock(&d->mu);
    uint64_t token = ++d->next_token;
    if (!d->held && d->qhead == d->qtail) {
        take(d, me, token);
        sim_unlock(&d->mu);
        return token;
    }
    while (d->qtail - d->qhead >= SIM_QUEUE) {
        recover_dead_locked(d, 0);
        sim_unlock(&d->mu);
        usleep(1000);
        sim_lock(&d->mu);
    }
    struct sim_waiter *mine = &d->q[d->qtail % SIM_QUEUE];
    *mine = (struct sim_waiter){.pid = me, .token = token};
    __atomic_store_n(&d->qtail, d->qtail + 1, __ATOMIC_RELEASE);
    for (;;) {
        if (!d->held && d->qhead != d->qtail && d->q[d->qhead % SIM_QUEUE].token == token) {
            __atomic_store_n(&d->qhead, d->qhead + 1, __ATOMIC_RELEASE);
            take(d, me, token);
            sim_unlock(&d->mu);
            return token;
        }
        uint32_t seq = __atomic_load_n(&mine->wake, __ATOMIC_ACQUIRE);
        sim_unlock(&d->mu);
        /* The timeout only serves to notice a holder that died. */
        struct timespec to = {.tv_sec = 0, .tv_nsec = 50 * 1000 * 1000};
        long r = futex(&mine->wake, FUTEX_WAIT, seq, &to);
        int err = errno;
        sim_lock(&d->mu);
        if (r != 0 && err == ETIMEDOUT)
            recover_dead_locked(d, token);
    }
}

void sim_dev_release(struct sim_shm *s, int dev, uint64_t token)
{
    struct sim_dev *d = &s->dev[dev];
    sim_lock(&d->mu);
    if (d->held && d->holder_token == token && d->holder_pid == getpid()) {
        d->held = 0;
        bump_and_wake(d);
    }
    sim_unlock(&d->mu);
}

bool sim_dev_has_waiters(struct sim_shm *s, int dev)
{
    struct sim_dev *d = &s->dev[dev];
    return __atomic_load_n(&d->qtail, __ATOMIC_ACQUIRE) != __atomic_load_n(&d->qhead, __ATOMIC_ACQUIRE);
}

void sim_account_busy(struct sim_shm *s, int dev, uint64_t ns)
{
    struct sim_proc *p = own_proc(s);
    struct sim_dev *d = &s->dev[dev];
    uint64_t pb = p ? __atomic_add_fetch(&p->busy[dev], ns, __ATOMIC_RELAXED) : 0;
    uint64_t db = __atomic_add_fetch(&d->busy_total, ns, __ATOMIC_RELAXED);
    uint64_t now = sim_realtime_ns();
    bool proc_due = p && now - p->hist[dev][(p->hist_pos[dev] + SIM_HIST - 1) % SIM_HIST].t_ns >= SIM_SNAP_NS;
    bool dev_due = now - d->hist[(d->hist_pos + SIM_HIST - 1) % SIM_HIST].t_ns >= SIM_SNAP_NS;
    if (!proc_due && !dev_due)
        return;
    sim_lock(&s->table_mu);
    if (proc_due) {
        p->hist[dev][p->hist_pos[dev] % SIM_HIST] = (struct sim_snap){now, pb};
        p->hist_pos[dev] = (p->hist_pos[dev] + 1) % SIM_HIST;
    }
    if (dev_due) {
        d->hist[d->hist_pos % SIM_HIST] = (struct sim_snap){now, db};
        d->hist_pos = (d->hist_pos + 1) % SIM_HIST;
    }
    sim_unlock(&s->table_mu);
}

static uint64_t fnv1a(const char *s, int dev, uint64_t seed)
{
    uint64_t h = seed;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ull;
    }
    for (int i = 0; i < 4; i++) {
        h ^= (unsigned char)(dev >> (8 * i));
        h *= 0x100000001b3ull;
    }
    return h;
}

void sim_uuid_bytes(const char *shm_name, int dev, unsigned char out[16])
{
    uint64_t a = fnv1a(shm_name, dev, 0xcbf29ce484222325ull);
    uint64_t b = fnv1a(shm_name, dev, 0x84222325cbf29ce4ull ^ a);
    for (int i = 0; i < 8; i++) {
        out[i] = (unsigned char)(a >> (8 * i));
        out[8 + i] = (unsigned char)(b >> (8 * i));
    }
}

void sim_uuid_string(const char *shm_name, int dev, char *buf, size_t len)
{
    unsigned char u[16];
    sim_uuid_bytes(shm_name, dev, u);
    snprintf(buf, len,
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
}
