/* ember CPU runtime header: included once at the top of every generated C file.
 * Conversions between f32 and the 16-bit float types, the team barrier, and the attributes
 * kernels share. Kernels are called by every thread of one OpenMP team with (ith, nth) and may
 * wait at the team's ember_barrier inside; nothing here allocates. */
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#define EMBER_RESTRICT __restrict__
#define EMBER_INLINE static inline __attribute__((always_inline))
#define EMBER_MIN(a, b) ((a) < (b) ? (a) : (b))
#define EMBER_MAX(a, b) ((a) > (b) ? (a) : (b))

typedef uint16_t ember_f16;   /* IEEE binary16 bits */
typedef uint16_t ember_bf16;  /* bfloat16 bits */

EMBER_INLINE float ember_f16_to_f32(ember_f16 h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__aarch64__) && defined(__ARM_NEON)
    __fp16 v;   /* FCVT: exact, as the portable code (a signalling NaN comes back quiet) */
    memcpy(&v, &h, 2);
    return (float)v;
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalize */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

EMBER_INLINE ember_f16 ember_f32_to_f16(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    /* round to nearest even, with subnormals, inf and nan */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffff;
    if (absx > 0x7f800000u) return (ember_f16)(sign | 0x7e00);          /* nan */
    if (absx >= 0x477ff000u) return (ember_f16)(sign | 0x7c00);         /* overflow -> inf */
    if (absx < 0x38800000u) {                                           /* subnormal or zero */
        if (absx < 0x33000000u) return (ember_f16)sign;
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e;                                       /* 14..24 */
        uint32_t half = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (ember_f16)(sign | half);
    }
    uint32_t r = absx + 0xfff + ((absx >> 13) & 1) - (112u << 23);
    return (ember_f16)(sign | (r >> 13));
#endif
}

EMBER_INLINE float ember_bf16_to_f32(ember_bf16 h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

EMBER_INLINE ember_bf16 ember_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000u) return (ember_bf16)((x >> 16) | 64);  /* quiet nan */
    x += 0x7fff + ((x >> 16) & 1);
    return (ember_bf16)(x >> 16);
}

/* The share [*begin, *end) of n items that thread ith of nth works on. */
EMBER_INLINE void ember_split(int64_t n, int ith, int nth, int64_t *begin, int64_t *end) {
    int64_t per = (n + nth - 1) / nth;
    *begin = EMBER_MIN(n, per * ith);
    *end = EMBER_MIN(n, *begin + per);
}

/* The team barrier (instead of `#pragma omp barrier`): a generation count. The last thread to
 * arrive starts the next generation. The others spin a while (a wait in a busy graph is
 * short), then sleep on a futex until the last arrival wakes them. Sleeping is what keeps a
 * team fast beside another busy process: a waiter that spins, or yields in a loop, keeps its
 * core while the teammate it waits for sits queued behind that process on the other core (and
 * a yielded waiter queued behind it wakes only when its slice ends); a sleeper leaves its core
 * to the scheduler and is woken the moment the last one arrives.
 * How long to spin adapts (ember_barrier_spins, one per library): a wait that ended in sleep
 * halves it, one that ended while spinning lengthens it by 1/16. On a quiet machine waits are
 * short and it stays long (no wake-up costs); when teammates are often held up it falls to
 * EMBER_BARRIER_SPINS_MIN, so a waiter gives its core back almost at once.
 * `sleepers` lets the last arrival skip the wake-up call when nobody sleeps (the usual case).
 * Zero-initialized before the team starts; on its own cache line. Elsewhere than Linux the
 * waiters yield in a loop instead of sleeping. Who waits how never changes a result. */
typedef struct {
    int arrived;
    int generation;
    int sleepers;
    char pad[52];
} ember_barrier;

#define EMBER_BARRIER_SPINS_MAX 4096   /* pause instructions: ~50-250 us */
#define EMBER_BARRIER_SPINS_MIN 64
static int ember_barrier_spins = EMBER_BARRIER_SPINS_MAX;

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
EMBER_INLINE void ember_futex_wait(int *addr, int expected) {
    syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}
EMBER_INLINE void ember_futex_wake_all(int *addr) {
    syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
}
#endif

EMBER_INLINE void ember_cpu_relax(void) {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline void ember_barrier_wait(ember_barrier *b, int nth) {
    if (nth <= 1) return;
    const int gen = __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == nth) {
        __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);
        /* sequentially consistent with the sleepers' count below: either a sleeper sees the new
         * generation before it sleeps, or this thread sees it counted and wakes it */
        __atomic_store_n(&b->generation, gen + 1, __ATOMIC_SEQ_CST);
#if defined(__linux__)
        if (__atomic_load_n(&b->sleepers, __ATOMIC_SEQ_CST) > 0) ember_futex_wake_all(&b->generation);
#endif
        return;
    }
    const int limit = __atomic_load_n(&ember_barrier_spins, __ATOMIC_RELAXED);
    for (int spins = 0; spins < limit; spins++) {
        if (__atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) != gen) {
            if (limit < EMBER_BARRIER_SPINS_MAX)
                __atomic_store_n(&ember_barrier_spins, EMBER_MIN(EMBER_BARRIER_SPINS_MAX, limit + limit / 16 + 1),
                                 __ATOMIC_RELAXED);
            return;
        }
        ember_cpu_relax();
    }
    __atomic_store_n(&ember_barrier_spins, EMBER_MAX(EMBER_BARRIER_SPINS_MIN, limit / 2), __ATOMIC_RELAXED);
#if defined(__linux__)
    __atomic_add_fetch(&b->sleepers, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&b->generation, __ATOMIC_SEQ_CST) == gen)
        ember_futex_wait(&b->generation, gen);     /* returns at once if it already moved on */
    __atomic_sub_fetch(&b->sleepers, 1, __ATOMIC_RELAXED);
#else
    while (__atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) == gen) sched_yield();
#endif
}

/* ---- work sharing ------------------------------------------------------------------------
 * A kernel's n work items (chunks of rows, attention items) are cut into R = min(nth, 8)
 * contiguous regions, each with a counter on its own cache line in the kernel's work block
 * (EMBER_WORK_INTS ints, zeroed before the team starts). Thread ith claims the items of region
 * ith % R in order (one stream through memory, a counter no other thread touches), then helps
 * with the other regions in turn: a thread the OS holds back costs the others little more
 * than the item it holds. Who computes an item never changes its result. With work NULL,
 * thread ith takes items ith, ith + nth, ... */
#define EMBER_WORK_REGIONS 8
#define EMBER_WORK_INTS (EMBER_WORK_REGIONS * 16)

typedef struct {
    int *work;
    int64_t n, step;
    int regions, region, left;
} ember_work_iter;

static inline ember_work_iter ember_work_begin(int *work, int64_t n, int ith, int nth) {
    ember_work_iter it;
    it.work = work;
    it.n = n;
    it.regions = nth < EMBER_WORK_REGIONS ? nth : EMBER_WORK_REGIONS;
    it.region = ith % it.regions;
    it.left = it.regions;
    it.step = work ? 0 : ith;   /* the next item without a work block */
    (void)nth;
    return it;
}

/* The next item for the calling thread, or -1 when none is left. */
static inline int64_t ember_work_next(ember_work_iter *it, int nth) {
    if (!it->work) {
        const int64_t c = it->step;
        it->step += nth;
        return c < it->n ? c : -1;
    }
    while (it->left > 0) {
        const int r = it->region;
        const int64_t lo = it->n * r / it->regions, hi = it->n * (r + 1) / it->regions;
        const int64_t c = lo + __atomic_fetch_add(it->work + 16 * r, 1, __ATOMIC_RELAXED);
        if (c < hi) return c;
        it->region = (r + 1) % it->regions;
        it->left--;
    }
    return -1;
}

/* ---- the team's size under contention ------------------------------------------------------
 * A team of n threads beside another busy process can be slower than a smaller team: every
 * barrier waits for the thread the OS holds back (issue 18). Each graph library keeps one
 * governor: it runs with the team size that was fastest lately, and now and then times
 * EMBER_TEAM_WINDOW runs of a neighbouring size (one thread less, or back up one, towards the
 * n asked for) against the EMBER_TEAM_WINDOW runs just before; it moves when the probe was at
 * least EMBER_TEAM_GAIN faster. With the n asked for, probes start EMBER_TEAM_PERIOD_MIN runs
 * apart and the gap doubles each time staying put wins, up to EMBER_TEAM_PERIOD_MAX, and falls
 * back to the shortest when the barrier's waits start ending in sleep (ember_barrier_spins
 * drops: a teammate is being held up). With n threads a probe happens only while the waits end
 * in sleep: on a quiet machine a smaller team cannot win, and probes there cost their runs and
 * risk a move on noise (measured: 2 threads at 0.86x of the pinned team's decode on the quiet
 * 2-core machine when they probed regardless). Below n the gap stays
 * EMBER_TEAM_PERIOD_MIN: a probe with one thread more costs little under contention, and
 * nothing else would tell that the other process is gone (a smaller team's own runs do not
 * slow down beside it). The team size never
 * changes a result (every kernel is thread-count invariant). One run at a time may consult it:
 * a run that finds it taken uses n threads and records nothing. n_threads < 0 asks for exactly
 * -n_threads threads (no governor): profiles and thread-count tests. */
#include <time.h>
#define EMBER_TEAM_WINDOW 6
#define EMBER_TEAM_PERIOD_MIN 24
#define EMBER_TEAM_PERIOD_MAX 768
#define EMBER_TEAM_GAIN 0.93           /* a probe's mean time must be below this x the reference */
#define EMBER_TEAM_CONTENDED (EMBER_BARRIER_SPINS_MAX / 8)

typedef struct {
    int asked, size, probe, runs, period, next_down, contended, busy;
    double ref, trial;                 /* seconds summed over the reference and probe windows */
    int n_ref, n_trial;
} ember_team_governor;
static ember_team_governor ember_team __attribute__((unused));

static inline double ember_team_clock(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The team size for the next run of up to n threads; *governed: whether ember_team_end must
 * hear how long it took. */
static inline int ember_team_begin(int n, int *governed) {
    *governed = 0;
    if (n < 0) return -n;
    if (n <= 1 || __atomic_exchange_n(&ember_team.busy, 1, __ATOMIC_ACQUIRE)) return n < 1 ? 1 : n;
    ember_team_governor *g = &ember_team;
    *governed = 1;
    if (g->asked != n) {               /* first run, or another n asked for: start over at n */
        memset(g, 0, sizeof *g);
        g->busy = 1;
        g->asked = g->size = n;
        g->period = EMBER_TEAM_PERIOD_MIN;
        g->next_down = 1;
    }
    const int contended = __atomic_load_n(&ember_barrier_spins, __ATOMIC_RELAXED) < EMBER_TEAM_CONTENDED;
    if (contended && !g->contended && g->size > 1) g->period = EMBER_TEAM_PERIOD_MIN;
    g->contended = contended;
    if (!g->probe && g->runs >= g->period && g->size == n && !contended) {
        g->runs = g->n_ref = 0;        /* quiet with the full team: no probe, a new period */
        g->ref = 0.0;
    } else if (!g->probe && g->runs >= g->period) {
        const int down = g->size > 1 && (g->size == n || g->next_down);
        g->probe = down ? g->size - 1 : g->size + 1;
        g->next_down = !down;
    }
    return g->probe ? g->probe : g->size;
}

static inline void ember_team_end(double seconds) {
    ember_team_governor *g = &ember_team;
    if (!g->probe) {
        g->runs++;
        if (g->runs > g->period - EMBER_TEAM_WINDOW) {   /* the runs just before a probe */
            g->ref += seconds;
            g->n_ref++;
        }
    } else if (g->trial += seconds, ++g->n_trial == EMBER_TEAM_WINDOW) {
        if (g->n_ref > 0 && g->trial / g->n_trial < EMBER_TEAM_GAIN * g->ref / g->n_ref) {
            g->size = g->probe;
            g->period = EMBER_TEAM_PERIOD_MIN;
        } else {
            g->period = g->size == g->asked ? EMBER_MIN(2 * g->period, EMBER_TEAM_PERIOD_MAX)
                                            : EMBER_TEAM_PERIOD_MIN;
        }
        g->probe = g->runs = g->n_ref = g->n_trial = 0;
        g->ref = g->trial = 0.0;
    }
    __atomic_store_n(&g->busy, 0, __ATOMIC_RELEASE);
}
