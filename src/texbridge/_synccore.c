/* texbridge._synccore: the keyed-mutex and seqlock core, the only compiled code in texbridge.
 *
 * Why C: a cross-process handoff must cost about a microsecond and a blocked waiter nothing, which needs C11 atomics
 * on shared memory, a bounded spin and futex waits with absolute CLOCK_MONOTONIC deadlines while the GIL is released.
 *
 * The state is one 4096-byte page of a sealed memfd (layout below, documented in docs/keyed-mutex.md). Every field
 * is touched only under a tiny "meta lock" (a futex word holding the holder's TID), except each waiter slot's
 * futex word and state, which the sleeping waiter polls. Peers are not trusted: every value read from the page is
 * checked before use, so a peer scribbling gives KeyedMutexError (or at worst a wrong but bounded outcome), never
 * a crash or an unbounded hang.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- shared layout ------------------------------------------------------------------------------------------- */

enum { KM_SIZE = 4096, KM_SLOTS = 48, KM_PRIVATE = 2048, KM_VERSION = 1 };
#define KM_MAGIC 0x4D4B4254u /* the bytes "TBKM" */

enum { SLOT_FREE = 0, SLOT_WAITING = 1, SLOT_GRANTED = 2, SLOT_GRANTED_ABANDONED = 3 };

typedef _Atomic uint32_t a32;
typedef _Atomic int32_t ai32;
typedef _Atomic uint64_t a64;

typedef struct { /* one queued waiter (40 bytes) */
    a32 word;     /* futex word: bumped on every grant, the waiter sleeps on it */
    a32 state;    /* SLOT_* */
    a64 key;      /* the key waited for */
    a64 start;    /* waiter's process start time (pid-reuse guard) */
    ai32 pid;
    a32 session;
    a32 token;
    a32 ticket;   /* arrival order; compared by age (next_ticket - ticket) so it may wrap */
} km_slot;

typedef struct {
    a32 magic, version;
    a32 meta;          /* meta lock: TID of the holder, 0 = free */
    a32 meta_waiters;  /* threads sleeping on `meta` (only a wake hint) */
    a32 locked;        /* 1 = owned */
    a32 abandoned;     /* 1 = free, but the last owner died: the next acquire (any key) gets it, abandoned */
    a64 key;
    ai32 owner_pid;
    a32 owner_session, owner_token;
    a32 owner_slot;    /* 1 + slot index of the grant that made the owner (0: took it directly) */
    a64 owner_start;
    a64 sync_value;    /* written on release, returned by acquire */
    a32 private_len, next_ticket;
    a64 acquisitions, contended, abandoned_count;
    a32 meta_steals, nslots, private_cap, reserved0;
    uint8_t reserved[16];
    km_slot slots[KM_SLOTS];
    uint8_t private_data[KM_PRIVATE];
} km_state;

_Static_assert(sizeof(km_slot) == 40, "slot layout");
_Static_assert(offsetof(km_state, slots) == 128, "header layout");
_Static_assert(offsetof(km_state, private_data) == 2048, "private data offset");
_Static_assert(sizeof(km_state) == KM_SIZE, "one page");

/* Relaxed access for fields guarded by the meta lock (its CAS/store give the ordering). */
#define LD(f) atomic_load_explicit(&(f), memory_order_relaxed)
#define ST(f, v) atomic_store_explicit(&(f), (v), memory_order_relaxed)

#define NS 1000000000ull
#define SLICE_NS 20000000ull      /* waiters wake at least this often: liveness checks, Ctrl-C */
#define MARGIN_NS 120000ull       /* the last stretch before a deadline is spun, not slept: precise timeouts */
#define SPIN_MIN_NS 1000ull
#define SPIN_MAX_NS 50000ull
#define META_STUCK_NS (2 * NS)    /* a meta lock held this long by a live thread means a scribbled word */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS + (uint64_t)ts.tv_nsec;
}

static long futex_wait_abs(a32 *w, uint32_t val, uint64_t deadline_ns) {
    struct timespec ts = {(time_t)(deadline_ns / NS), (long)(deadline_ns % NS)};
    /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC time; no PRIVATE flag: the word is shared. */
    return syscall(SYS_futex, w, FUTEX_WAIT_BITSET, val, &ts, NULL, FUTEX_BITSET_MATCH_ANY);
}

static void futex_wake(a32 *w) { syscall(SYS_futex, w, FUTEX_WAKE, INT_MAX, NULL, NULL, 0); }

/* ---- process identity and liveness ---------------------------------------------------------------------------- */

static pid_t g_pid;
static uint64_t g_start;
static _Thread_local uint32_t t_tid;
static _Atomic uint32_t g_next_token = 1;
static int g_spin = 1; /* spinning is useless on one CPU */

static void after_fork_child(void) { g_pid = 0; g_start = 0; t_tid = 0; }

/* /proc/<pid>/stat: 0 no such process, 1 read (state char, start time = field 22), 2 unknown (unreadable). */
static int proc_stat(pid_t pid, char *state, uint64_t *start) {
    char path[48], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return (errno == ENOENT || errno == ESRCH) ? 0 : 2;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return n == 0 ? 0 : 2;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may contain anything, so parse from the last ')' */
    if (!p || p[1] != ' ') return 2;
    p += 2;
    *state = *p;
    for (int i = 0; i < 19 && p; i++) { /* field 3 (state) -> field 22 (starttime) */
        p = strchr(p, ' ');
        if (p) p++;
    }
    if (!p) return 2;
    *start = strtoull(p, NULL, 10);
    return 1;
}

static pid_t my_pid(void) {
    if (!g_pid) g_pid = getpid();
    return g_pid;
}

static uint64_t my_start(void) {
    if (!g_start) {
        char s;
        uint64_t v = 0;
        if (proc_stat(my_pid(), &s, &v) != 1) v = 0;
        g_start = v;
    }
    return g_start;
}

static uint32_t my_tid(void) {
    if (!t_tid) t_tid = (uint32_t)syscall(SYS_gettid);
    return t_tid;
}

/* Alive = exists, is not a zombie, and (when known) started when the record says: defeats pid reuse. An unreadable
 * /proc entry counts as alive. The same rule as texbridge/_liveness.py's alive(), the Python home of this question
 * (this copy stays in C: the core must not call Python); change both together. */
static int proc_alive(int32_t pid, uint64_t start) {
    if (pid <= 0) return 0;
    if (kill(pid, 0) != 0 && errno == ESRCH) return 0;
    char st = 0;
    uint64_t s = 0;
    int r = proc_stat(pid, &st, &s);
    if (r == 0) return 0;
    if (r == 2) return 1;
    if (st == 'Z' || st == 'X' || st == 'x') return 0;
    return start == 0 || s == start;
}

/* A meta-lock holder (a thread id) is dead once it is gone or a zombie: a process killed while holding the lock but
 * not yet reaped by its parent still answers kill(tid, 0), and waiting for a reap could take forever. A zombie
 * thread-group leader runs no code, so it cannot be holding the lock in earnest. */
static int tid_dead(uint32_t tid) {
    if (kill((pid_t)tid, 0) != 0 && errno == ESRCH) return 1;
    char st = 0;
    uint64_t s = 0;
    int r = proc_stat((pid_t)tid, &st, &s);
    return r == 0 || (r == 1 && (st == 'Z' || st == 'X' || st == 'x'));
}

/* ---- meta lock ------------------------------------------------------------------------------------------------ */

enum { KR_OK, KR_ABANDONED, KR_TIMEOUT, KR_CORRUPT, KR_RECURSIVE, KR_NOT_OWNER, KR_STUCK, KR_ENQUEUED, KR_FULL,
       KR_INTERRUPTED };

/* 0: taken; 1: taken from a dead holder (state suspect); -1: held by a live thread for too long (scribbled). */
static int meta_lock(km_state *st) {
    uint32_t me = my_tid(), z = 0;
    if (atomic_compare_exchange_strong(&st->meta, &z, me)) return 0;
    for (int i = 0; i < 256; i++) {
        cpu_relax();
        z = 0;
        if (LD(st->meta) == 0 && atomic_compare_exchange_strong(&st->meta, &z, me)) return 0;
    }
    uint32_t last = 0;
    uint64_t since = mono_ns();
    for (;;) {
        uint32_t h = atomic_load(&st->meta);
        if (h == 0) {
            z = 0;
            if (atomic_compare_exchange_strong(&st->meta, &z, me)) return 0;
            continue;
        }
        uint64_t now = mono_ns();
        if (h != last) { last = h; since = now; }
        if (h == me || h > (uint32_t)INT_MAX) return -1; /* we never hold it here: scribbled */
        if (tid_dead(h)) {
            if (atomic_compare_exchange_strong(&st->meta, &h, me)) {
                ST(st->meta_steals, LD(st->meta_steals) + 1);
                /* The holder died between two stores. The only half-done step header_ok() would call corrupt is
                 * taking over an abandoned mutex (locked = 1 stored, abandoned = 0 not yet): finish it; the recorded
                 * owner is then checked for liveness like any other. */
                if (LD(st->locked) == 1 && LD(st->abandoned) == 1) ST(st->abandoned, 0);
                return 1;
            }
            continue;
        }
        if (now - since > META_STUCK_NS) return -1;
        atomic_fetch_add(&st->meta_waiters, 1);
        futex_wait_abs(&st->meta, h, now + 1000000);
        atomic_fetch_sub(&st->meta_waiters, 1);
    }
}

/* meta_lock for a caller that must never block on memory a peer can write (the broker): a bounded spin (with
 * yields) and a steal from a dead holder, never a sleep. 0/1 as meta_lock; -1: busy, the caller gives up. */
static int meta_trylock(km_state *st) {
    uint32_t me = my_tid();
    for (int i = 0; i < 2048; i++) {
        uint32_t z = 0;
        if (atomic_compare_exchange_strong(&st->meta, &z, me)) return 0;
        uint32_t h = z;
        if (h == me || h > (uint32_t)INT_MAX) return -1; /* scribbled */
        if (i >= 256 && (i & 63) == 0 && kill((pid_t)h, 0) != 0 && errno == ESRCH) {
            if (atomic_compare_exchange_strong(&st->meta, &h, me)) {
                ST(st->meta_steals, LD(st->meta_steals) + 1);
                return 1;
            }
        }
        if (i < 256) cpu_relax();
        else sched_yield();
    }
    return -1;
}

static void meta_unlock(km_state *st) {
    atomic_store(&st->meta, 0);
    if (atomic_load(&st->meta_waiters)) futex_wake(&st->meta);
}

/* ---- state logic (all *_locked functions run under the meta lock) ---------------------------------------------- */

static int header_ok(km_state *st) {
    uint32_t locked = LD(st->locked), ab = LD(st->abandoned);
    if (LD(st->magic) != KM_MAGIC || LD(st->version) != KM_VERSION || LD(st->nslots) != KM_SLOTS ||
        LD(st->private_cap) != KM_PRIVATE || locked > 1 || ab > 1 || (locked && ab) ||
        LD(st->private_len) > KM_PRIVATE || LD(st->owner_slot) > KM_SLOTS)
        return 0;
    if (locked && LD(st->owner_pid) <= 0) return 0;
    return 1;
}

static int slots_ok(km_state *st) {
    for (int i = 0; i < KM_SLOTS; i++) {
        uint32_t s = atomic_load(&st->slots[i].state);
        if (s > SLOT_GRANTED_ABANDONED || (s != SLOT_FREE && LD(st->slots[i].pid) <= 0)) return 0;
    }
    return 1;
}

/* The earliest WAITING slot, for `key` or (any_key) for any key; -1 if none. */
static int earliest_locked(km_state *st, int any_key, uint64_t key) {
    uint32_t next = LD(st->next_ticket), best_age = 0;
    int best = -1;
    for (int i = 0; i < KM_SLOTS; i++) {
        km_slot *s = &st->slots[i];
        if (atomic_load(&s->state) != SLOT_WAITING || (!any_key && LD(s->key) != key)) continue;
        uint32_t age = next - LD(s->ticket);
        if (best < 0 || age > best_age) { best = i; best_age = age; }
    }
    return best;
}

static void clear_owner_locked(km_state *st) {
    ST(st->locked, 0);
    ST(st->owner_pid, 0);
    ST(st->owner_session, 0);
    ST(st->owner_token, 0);
    ST(st->owner_start, 0);
    ST(st->owner_slot, 0);
}

/* Hand ownership straight to slot i (no barging: nobody can take it in between). Returns i, to wake. */
static int grant_locked(km_state *st, int i, uint32_t how) {
    km_slot *s = &st->slots[i];
    ST(st->owner_pid, LD(s->pid));
    ST(st->owner_session, LD(s->session));
    ST(st->owner_token, LD(s->token));
    ST(st->owner_start, LD(s->start));
    ST(st->owner_slot, (uint32_t)i + 1);
    ST(st->locked, 1);
    ST(st->abandoned, 0);
    ST(st->acquisitions, LD(st->acquisitions) + 1);
    atomic_store(&s->state, how);
    atomic_fetch_add(&s->word, 1);
    return i;
}

/* Set the key and pass the mutex to the earliest waiter for it, else free it. Returns the slot to wake or -1. */
static int release_locked(km_state *st, uint64_t key) {
    ST(st->key, key);
    int i = earliest_locked(st, 0, key);
    if (i >= 0) return grant_locked(st, i, SLOT_GRANTED);
    clear_owner_locked(st);
    return -1;
}

/* The owner is gone while holding it: the earliest live waiter (any key) gets it abandoned, else it is marked
 * abandoned-free for the next acquirer. */
static int pass_abandoned_locked(km_state *st, int count) {
    if (count) ST(st->abandoned_count, LD(st->abandoned_count) + 1);
    for (;;) {
        int i = earliest_locked(st, 1, 0);
        if (i < 0) break;
        km_slot *s = &st->slots[i];
        if (proc_alive(LD(s->pid), LD(s->start))) return grant_locked(st, i, SLOT_GRANTED_ABANDONED);
        atomic_store(&s->state, SLOT_FREE); /* a waiter that died waiting: reap it */
    }
    clear_owner_locked(st);
    ST(st->abandoned, 1);
    return -1;
}

static int slot_is_owner_grant(km_state *st, km_slot *s, uint32_t how) {
    return atomic_load(&s->state) == how && LD(s->pid) == LD(st->owner_pid) &&
           LD(s->token) == LD(st->owner_token) && LD(s->session) == LD(st->owner_session);
}

/* The recorded owner is dead. If it died before even seeing its grant it never touched the data: pass the mutex on
 * normally with the same key. Otherwise the data may be half-written: abandon. */
static int owner_dead_locked(km_state *st) {
    uint32_t os = LD(st->owner_slot);
    if (os >= 1 && os <= KM_SLOTS && slot_is_owner_grant(st, &st->slots[os - 1], SLOT_GRANTED)) {
        atomic_store(&st->slots[os - 1].state, SLOT_FREE);
        return release_locked(st, LD(st->key));
    }
    if (os >= 1 && os <= KM_SLOTS && slot_is_owner_grant(st, &st->slots[os - 1], SLOT_GRANTED_ABANDONED)) {
        atomic_store(&st->slots[os - 1].state, SLOT_FREE); /* already abandoned once: pass it on, count once */
        return pass_abandoned_locked(st, 0);
    }
    return pass_abandoned_locked(st, 1);
}

/* Self-healing after a meta-lock steal or a lost grant: a free mutex must not have a waiter that could take it. */
static int reconcile_locked(km_state *st) {
    if (LD(st->locked)) return -1;
    if (LD(st->abandoned)) {
        int i = earliest_locked(st, 1, 0);
        return i >= 0 ? grant_locked(st, i, SLOT_GRANTED_ABANDONED) : -1;
    }
    int i = earliest_locked(st, 0, LD(st->key));
    return i >= 0 ? grant_locked(st, i, SLOT_GRANTED) : -1;
}

static void wake_slot(km_state *st, int i) {
    if (i >= 0) futex_wake(&st->slots[i].word);
}

/* Check the owner's liveness without the meta lock (it costs syscalls); act under it if it is dead.
 * Returns 1 if the owner was dead and has been dealt with, 0 if alive or free, -1 if the meta lock is stuck. */
static int check_owner(km_state *st) {
    if (!LD(st->locked)) return 0;
    int32_t pid = LD(st->owner_pid);
    uint64_t start = LD(st->owner_start);
    uint32_t tok = LD(st->owner_token), ses = LD(st->owner_session);
    if (proc_alive(pid, start)) return 0;
    if (meta_lock(st) < 0) return -1;
    int wake = -1, acted = 0;
    if (LD(st->locked) && LD(st->owner_pid) == pid && LD(st->owner_start) == start &&
        LD(st->owner_token) == tok && LD(st->owner_session) == ses && header_ok(st)) {
        wake = owner_dead_locked(st);
        acted = 1;
    }
    meta_unlock(st);
    wake_slot(st, wake);
    return acted;
}

/* ---- the Core object: one opened mutex in this process ------------------------------------------------------- */

static PyObject *E_Error, *E_Timeout, *E_Abandoned, *E_Closed;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    km_state *st;     /* NULL once closed */
    uint32_t session, token;
    int busy;         /* calls in flight (they may have released the GIL): close() must wait for them */
    int broken;       /* the shared state was found corrupted: fail fast from then on (a scribbled meta lock
                         would otherwise cost its 2 s stuck detection on every call) */
    uint64_t spin_ns; /* adaptive spin budget */
} Core;

static int is_owner(Core *c) {
    km_state *st = c->st;
    if (!(LD(st->locked) && LD(st->owner_pid) == my_pid() && LD(st->owner_token) == c->token &&
          LD(st->owner_session) == c->session && LD(st->owner_start) == my_start()))
        return 0;
    /* Granted to one of our threads that has not woken yet: that thread, not this call, becomes the owner. */
    uint32_t os = LD(st->owner_slot);
    if (os >= 1 && os <= KM_SLOTS) {
        uint32_t s = atomic_load(&st->slots[os - 1].state);
        if ((s == SLOT_GRANTED || s == SLOT_GRANTED_ABANDONED) && slot_is_owner_grant(st, &st->slots[os - 1], s))
            return 0;
    }
    return 1;
}

static int slot_mine(Core *c, km_slot *s) {
    return LD(s->pid) == my_pid() && LD(s->token) == c->token && LD(s->session) == c->session;
}

static void take_locked(Core *c) {
    km_state *st = c->st;
    ST(st->owner_pid, my_pid());
    ST(st->owner_session, c->session);
    ST(st->owner_token, c->token);
    ST(st->owner_start, my_start());
    ST(st->owner_slot, 0);
    ST(st->locked, 1);
    ST(st->abandoned, 0);
    ST(st->acquisitions, LD(st->acquisitions) + 1);
}

/* Under the meta lock: take it if free with our key (or abandoned-free), else queue a waiter slot. */
static int try_acquire(Core *c, uint64_t key, int may_enqueue, int *slot_out, uint64_t *sync) {
    km_state *st = c->st;
    int wake = -1, r;
    int m = meta_lock(st);
    if (m < 0) return KR_STUCK;
    if (!header_ok(st) || (m == 1 && !slots_ok(st))) { r = KR_CORRUPT; goto out; }
    if (m == 1) wake = reconcile_locked(st);
    if (!LD(st->locked) && (LD(st->abandoned) || LD(st->key) == key)) {
        r = LD(st->abandoned) ? KR_ABANDONED : KR_OK;
        take_locked(c);
        *sync = LD(st->sync_value);
        goto out;
    }
    if (LD(st->locked) && is_owner(c)) { r = KR_RECURSIVE; goto out; }
    if (!may_enqueue) { r = KR_TIMEOUT; goto out; }
    if (!slots_ok(st)) { r = KR_CORRUPT; goto out; }
    int idx = -1;
    for (int pass = 0; pass < 2 && idx < 0; pass++) {
        for (int i = 0; i < KM_SLOTS && idx < 0; i++) {
            km_slot *s = &st->slots[i];
            uint32_t state = atomic_load(&s->state);
            if (state == SLOT_FREE) idx = i;
            else if (pass == 1 && state == SLOT_WAITING && !proc_alive(LD(s->pid), LD(s->start))) {
                atomic_store(&s->state, SLOT_FREE); /* table full: reap waiters that died waiting */
                idx = i;
            }
        }
    }
    if (idx < 0) { r = KR_FULL; goto out; }
    km_slot *s = &st->slots[idx];
    ST(s->key, key);
    ST(s->pid, my_pid());
    ST(s->session, c->session);
    ST(s->token, c->token);
    ST(s->start, my_start());
    uint32_t t = LD(st->next_ticket);
    ST(s->ticket, t);
    ST(st->next_ticket, t + 1);
    ST(st->contended, LD(st->contended) + 1);
    atomic_store(&s->state, SLOT_WAITING);
    *slot_out = idx;
    r = KR_ENQUEUED;
out:
    meta_unlock(st);
    wake_slot(st, wake);
    return r;
}

/* Interrupted while queued: leave no trace. If the grant raced in, pass it on so nobody deadlocks. */
static void cancel_wait(Core *c, int i) {
    km_state *st = c->st;
    km_slot *s = &st->slots[i];
    if (meta_lock(st) < 0) return;
    int wake = -1;
    if (slot_mine(c, s)) {
        uint32_t state = atomic_load(&s->state);
        if (state == SLOT_WAITING) {
            atomic_store(&s->state, SLOT_FREE);
        } else if (state == SLOT_GRANTED) {
            atomic_store(&s->state, SLOT_FREE);
            wake = release_locked(st, LD(st->key)); /* key and sync value unchanged: as if we never came */
        } else if (state == SLOT_GRANTED_ABANDONED) {
            atomic_store(&s->state, SLOT_FREE);
            wake = pass_abandoned_locked(st, 0);
        }
    }
    meta_unlock(st);
    wake_slot(st, wake);
}

/* Queued in slot i: spin briefly, then sleep on the slot's futex word in slices. Entered and left with the GIL. */
static int wait_slot(Core *c, int i, int has_dl, uint64_t dl, uint64_t *sync) {
    km_state *st = c->st;
    km_slot *s = &st->slots[i];
    uint64_t t0 = mono_ns(), now = t0;
    uint32_t state = atomic_load(&s->state);

    /* Spin (GIL held: bounded by SPIN_MAX_NS, far below the interpreter's switch interval). */
    if (g_spin) {
        uint64_t until = t0 + c->spin_ns;
        if (has_dl && until > dl) until = dl;
        while (state == SLOT_WAITING) {
            for (int k = 0; k < 32 && state == SLOT_WAITING; k++) {
                cpu_relax();
                state = atomic_load(&s->state);
            }
            if (state == SLOT_WAITING && (now = mono_ns()) >= until) break;
        }
    }
    int spun = state != SLOT_WAITING;

    if (state == SLOT_WAITING) {
        PyThreadState *ts = PyEval_SaveThread();
        uint64_t last_check = t0;
        int r = -1;
        for (;;) {
            state = atomic_load(&s->state);
            if (state != SLOT_WAITING) break;
            now = mono_ns();
            if (has_dl && now >= dl) {
                /* Last chance before timing out: a dead owner's mutex may come to us. */
                if (check_owner(st) < 0) { r = KR_STUCK; break; }
                if (meta_lock(st) < 0) { r = KR_STUCK; break; }
                state = atomic_load(&s->state);
                if (state == SLOT_WAITING && slot_mine(c, s)) {
                    atomic_store(&s->state, SLOT_FREE);
                    r = KR_TIMEOUT;
                }
                meta_unlock(st);
                break;
            }
            if (now - last_check >= SLICE_NS) {
                last_check = now;
                if (LD(st->magic) != KM_MAGIC || !slot_mine(c, s) || state > SLOT_GRANTED_ABANDONED) {
                    r = KR_CORRUPT;
                    break;
                }
                if (check_owner(st) < 0) { r = KR_STUCK; break; }
                if (!LD(st->locked)) { /* nothing should be waiting on a free mutex: heal a lost grant */
                    if (meta_lock(st) < 0) { r = KR_STUCK; break; }
                    int wake = header_ok(st) ? reconcile_locked(st) : -1;
                    meta_unlock(st);
                    wake_slot(st, wake);
                }
                PyEval_RestoreThread(ts);
                if (PyErr_CheckSignals()) { cancel_wait(c, i); return KR_INTERRUPTED; }
                ts = PyEval_SaveThread();
                continue;
            }
            uint64_t until = last_check + SLICE_NS;
            if (has_dl) {
                if (dl - now <= MARGIN_NS) { /* precise deadline: spin the last 120 us (timer slack + wake-up latency) */
                    for (int k = 0; k < 64 && atomic_load(&s->state) == SLOT_WAITING; k++) cpu_relax();
                    continue;
                }
                if (until > dl - MARGIN_NS) until = dl - MARGIN_NS;
            }
            uint32_t w = atomic_load(&s->word);
            if (atomic_load(&s->state) != SLOT_WAITING) continue;
            if (futex_wait_abs(&s->word, w, until) != 0 && errno == EINTR) {
                PyEval_RestoreThread(ts); /* a signal (Ctrl-C): let Python handlers run now */
                if (PyErr_CheckSignals()) { cancel_wait(c, i); return KR_INTERRUPTED; }
                ts = PyEval_SaveThread();
            }
        }
        PyEval_RestoreThread(ts);
        if (r >= 0) return r;
        now = mono_ns();
    }

    /* Adapt the spin: spin about twice what a handoff takes when that is short, spin less when it never pays. */
    uint64_t waited = now - t0;
    if (spun || waited <= SPIN_MAX_NS) {
        uint64_t want = 2 * waited;
        c->spin_ns = want < SPIN_MIN_NS ? SPIN_MIN_NS : want > SPIN_MAX_NS ? SPIN_MAX_NS : want;
        if (c->spin_ns < 4 * SPIN_MIN_NS) c->spin_ns = 4 * SPIN_MIN_NS;
    } else if (c->spin_ns > SPIN_MIN_NS) {
        c->spin_ns /= 2;
    }

    /* Granted: we own it. Confirm the grant is really ours before freeing the slot. */
    if ((state != SLOT_GRANTED && state != SLOT_GRANTED_ABANDONED) || !slot_mine(c, s) ||
        LD(st->owner_pid) != my_pid() || LD(st->owner_token) != c->token || LD(st->owner_session) != c->session)
        return KR_CORRUPT;
    *sync = LD(st->sync_value);
    atomic_store(&s->state, SLOT_FREE);
    return state == SLOT_GRANTED ? KR_OK : KR_ABANDONED;
}

/* ---- Python glue ---------------------------------------------------------------------------------------------- */

static int check_open(Core *c) {
    if (!c->st) {
        PyErr_SetString(E_Closed, "keyed mutex is closed");
        return -1;
    }
    if (c->broken) {
        PyErr_SetString(E_Error, "keyed mutex shared state was found corrupted earlier; this handle is unusable");
        return -1;
    }
    return 0;
}

static int parse_u64(PyObject *o, const char *what, uint64_t *out) {
    if (!PyLong_Check(o)) {
        PyErr_Format(E_Error, "%s must be an int, not %.100s", what, Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(E_Error, "%s must be in [0, 2**64)", what);
        return -1;
    }
    *out = v;
    return 0;
}

static int get_state(PyObject *obj, Py_buffer *view, km_state **out) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0) return -1;
    if (view->len < KM_SIZE || ((uintptr_t)view->buf & 63)) {
        PyBuffer_Release(view);
        PyErr_SetString(E_Error, "keyed mutex state must be a writable, 64-byte aligned buffer of >= 4096 bytes");
        return -1;
    }
    *out = (km_state *)view->buf;
    return 0;
}

static PyObject *raise_rc(Core *c, int r, uint64_t key, double timeout) {
    km_state *st = c->st;
    switch (r) {
    case KR_TIMEOUT:
    {
        char msg[200]; /* PyErr_Format has no %g */
        snprintf(msg, sizeof msg, "key %llu not acquired within %.6g s (mutex %s, key %llu, owner pid %d)",
                 (unsigned long long)key, timeout, LD(st->locked) ? "held" : "free",
                 (unsigned long long)LD(st->key), (int)LD(st->owner_pid));
        PyErr_SetString(E_Timeout, msg);
        break;
    }
    case KR_CORRUPT:
        c->broken = 1;
        PyErr_SetString(E_Error, "keyed mutex shared state is corrupted (bad magic or impossible values)");
        break;
    case KR_STUCK:
        c->broken = 1;
        PyErr_SetString(E_Error, "keyed mutex meta lock held for over 2 s: shared state corrupted or a peer is stopped");
        break;
    case KR_RECURSIVE: PyErr_SetString(E_Error, "recursive acquire: this KeyedMutex already owns the mutex"); break;
    case KR_NOT_OWNER: PyErr_SetString(E_Error, "release by a non-owner: this KeyedMutex does not own the mutex"); break;
    case KR_INTERRUPTED: break; /* exception already set */
    default: PyErr_Format(E_Error, "keyed mutex internal error %d", r);
    }
    return NULL;
}

static PyObject *Core_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"buffer", "session_id", NULL};
    PyObject *buf;
    unsigned long session = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|k", kwlist, &buf, &session)) return NULL;
    if (session > UINT32_MAX) return PyErr_Format(E_Error, "session_id must fit in 32 bits");
    Core *c = (Core *)type->tp_alloc(type, 0);
    if (!c) return NULL;
    km_state *st;
    if (get_state(buf, &c->view, &st) < 0) { Py_DECREF(c); return NULL; }
    if (LD(st->magic) != KM_MAGIC || LD(st->version) != KM_VERSION || LD(st->nslots) != KM_SLOTS ||
        LD(st->private_cap) != KM_PRIVATE) {
        PyBuffer_Release(&c->view);
        Py_DECREF(c);
        return PyErr_Format(E_Error, "not a keyed mutex state (bad magic or version)");
    }
    c->st = st;
    c->session = (uint32_t)session;
    c->token = atomic_fetch_add(&g_next_token, 1);
    c->spin_ns = SPIN_MAX_NS / 2;
    return (PyObject *)c;
}

/* Abandon the mutex if this object owns it: used on close, so a forgotten owner does not block peers forever. */
static void abandon_if_owner(Core *c) {
    km_state *st = c->st;
    if (!is_owner(c) || meta_lock(st) < 0) return;
    int wake = -1;
    if (header_ok(st) && is_owner(c)) wake = pass_abandoned_locked(st, 1);
    meta_unlock(st);
    wake_slot(st, wake);
}

static PyObject *Core_close(Core *c, PyObject *noargs) {
    (void)noargs;
    if (!c->st) Py_RETURN_NONE;
    if (c->busy) return PyErr_Format(E_Error, "close() while another thread is inside acquire/release");
    if (!c->broken) abandon_if_owner(c); /* a corrupted state has no owner worth telling about */
    c->st = NULL;
    PyBuffer_Release(&c->view);
    Py_RETURN_NONE;
}

static void Core_dealloc(Core *c) {
    if (c->st) {
        if (!c->broken) abandon_if_owner(c);
        c->st = NULL;
        PyBuffer_Release(&c->view);
    }
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *Core_acquire(Core *c, PyObject *args) {
    PyObject *keyo, *to = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &keyo, &to)) return NULL;
    uint64_t key, dl = 0;
    if (check_open(c) < 0 || parse_u64(keyo, "key", &key) < 0) return NULL;
    double t = INFINITY;
    if (to != Py_None) {
        t = PyFloat_AsDouble(to);
        if (t == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return PyErr_Format(E_Error, "timeout must be None or a number of seconds");
        }
        if (isnan(t) || t < 0) return PyErr_Format(E_Error, "timeout must be >= 0 seconds, not %R", to);
    }
    int has_dl = t < 1e9; /* beyond ~30 years: forever */
    if (has_dl) dl = mono_ns() + (uint64_t)(t * 1e9);
    int poll = has_dl && t == 0;
    uint64_t sync = 0;
    int r;
    c->busy++;
    for (;;) {
        int slot = -1;
        r = try_acquire(c, key, !poll, &slot, &sync);
        if (r == KR_TIMEOUT && poll) { /* polls also notice a dead owner */
            int a = check_owner(c->st);
            if (a == 1) r = try_acquire(c, key, 0, &slot, &sync);
            else if (a < 0) r = KR_STUCK;
            break;
        }
        if (r == KR_FULL) { /* every waiter slot taken: fall back to polling every millisecond (not FIFO) */
            uint64_t now = mono_ns();
            if (has_dl && now >= dl) { r = KR_TIMEOUT; break; }
            struct timespec ts = {0, 1000000};
            Py_BEGIN_ALLOW_THREADS
            nanosleep(&ts, NULL);
            Py_END_ALLOW_THREADS
            if (PyErr_CheckSignals()) { r = KR_INTERRUPTED; break; }
            if (check_owner(c->st) < 0) { r = KR_STUCK; break; }
            continue;
        }
        if (r == KR_ENQUEUED) r = wait_slot(c, slot, has_dl, dl, &sync);
        break;
    }
    c->busy--;
    if (r == KR_OK) return PyLong_FromUnsignedLongLong(sync);
    if (r == KR_ABANDONED) {
        PyObject *msg = PyUnicode_FromFormat(
            "the previous owner died holding the keyed mutex: this handle now owns it (key %llu); "
            "check the data, then release(key)", (unsigned long long)LD(c->st->key));
        PyObject *exc = msg ? PyObject_CallOneArg(E_Abandoned, msg) : NULL;
        Py_XDECREF(msg);
        if (!exc) return NULL;
        PyObject *k = PyLong_FromUnsignedLongLong(LD(c->st->key)), *sv = PyLong_FromUnsignedLongLong(sync);
        if (k && sv) {
            PyObject_SetAttrString(exc, "key", k);
            PyObject_SetAttrString(exc, "sync_value", sv);
        }
        Py_XDECREF(k);
        Py_XDECREF(sv);
        PyErr_SetObject(E_Abandoned, exc);
        Py_DECREF(exc);
        return NULL;
    }
    return raise_rc(c, r, key, t);
}

static PyObject *Core_release(Core *c, PyObject *args) {
    PyObject *keyo, *pdo = Py_None, *svo = Py_None;
    if (!PyArg_ParseTuple(args, "O|OO", &keyo, &pdo, &svo)) return NULL;
    uint64_t key, sv = 0;
    if (check_open(c) < 0 || parse_u64(keyo, "key", &key) < 0) return NULL;
    if (svo != Py_None && parse_u64(svo, "sync_value", &sv) < 0) return NULL;
    Py_buffer pd = {0};
    if (pdo != Py_None) {
        if (PyObject_GetBuffer(pdo, &pd, PyBUF_SIMPLE) < 0) return NULL;
        if (pd.len > KM_PRIVATE) {
            PyBuffer_Release(&pd);
            return PyErr_Format(E_Error, "private data is %zd bytes; the capacity is %d", pd.len, KM_PRIVATE);
        }
    }
    km_state *st = c->st;
    int r = KR_OK, wake = -1;
    if (meta_lock(st) < 0) r = KR_STUCK;
    else {
        if (!header_ok(st)) r = KR_CORRUPT;
        else if (!is_owner(c)) r = KR_NOT_OWNER;
        else {
            if (pdo != Py_None) {
                memcpy(st->private_data, pd.buf, (size_t)pd.len);
                ST(st->private_len, (uint32_t)pd.len);
            }
            ST(st->sync_value, svo != Py_None ? sv : LD(st->sync_value) + 1);
            wake = release_locked(st, key);
        }
        meta_unlock(st);
        wake_slot(st, wake);
    }
    if (pdo != Py_None) PyBuffer_Release(&pd);
    if (r != KR_OK) return raise_rc(c, r, key, 0);
    Py_RETURN_NONE;
}

static PyObject *Core_private_data(Core *c, PyObject *noargs) {
    (void)noargs;
    if (check_open(c) < 0) return NULL;
    km_state *st = c->st;
    char buf[KM_PRIVATE];
    uint32_t n = 0;
    int r = KR_OK;
    if (meta_lock(st) < 0) return raise_rc(c, KR_STUCK, 0, 0);
    if (!header_ok(st)) r = KR_CORRUPT;
    else if (!is_owner(c)) r = KR_NOT_OWNER;
    else {
        n = LD(st->private_len);
        memcpy(buf, st->private_data, n);
    }
    meta_unlock(st);
    if (r == KR_NOT_OWNER) return PyErr_Format(E_Error, "private data is read by the owner: acquire first");
    if (r != KR_OK) return raise_rc(c, r, 0, 0);
    return PyBytes_FromStringAndSize(buf, n);
}

static PyObject *Core_owned(Core *c, PyObject *noargs) {
    (void)noargs;
    if (check_open(c) < 0) return NULL;
    return PyBool_FromLong(is_owner(c));
}

/* A consistent snapshot for statistics(): (key, locked, abandoned, owner_pid, owner_session, waiters,
 * acquisitions, contended, abandoned_count, sync_value, private_len, meta_steals). */
static PyObject *stats_of(km_state *st) {
    if (meta_lock(st) < 0) return PyErr_Format(E_Error, "keyed mutex meta lock stuck");
    if (!header_ok(st)) {
        meta_unlock(st);
        return PyErr_Format(E_Error, "keyed mutex shared state is corrupted");
    }
    int waiters = 0;
    for (int i = 0; i < KM_SLOTS; i++) waiters += atomic_load(&st->slots[i].state) == SLOT_WAITING;
    unsigned long long key = LD(st->key), acq = LD(st->acquisitions), con = LD(st->contended),
                       ab = LD(st->abandoned_count), sv = LD(st->sync_value);
    int locked = LD(st->locked), abandoned = LD(st->abandoned), pid = LD(st->owner_pid);
    unsigned long ses = LD(st->owner_session), plen = LD(st->private_len), steals = LD(st->meta_steals);
    meta_unlock(st);
    return Py_BuildValue("(KOOikiKKKKkk)", key, locked ? Py_True : Py_False, abandoned ? Py_True : Py_False, pid,
                         ses, waiters, acq, con, ab, sv, plen, steals);
}

static PyObject *Core_stats(Core *c, PyObject *noargs) {
    (void)noargs;
    if (check_open(c) < 0) return NULL;
    return stats_of(c->st);
}

/* The keys queued waiters wait for, oldest waiter first, each once. Lock-free (a hint, polled often by the bridge,
 * which ships a remote copy's content only where a waiter wants it): never waits on the meta lock. */
static PyObject *Core_waiting_keys(Core *c, PyObject *noargs) {
    (void)noargs;
    if (check_open(c) < 0) return NULL;
    km_state *st = c->st;
    uint64_t keys[KM_SLOTS];
    uint32_t ages[KM_SLOTS], next = atomic_load(&st->next_ticket);
    int n = 0;
    for (int i = 0; i < KM_SLOTS; i++) {
        km_slot *s = &st->slots[i];
        if (atomic_load(&s->state) != SLOT_WAITING) continue;
        uint64_t k = atomic_load(&s->key);
        uint32_t age = next - atomic_load(&s->ticket);
        int j = 0;
        while (j < n && keys[j] != k) j++;
        if (j < n) { /* seen: keep the older waiter's age */
            if (age > ages[j]) ages[j] = age;
            continue;
        }
        keys[n] = k;
        ages[n++] = age;
    }
    for (int i = 1; i < n; i++) /* oldest first (insertion sort: n <= 48) */
        for (int j = i; j > 0 && ages[j] > ages[j - 1]; j--) {
            uint64_t tk = keys[j]; keys[j] = keys[j - 1]; keys[j - 1] = tk;
            uint32_t ta = ages[j]; ages[j] = ages[j - 1]; ages[j - 1] = ta;
        }
    PyObject *out = PyTuple_New(n);
    if (!out) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(keys[i]);
        if (!v) { Py_DECREF(out); return NULL; }
        PyTuple_SET_ITEM(out, i, v);
    }
    return out;
}

static PyObject *Core_get_closed(Core *c, void *unused) {
    (void)unused;
    return PyBool_FromLong(c->st == NULL);
}

static PyObject *Core_get_token(Core *c, void *unused) {
    (void)unused;
    return PyLong_FromUnsignedLong(c->token);
}

static PyMethodDef Core_methods[] = {
    {"acquire", (PyCFunction)Core_acquire, METH_VARARGS, "acquire(key, timeout=None) -> sync value"},
    {"release", (PyCFunction)Core_release, METH_VARARGS, "release(key, private_data=None, sync_value=None)"},
    {"private_data", (PyCFunction)Core_private_data, METH_NOARGS, "the private data blob (owner only)"},
    {"owned", (PyCFunction)Core_owned, METH_NOARGS, "whether this handle owns the mutex"},
    {"stats", (PyCFunction)Core_stats, METH_NOARGS, "raw statistics tuple"},
    {"waiting_keys", (PyCFunction)Core_waiting_keys, METH_NOARGS, "keys queued waiters wait for, oldest first"},
    {"close", (PyCFunction)Core_close, METH_NOARGS, "abandon if owning, then drop the buffer"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Core_getset[] = {
    {"closed", (getter)Core_get_closed, NULL, NULL, NULL},
    {"token", (getter)Core_get_token, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "texbridge._synccore.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Core(buffer, session_id=0): one opened keyed mutex (owner identity = pid, session, token).",
    .tp_new = Core_new,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
};

static PyObject *mod_init(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *buf, *keyo;
    if (!PyArg_ParseTuple(args, "OO", &buf, &keyo)) return NULL;
    uint64_t key;
    if (parse_u64(keyo, "initial_key", &key) < 0) return NULL;
    Py_buffer view;
    km_state *st;
    if (get_state(buf, &view, &st) < 0) return NULL;
    memset((void *)st, 0, KM_SIZE);
    ST(st->version, KM_VERSION);
    ST(st->nslots, KM_SLOTS);
    ST(st->private_cap, KM_PRIVATE);
    ST(st->key, key);
    atomic_store(&st->magic, KM_MAGIC); /* last: a half-initialized page never looks valid */
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *mod_abandon_session(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *buf;
    unsigned long session;
    if (!PyArg_ParseTuple(args, "Ok", &buf, &session)) return NULL;
    if (session == 0 || session > UINT32_MAX) return PyErr_Format(E_Error, "session id must be in [1, 2**32)");
    Py_buffer view;
    km_state *st;
    if (get_state(buf, &view, &st) < 0) return NULL;
    /* The broker calls this with state a client can write: look before locking (most disconnecting sessions own
     * nothing), then only try the lock, so a scribbled or held meta lock costs microseconds, never a stall. */
    int r = 0, wake = -1, m = 0;
    if (atomic_load(&st->locked) == 1 && atomic_load(&st->owner_session) == (uint32_t)session) {
        m = meta_trylock(st);
        if (m >= 0) {
            if (!header_ok(st)) r = -1;
            else if (LD(st->locked) && LD(st->owner_session) == (uint32_t)session) {
                wake = owner_dead_locked(st);
                r = 1;
            }
            meta_unlock(st);
            wake_slot(st, wake);
        }
    }
    PyBuffer_Release(&view);
    if (m < 0) return PyErr_Format(E_Error, "keyed mutex meta lock busy: not abandoned (waiters still detect a dead "
                                            "owner themselves)");
    if (r < 0) return PyErr_Format(E_Error, "keyed mutex shared state is corrupted");
    return PyBool_FromLong(r);
}

static PyObject *mod_stats(PyObject *self, PyObject *buf) {
    (void)self;
    Py_buffer view;
    km_state *st;
    if (get_state(buf, &view, &st) < 0) return NULL;
    PyObject *r = LD(st->magic) == KM_MAGIC ? stats_of(st) : PyErr_Format(E_Error, "not a keyed mutex state");
    PyBuffer_Release(&view);
    return r;
}

/* ---- futex words for other shared structures (senders' control buffer) ------------------------------------------- */

/* The 32-bit word at `offset` of a writable buffer, or NULL with an exception set. */
static a32 *word_at(PyObject *buf, Py_buffer *view, Py_ssize_t offset) {
    if (PyObject_GetBuffer(buf, view, PyBUF_WRITABLE) < 0) return NULL;
    if (offset < 0 || offset % 4 || offset + 4 > view->len || ((uintptr_t)view->buf + offset) % 4) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "offset must be 4-byte aligned and inside the buffer");
        return NULL;
    }
    return (a32 *)((char *)view->buf + offset);
}

/* wait_word(buffer, offset, expected, timeout=None, spin=0.0, poll=0.0): while the word equals `expected`, spin for
 * up to `spin` seconds (only with more than one CPU), then sleep on its futex, looking at the word again at least
 * every `poll` seconds (0: every SLICE_NS) for a writer that cannot wake us (another kernel: a VM across ivshmem);
 * GIL released throughout, Ctrl-C checked every slice. Memory a futex cannot key (a PCI BAR mapped through sysfs:
 * EFAULT) is polled in sleeps of `poll` (0: POLL_NS) instead of spinning through the failing syscall. Returns 0 on
 * timeout, 2 when a futex wake ended the sleep (the writer shares this kernel), 1 otherwise (seen changed, or
 * spurious: callers re-check). */
#define POLL_NS 50000ull
static PyObject *mod_wait_word(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *buf, *timeout_obj = Py_None;
    Py_ssize_t offset;
    unsigned long long expected;
    double spin = 0, poll = 0;
    if (!PyArg_ParseTuple(args, "OnK|Odd", &buf, &offset, &expected, &timeout_obj, &spin, &poll)) return NULL;
    double timeout = -1;
    if (timeout_obj != Py_None) {
        timeout = PyFloat_AsDouble(timeout_obj);
        if (timeout == -1 && PyErr_Occurred()) return NULL;
        if (!(timeout >= 0)) timeout = 0; /* negative or NaN: poll */
    }
    if (!(spin > 0) || !g_spin) spin = 0;
    if (spin > 0.01) spin = 0.01; /* a spin is a few hundred microseconds, never a busy wait in disguise */
    uint64_t slice = SLICE_NS, nap_ns = POLL_NS;
    if (poll > 0) {
        nap_ns = poll < 1e-5 ? 10000ull : poll * 1e9 < (double)SLICE_NS ? (uint64_t)(poll * 1e9) : SLICE_NS;
        slice = nap_ns;
    }
    Py_buffer view;
    a32 *w = word_at(buf, &view, offset);
    if (!w) return NULL;
    uint64_t start = mono_ns();
    uint64_t deadline = timeout < 0 ? UINT64_MAX : start + (uint64_t)(timeout * 1e9);
    int timed_out = 0, changed = 0, woken = 0;
    if (spin > 0 && atomic_load_explicit(w, memory_order_acquire) == (uint32_t)expected) {
        uint64_t until = start + (uint64_t)(spin * 1e9);
        if (until > deadline) until = deadline;
        Py_BEGIN_ALLOW_THREADS
        for (unsigned i = 0;; i++) {
            if (atomic_load_explicit(w, memory_order_acquire) != (uint32_t)expected) { changed = 1; break; }
            cpu_relax();
            if ((i & 15) == 15 && mono_ns() >= until) break;
        }
        Py_END_ALLOW_THREADS
    }
    while (!changed && !timed_out && !woken) {
        /* GIL released for up to SLICE_NS at a time, however short the look-again steps: a waiter taking the GIL
         * back every step would contend with the threads that have work (and miss the wake it waits for). */
        int done = 0;
        Py_BEGIN_ALLOW_THREADS
        uint64_t slice_end = mono_ns() + SLICE_NS;
        for (;;) {
            if (atomic_load_explicit(w, memory_order_acquire) != (uint32_t)expected) { done = 1; break; }
            uint64_t now = mono_ns();
            if (now >= deadline) { timed_out = 1; break; }
            if (now >= slice_end) break;
            uint64_t until = deadline - now > slice ? now + slice : deadline;
            if (futex_wait_abs(w, (uint32_t)expected, until) == 0) { woken = 1; break; }
            int err = errno;
            if (err == EINTR) break; /* a signal: the handler may need to run (Ctrl-C) */
            if (err == EFAULT || err == ENOSYS || err == EINVAL || err == EPERM) {
                uint64_t nap = until - now > nap_ns ? now + nap_ns : until;
                struct timespec ts = {(time_t)(nap / NS), (long)(nap % NS)};
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
            }
        }
        Py_END_ALLOW_THREADS
        if (done) break;
        if (PyErr_CheckSignals() < 0) { PyBuffer_Release(&view); return NULL; }
    }
    PyBuffer_Release(&view);
    return PyLong_FromLong(timed_out ? 0 : woken ? 2 : 1);
}

static PyObject *mod_wake_word(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *buf;
    Py_ssize_t offset;
    if (!PyArg_ParseTuple(args, "On", &buf, &offset)) return NULL;
    Py_buffer view;
    a32 *w = word_at(buf, &view, offset);
    if (!w) return NULL;
    futex_wake(w);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *mod_fence(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    atomic_thread_fence(memory_order_seq_cst);
    Py_RETURN_NONE;
}

static PyMethodDef mod_methods[] = {
    {"wait_word", mod_wait_word, METH_VARARGS,
     "wait_word(buffer, offset, expected, timeout=None, spin=0.0, poll=0.0) -> 0 (timeout) / 1 (changed) / 2 (woken): "
     "spin, then futex-wait while the u32 word equals expected, looking again every `poll` s"},
    {"wake_word", mod_wake_word, METH_VARARGS, "wake_word(buffer, offset): wake every waiter on the u32 word"},
    {"fence", mod_fence, METH_NOARGS, "fence(): a full (sequentially consistent) memory barrier"},
    {"init", mod_init, METH_VARARGS, "init(buffer, initial_key): format a fresh state page"},
    {"abandon_session", mod_abandon_session, METH_VARARGS,
     "abandon_session(buffer, session_id) -> bool: abandon the mutex if that session owns it"},
    {"stats", mod_stats, METH_O, "stats(buffer) -> raw statistics tuple"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_synccore", "Keyed-mutex and seqlock core: C11 atomics + futex.", -1,
                                 mod_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__synccore(void) {
    PyObject *errors = PyImport_ImportModule("texbridge._errors");
    if (!errors) return NULL;
    E_Error = PyObject_GetAttrString(errors, "KeyedMutexError");
    E_Timeout = PyObject_GetAttrString(errors, "KeyedMutexTimeout");
    E_Abandoned = PyObject_GetAttrString(errors, "KeyedMutexAbandoned");
    E_Closed = PyObject_GetAttrString(errors, "ClosedError");
    Py_DECREF(errors);
    if (!E_Error || !E_Timeout || !E_Abandoned || !E_Closed) return NULL;
    if (PyType_Ready(&CoreType) < 0) return NULL;
    pthread_atfork(NULL, NULL, after_fork_child);
    g_spin = sysconf(_SC_NPROCESSORS_ONLN) > 1;
    PyObject *m = PyModule_Create(&mod);
    if (!m) return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0 || PyModule_AddIntConstant(m, "STATE_SIZE", KM_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "PRIVATE_CAPACITY", KM_PRIVATE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_WAITERS", KM_SLOTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
