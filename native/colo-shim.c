/*
 * colo-shim.c - LD_PRELOAD work-arounds that let a stock QEMU 7.2
 * (qemu-system-x86_64, TCG accelerator) run COLO in the colo-receiver test
 * harness.  Part of colo-receiver (MIT).  It only wraps libc functions and
 * calls a few functions that the QEMU executable exports; it contains no QEMU
 * code.
 *
 * Switches (environment variables, read once):
 *
 *   always on       "unheld condition wait" fix.  Under TCG the COLO thread
 *                   of the primary syncs the dirty bitmap without holding the
 *                   big QEMU lock; that path waits on a condition variable
 *                   with the lock as mutex although the thread does not own
 *                   it.  glibc then releases a lock that belongs to another
 *                   thread and re-acquires it for the caller, which later
 *                   deadlocks on itself (after checkpoint 1).  The same path
 *                   kicks the vCPU without the lock, so the wake-up can be
 *                   lost (hang after ~80 checkpoints).
 *                   Here a pthread_cond_wait() whose caller does not own the
 *                   mutex is turned into: take the mutex, kick every vCPU
 *                   (qemu_cpu_kick, now under the lock), wait at most 1 ms,
 *                   drop the mutex, return 0.  That is a legal spurious
 *                   wake-up: QEMU's caller re-checks its condition in a loop.
 *
 *   COLO_SHIM_TLBFLUSH=1
 *                   TCG notices guest writes for dirty logging only through
 *                   "not dirty" TLB entries; 7.2's bitmap sync clears dirty
 *                   bits without resetting those entries, so some writes are
 *                   never re-sent and the secondary's copy goes stale.  Here
 *                   a vCPU thread (QEMU's TLS current_cpu set) flushes its
 *                   TLB (exported tlb_flush()) every time it returns from a
 *                   condition wait, which it does whenever the VM is resumed
 *                   after a checkpoint, before any guest code runs.
 *                   Use on the primary.
 *
 *   COLO_SHIM_NODELAY=1
 *                   TCP_NODELAY on every TCP socket QEMU connects or accepts
 *                   (7.2 sets it only on multifd send channels; the COLO
 *                   replies otherwise wait for delayed ACKs, ~40 ms each).
 *
 *   COLO_SHIM_MFD_CACHE=1 with COLO_SHIM_RAM_BYTES=<bytes> (or
 *   COLO_SHIM_RAM_MIB=<MiB>)
 *                   For QEMU's own 7.2 *secondary* with multifd (compression
 *                   none only): 7.2 writes multifd pages straight into guest
 *                   RAM instead of the COLO cache.  Emulated fix:
 *                   - guest RAM and the COLO cache are recognised as the
 *                     first and second writable MAP_FIXED anonymous mapping of
 *                     exactly the guest RAM size (the "pc.ram" block);
 *                   - before COLO starts (initial migration), every multifd
 *                     recvmsg() into guest RAM is copied into the cache too;
 *                   - once the secondary has sent CHECKPOINT_READY, recvmsg()
 *                     buffers that point into guest RAM are redirected into
 *                     the cache and the pages are marked in a page bitmap;
 *                   - right after the secondary has sent VMSTATE_RECEIVED
 *                     (the point where QEMU flushes its cache), the marked
 *                     pages are copied cache -> guest RAM.
 *
 *   COLO_SHIM_VERBOSE=1   log every fix, not just the first.
 *
 * Build: gcc -O2 -shared -fPIC -o colo-shim.so colo-shim.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define SHIM "colo-shim"
#define PAGE 4096UL
#define MAX_KICK_CPUS 256

/* ------------------------------------------------------------------ */
/* configuration                                                       */

static struct {
    pthread_once_t once;
    int tlbflush;
    int nodelay;
    int mfd_cache;
    int verbose;
    size_t ram_bytes;
} cfg = { PTHREAD_ONCE_INIT, 0, 0, 0, 0, 0 };

/* QEMU functions (exported by the executable), resolved lazily */
typedef void (*qemu_cpu_fn)(void *cpu);
typedef void *(*qemu_get_cpu_fn)(int index);
static qemu_cpu_fn q_tlb_flush, q_cpu_kick;
static qemu_get_cpu_fn q_get_cpu;

/* counters, reported at exit */
static unsigned long n_unheld, n_tlb, n_nodelay;
static unsigned long b_mirror, b_redirect, b_flush;

static int env_flag(const char *name)
{
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

static void read_config(void)
{
    cfg.verbose = env_flag("COLO_SHIM_VERBOSE");
    cfg.nodelay = env_flag("COLO_SHIM_NODELAY");
    if (env_flag("COLO_SHIM_TLBFLUSH")) {
        q_tlb_flush = (qemu_cpu_fn)dlsym(RTLD_DEFAULT, "tlb_flush");
        if (q_tlb_flush) {
            cfg.tlbflush = 1;
        } else {
            fprintf(stderr, SHIM ": tlb_flush is not exported by this binary; "
                    "COLO_SHIM_TLBFLUSH ignored\n");
        }
    }
    if (env_flag("COLO_SHIM_MFD_CACHE")) {
        const char *b = getenv("COLO_SHIM_RAM_BYTES");
        const char *m = getenv("COLO_SHIM_RAM_MIB");
        if (b && *b) {
            cfg.ram_bytes = (size_t)strtoull(b, NULL, 0);
        } else if (m && *m) {
            cfg.ram_bytes = (size_t)strtoull(m, NULL, 0) << 20;
        }
        if (cfg.ram_bytes >= PAGE && cfg.ram_bytes % PAGE == 0) {
            cfg.mfd_cache = 1;
        } else {
            fprintf(stderr, SHIM ": COLO_SHIM_MFD_CACHE needs COLO_SHIM_RAM_BYTES "
                    "or COLO_SHIM_RAM_MIB (guest RAM size); ignored\n");
        }
    }
}

static inline void config(void)
{
    pthread_once(&cfg.once, read_config);
}

/* dlsym(RTLD_NEXT) with an optional preferred symbol version */
static void *next_sym(const char *name, const char *version)
{
    void *p = NULL;
    if (version) {
        p = dlvsym(RTLD_NEXT, name, version);
    }
    if (!p) {
        p = dlsym(RTLD_NEXT, name);
    }
    if (!p) {
        fprintf(stderr, SHIM ": cannot resolve %s\n", name);
        abort();
    }
    return p;
}

#define REAL(var, name, version)                                   \
    do {                                                           \
        if (!(var)) {                                              \
            __typeof__(var) p_ = next_sym((name), (version));      \
            __atomic_store_n(&(var), p_, __ATOMIC_RELEASE);        \
        }                                                          \
    } while (0)

/* ------------------------------------------------------------------ */
/* 1 + 2: unheld condition waits, TLB flush on vCPU wake-up            */

typedef int (*cond_wait_t)(pthread_cond_t *, pthread_mutex_t *);
typedef int (*cond_timedwait_t)(pthread_cond_t *, pthread_mutex_t *,
                                const struct timespec *);
static cond_wait_t real_cond_wait;
static cond_timedwait_t real_cond_timedwait;

static __thread int t_tid;
static __thread int t_cpu_resolved;
static __thread void **t_current_cpu;   /* this thread's QEMU current_cpu */

static int my_tid(void)
{
    if (!t_tid) {
        t_tid = (int)syscall(SYS_gettid);
    }
    return t_tid;
}

static void kick_all_vcpus(void)
{
    int i;

    if (!q_get_cpu) {
        q_cpu_kick = (qemu_cpu_fn)dlsym(RTLD_DEFAULT, "qemu_cpu_kick");
        q_get_cpu = (qemu_get_cpu_fn)dlsym(RTLD_DEFAULT, "qemu_get_cpu");
    }
    if (!q_get_cpu || !q_cpu_kick) {
        return;
    }
    for (i = 0; i < MAX_KICK_CPUS; i++) {
        void *cpu = q_get_cpu(i);
        if (!cpu) {
            break;
        }
        q_cpu_kick(cpu);
    }
}

static int unheld_wait(pthread_cond_t *c, pthread_mutex_t *m)
{
    struct timespec until;
    unsigned long n = __atomic_add_fetch(&n_unheld, 1, __ATOMIC_RELAXED);

    if (n == 1 || cfg.verbose) {
        fprintf(stderr, SHIM ": thread %d waits on a mutex it does not own "
                "(#%lu); waiting with the mutex taken instead\n", my_tid(), n);
    }
    pthread_mutex_lock(m);
    kick_all_vcpus();
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec += 1;
        until.tv_nsec -= 1000000000L;
    }
    real_cond_timedwait(c, m, &until);
    pthread_mutex_unlock(m);
    return 0;
}

static void vcpu_tlb_flush(void)
{
    if (!t_cpu_resolved) {
        /* dlsym of a TLS symbol yields the calling thread's instance */
        t_current_cpu = (void **)dlsym(RTLD_DEFAULT, "current_cpu");
        t_cpu_resolved = 1;
    }
    if (t_current_cpu && *t_current_cpu) {
        q_tlb_flush(*t_current_cpu);
        __atomic_add_fetch(&n_tlb, 1, __ATOMIC_RELAXED);
    }
}

int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
{
    int r;

    REAL(real_cond_wait, "pthread_cond_wait", "GLIBC_2.3.2");
    REAL(real_cond_timedwait, "pthread_cond_timedwait", "GLIBC_2.3.2");
    config();
    if (m->__data.__owner != my_tid()) {
        return unheld_wait(c, m);
    }
    r = real_cond_wait(c, m);
    if (cfg.tlbflush) {
        vcpu_tlb_flush();
    }
    return r;
}

/* ------------------------------------------------------------------ */
/* 3: TCP_NODELAY                                                      */

static int is_tcp_socket(int fd)
{
    int type = 0;
    socklen_t tl = sizeof(type);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);

    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) != 0 || type != SOCK_STREAM) {
        return 0;
    }
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) {
        return 0;
    }
    return ss.ss_family == AF_INET || ss.ss_family == AF_INET6;
}

static void nodelay(int fd)
{
    int one = 1, saved = errno;

    if (is_tcp_socket(fd) &&
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0) {
        __atomic_add_fetch(&n_nodelay, 1, __ATOMIC_RELAXED);
    }
    errno = saved;
}

typedef int (*connect_t)(int, const struct sockaddr *, socklen_t);
typedef int (*accept_t)(int, struct sockaddr *, socklen_t *);
typedef int (*accept4_t)(int, struct sockaddr *, socklen_t *, int);
static connect_t real_connect;
static accept_t real_accept;
static accept4_t real_accept4;

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    int r;

    REAL(real_connect, "connect", NULL);
    config();
    r = real_connect(fd, addr, len);
    if (cfg.nodelay && (r == 0 || errno == EINPROGRESS)) {
        nodelay(fd);
    }
    return r;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    int r;

    REAL(real_accept, "accept", NULL);
    config();
    r = real_accept(fd, addr, len);
    if (cfg.nodelay && r >= 0) {
        nodelay(r);
    }
    return r;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    int r;

    REAL(real_accept4, "accept4", NULL);
    config();
    r = real_accept4(fd, addr, len, flags);
    if (cfg.nodelay && r >= 0) {
        nodelay(r);
    }
    return r;
}

/* ------------------------------------------------------------------ */
/* 4: multifd pages -> COLO cache on QEMU's 7.2 secondary              */

typedef void *(*mmap_t)(void *, size_t, int, int, int, off_t);
typedef ssize_t (*recvmsg_t)(int, struct msghdr *, int);
typedef ssize_t (*sendmsg_t)(int, const struct msghdr *, int);
static mmap_t real_mmap, real_mmap64;
static recvmsg_t real_recvmsg;
static sendmsg_t real_sendmsg;

static char *ram_base;        /* guest RAM ("pc.ram") */
static char *cache_base;      /* COLO cache of the same block */
static uint64_t *pending;     /* one bit per page received into the cache */
static size_t pending_words;
static int colo_active;       /* secondary has sent CHECKPOINT_READY */

enum { MSG_CHECKPOINT_READY = 0, MSG_VMSTATE_RECEIVED = 5 };

static void note_mapping(void *p, size_t len, int prot, int flags)
{
    if (p == MAP_FAILED || !(flags & MAP_FIXED) || !(flags & MAP_ANONYMOUS) ||
        !(prot & PROT_WRITE) || len < PAGE) {
        return;
    }
    config();
    if (!cfg.mfd_cache || len != cfg.ram_bytes) {
        return;
    }
    if (!__atomic_load_n(&ram_base, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(&ram_base, (char *)p, __ATOMIC_RELEASE);
    } else if (!__atomic_load_n(&cache_base, __ATOMIC_ACQUIRE) && (char *)p != ram_base) {
        pending_words = (len / PAGE + 63) / 64;
        pending = calloc(pending_words, sizeof(*pending));
        if (!pending) {
            fprintf(stderr, SHIM ": out of memory for the page bitmap\n");
            abort();
        }
        __atomic_store_n(&cache_base, (char *)p, __ATOMIC_RELEASE);
        fprintf(stderr, SHIM ": multifd->COLO cache redirect armed: guest RAM %p, "
                "cache %p, %zu bytes\n", (void *)ram_base, p, len);
    }
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    void *p;

    REAL(real_mmap, "mmap", NULL);
    p = real_mmap(addr, len, prot, flags, fd, off);
    note_mapping(p, len, prot, flags);
    return p;
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    void *p;

    REAL(real_mmap64, "mmap64", NULL);
    p = real_mmap64(addr, len, prot, flags, fd, off);
    note_mapping(p, len, prot, flags);
    return p;
}

static inline int in_ram(const void *p)
{
    const char *c = p;
    return c >= ram_base && c < ram_base + cfg.ram_bytes;
}

static void mark_pages(size_t off, size_t len)
{
    size_t pg, last;

    if (!len) {
        return;
    }
    last = (off + len - 1) / PAGE;
    for (pg = off / PAGE; pg <= last; pg++) {
        __atomic_fetch_or(&pending[pg / 64], 1ULL << (pg % 64), __ATOMIC_RELAXED);
    }
}

/* copy every marked page cache -> guest RAM, coalescing runs */
static void flush_pending(void)
{
    size_t w, run_start = 0, run_len = 0, total = 0;

    for (w = 0; w < pending_words; w++) {
        uint64_t bits = __atomic_exchange_n(&pending[w], 0, __ATOMIC_ACQ_REL);
        while (bits) {
            size_t pg = w * 64 + (size_t)__builtin_ctzll(bits);
            bits &= bits - 1;
            if (run_len && run_start + run_len == pg) {
                run_len++;
                continue;
            }
            if (run_len) {
                memcpy(ram_base + run_start * PAGE, cache_base + run_start * PAGE, run_len * PAGE);
                total += run_len;
            }
            run_start = pg;
            run_len = 1;
        }
    }
    if (run_len) {
        memcpy(ram_base + run_start * PAGE, cache_base + run_start * PAGE, run_len * PAGE);
        total += run_len;
    }
    __atomic_add_fetch(&b_flush, total * PAGE, __ATOMIC_RELAXED);
}

ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    struct iovec stack_iov[256], *iov;
    struct msghdr m2;
    size_t i, n;
    ssize_t r, left;
    int touches_ram = 0;

    REAL(real_recvmsg, "recvmsg", NULL);
    config();
    if (!cfg.mfd_cache || !__atomic_load_n(&cache_base, __ATOMIC_ACQUIRE) ||
        (flags & MSG_PEEK) || !msg || !msg->msg_iov) {
        return real_recvmsg(fd, msg, flags);
    }
    n = msg->msg_iovlen;
    for (i = 0; i < n && !touches_ram; i++) {
        touches_ram = in_ram(msg->msg_iov[i].iov_base);
    }
    if (!touches_ram) {
        return real_recvmsg(fd, msg, flags);
    }

    if (!__atomic_load_n(&colo_active, __ATOMIC_ACQUIRE)) {
        /* initial migration: guest RAM as usual, plus a copy in the cache */
        r = real_recvmsg(fd, msg, flags);
        for (i = 0, left = r; i < n && left > 0; i++) {
            char *b = msg->msg_iov[i].iov_base;
            size_t l = msg->msg_iov[i].iov_len;
            if ((size_t)left < l) {
                l = (size_t)left;
            }
            if (in_ram(b)) {
                memcpy(cache_base + (b - ram_base), b, l);
                __atomic_add_fetch(&b_mirror, l, __ATOMIC_RELAXED);
            }
            left -= (ssize_t)l;
        }
        return r;
    }

    /* COLO: receive into the cache, publish to guest RAM at VMSTATE_RECEIVED */
    iov = n <= 256 ? stack_iov : malloc(n * sizeof(*iov));
    if (!iov) {
        errno = ENOMEM;
        return -1;
    }
    for (i = 0; i < n; i++) {
        iov[i] = msg->msg_iov[i];
        if (in_ram(iov[i].iov_base)) {
            iov[i].iov_base = cache_base + ((char *)iov[i].iov_base - ram_base);
        }
    }
    m2 = *msg;
    m2.msg_iov = iov;
    r = real_recvmsg(fd, &m2, flags);
    for (i = 0, left = r; i < n && left > 0; i++) {
        size_t l = iov[i].iov_len;
        if ((size_t)left < l) {
            l = (size_t)left;
        }
        if (in_ram(msg->msg_iov[i].iov_base)) {
            mark_pages((size_t)((char *)msg->msg_iov[i].iov_base - ram_base), l);
            __atomic_add_fetch(&b_redirect, l, __ATOMIC_RELAXED);
        }
        left -= (ssize_t)l;
    }
    msg->msg_flags = m2.msg_flags;
    msg->msg_controllen = m2.msg_controllen;
    if (iov != stack_iov) {
        free(iov);
    }
    return r;
}

/* a COLO message is a lone be32 written on the migration TCP socket */
static int colo_message(int fd, const struct msghdr *msg, uint32_t *value)
{
    unsigned char b[4];
    size_t i, k = 0;

    for (i = 0; i < msg->msg_iovlen; i++) {
        size_t l = msg->msg_iov[i].iov_len;
        if (k + l > 4) {
            return 0;
        }
        memcpy(b + k, msg->msg_iov[i].iov_base, l);
        k += l;
    }
    if (k != 4 || !is_tcp_socket(fd)) {
        return 0;
    }
    *value = ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
    return 1;
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    uint32_t v = UINT32_MAX;
    ssize_t r;
    int saved;

    REAL(real_sendmsg, "sendmsg", NULL);
    config();
    if (cfg.mfd_cache && __atomic_load_n(&cache_base, __ATOMIC_ACQUIRE) && msg && msg->msg_iov &&
        colo_message(fd, msg, &v)) {
        if (v == MSG_CHECKPOINT_READY && !colo_active) {
            __atomic_store_n(&colo_active, 1, __ATOMIC_RELEASE);
            if (cfg.verbose) {
                fprintf(stderr, SHIM ": COLO started, multifd pages now go to the cache\n");
            }
        }
    }
    r = real_sendmsg(fd, msg, flags);
    if (v == MSG_VMSTATE_RECEIVED && colo_active) {
        saved = errno;
        flush_pending();
        errno = saved;
    }
    return r;
}

/* ------------------------------------------------------------------ */

/* read the configuration before QEMU's main() runs (not from inside a wrapper
 * that the dynamic loader or malloc might be executing) */
__attribute__((constructor)) static void shim_init(void)
{
    config();
}

__attribute__((destructor)) static void shim_report(void)
{
    if (n_unheld || cfg.verbose) {
        fprintf(stderr, SHIM ": %lu unheld-mutex waits fixed, %lu vCPU TLB flushes, "
                "%lu sockets NODELAY\n", n_unheld, n_tlb, n_nodelay);
    }
    if (cfg.mfd_cache) {
        fprintf(stderr, SHIM ": multifd bytes mirrored %lu, redirected %lu, flushed %lu\n",
                b_mirror, b_redirect, b_flush);
    }
}
