/*
 * reserve_client - one client of bench/reserve_bench.py, in C so that the
 * 64 clients sharing two cores with vgpud cost next to nothing and the
 * figure is the daemon's, not the load generator's (64 Python clients took
 * most of both cores and added their own wake-up delays).
 *
 *   reserve_client FD START_NS SECONDS RATE SEED OUT RESERVE_HEX RELEASE_HEX
 *
 * FD is a connection to vgpud on which the harness already did hello and
 * attach (the process exec'd itself into this program, so the daemon's
 * SO_PEERCRED view of it is unchanged). From START_NS (CLOCK_MONOTONIC) for
 * SECONDS: send the RESERVE frame (with the RELEASE of the previous grant in
 * the same write, as the hook batches them), read one reply frame, record
 * the times. RATE > 0: one reservation every 1/RATE s on a fixed schedule
 * whose phase SEED spreads; RATE 0: closed loop. Frames are given in hex,
 * encoded by the harness with the project's own encoder.
 *
 * OUT gets: int64 denied, int64 count, then count int64 latencies from the
 * scheduled send time, then count int64 round trips from the actual send
 * (ns). Exit 0 on success, 1 on any socket error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME 4096

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

static void sleep_until(int64_t t)
{
    struct timespec ts = {.tv_sec = t / 1000000000ll, .tv_nsec = t % 1000000000ll};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static size_t unhex(const char *s, unsigned char *out, size_t cap)
{
    size_t n = strlen(s) / 2;
    if (n > cap)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1)
            return 0;
        out[i] = (unsigned char)v;
    }
    return n;
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* One length-prefixed frame into buf (the body); returns its length or -1. */
static ssize_t read_frame(int fd, unsigned char *buf, size_t cap)
{
    unsigned char hdr[4];
    size_t got = 0;
    while (got < 4) {
        ssize_t r = read(fd, hdr + got, 4 - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    size_t n = ((size_t)hdr[0] << 24) | ((size_t)hdr[1] << 16) | ((size_t)hdr[2] << 8) | hdr[3];
    if (n > cap)
        return -1;
    got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return (ssize_t)n;
}

int main(int argc, char **argv)
{
    if (argc != 9) {
        fprintf(stderr, "usage: reserve_client FD START_NS SECONDS RATE SEED OUT RESERVE_HEX RELEASE_HEX\n");
        return 2;
    }
    int fd = atoi(argv[1]);
    int64_t start = strtoll(argv[2], NULL, 10);
    double seconds = atof(argv[3]);
    double rate = atof(argv[4]);
    unsigned seed = (unsigned)strtoul(argv[5], NULL, 10);
    const char *out = argv[6];
    unsigned char reserve[256], release[256], both[512], reply[MAX_FRAME];
    size_t nres = unhex(argv[7], reserve, sizeof reserve);
    size_t nrel = unhex(argv[8], release, sizeof release);
    if (!nres || !nrel || seconds <= 0 || rate < 0)
        return 2;
    memcpy(both, release, nrel);
    memcpy(both + nrel, reserve, nres);
    /* The default 50 us timer slack would be the largest error here. */
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);

    int64_t end = start + (int64_t)(seconds * 1e9);
    int64_t period = rate > 0 ? (int64_t)(1e9 / rate) : 0;
    size_t cap = period ? (size_t)(seconds * rate) + 16 : 1u << 22;
    int64_t *lat = calloc(cap, sizeof *lat), *rtt = calloc(cap, sizeof *rtt);
    if (!lat || !rtt)
        return 1;
    srand(seed);
    int64_t next = start + (period ? (int64_t)((double)rand() / RAND_MAX * (double)period) : 0);
    int64_t denied = 0;
    size_t count = 0;
    int holding = 0;
    sleep_until(start);
    while (count < cap) {
        int64_t sched;
        if (period) {
            if (next >= end)
                break;
            sleep_until(next);
            sched = next;
            next += period;
        } else {
            sched = now_ns();
            if (sched >= end)
                break;
        }
        int64_t t0 = now_ns();
        if (holding ? write_all(fd, both, nrel + nres) : write_all(fd, reserve, nres))
            return 1;
        ssize_t n = read_frame(fd, reply, sizeof reply);
        int64_t t1 = now_ns();
        if (n < 0)
            return 1;
        holding = memmem(reply, (size_t)n, "granted", 7) != NULL;
        denied += !holding;
        lat[count] = t1 - sched;
        rtt[count] = t1 - t0;
        count++;
    }
    if (holding && write_all(fd, release, nrel))
        return 1;
    FILE *f = fopen(out, "wb");
    if (!f)
        return 1;
    int64_t hdr[2] = {denied, (int64_t)count};
    int ok = fwrite(hdr, sizeof hdr, 1, f) == 1 && fwrite(lat, sizeof *lat, count, f) == count &&
             fwrite(rtt, sizeof *rtt, count, f) == count;
    return fclose(f) == 0 && ok ? 0 : 1;
}
