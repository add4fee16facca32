/* Weight-only quantized matrix products for CPU: y[M, N] = x[M, K] @ W[N, K]^T, where W stays
 * in its GGUF block format (Q4_1 or Q8_0, 32 weights a block) and each row of x is quantized
 * to 8 bits per 32-value block before the integer dot products.
 *
 * Every output y[m, n] is one dot product whose operations and their order depend only on
 * x[m] and W[n]: not on M, on the other rows, on the thread count or on how work is split.
 * So a row's result is bit-identical whatever batch it is computed in (batch invariance),
 * which is what lets the fast and standard lanes produce identical tokens without padding.
 *
 * Built at first use by fastmode.kernels (gcc/cc, -O3 -march=native -pthread), called through
 * ctypes. Parallel over N on the library's own pool of threads (see run_team), not OpenMP:
 * libgomp only lets a team's threads spin at barriers while it manages no more threads than
 * there are CPUs, so once torch has a team in the main thread, every barrier of a pass run
 * from the engine's thread put a thread to sleep and woke it (a 2.7 ms pass took 9 ms).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FM_AVX2 1
#endif
/* AVX-512 VNNI (vpdpbusd: 4 u8 x s8 products summed into each int32 lane, 16 lanes): the R16
 * tiles' integer dot products. Integer sums are exact, so the results are bit-identical to the
 * AVX2 path's. */
#if defined(FM_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define FM_VNNI512 1
#endif
/* AVX-512 (F and DQ): attention runs two keys (scores) or sixteen values (weighted sums) a
 * vector, in the same per-lane operations and order as the AVX2 path, so its results are the
 * AVX2 build's bit for bit. */
#if defined(FM_AVX2) && defined(__AVX512F__) && defined(__AVX512DQ__)
#define FM_AVX512 1
#endif

#define QK 32
/* The weights stream through once per pass and are not read again before the next pass (97 MB
 * for the default model, more than the L3 cache): prefetch them non-temporally, so that they
 * displace less of what is reused (the KV cache, activations, and the interpreter's own data
 * between passes). Measured on Zen 5: 3.5-4% more tokens per second in both lanes, same bits. */
#ifndef FM_PREFETCH_HINT
#define FM_PREFETCH_HINT _MM_HINT_NTA
#endif
#define PARALLEL_MIN_BLOCKS 8192   /* weight-block dot products below which a matmul stays serial */
#define PARALLEL_MIN_ATTN 131072   /* multiply-adds below which attention stays serial */
#define PREFETCH_BYTES 2048        /* how far ahead of use the weight stream is prefetched (R8, per row) */
#define PREFETCH_BYTES_R16 4096    /* the same for the 16-row VNNI tiles (measured on Zen 5: 2048 was 2-7% slower) */
#define PREFETCH_BYTES_R16_WIDE 8192 /* the same for tiles of 3-8 x rows (Zen 5, interleaved per-pass A/B, 60
                                     * rounds at two contexts: 4 rows 2% and 6-8 rows 2-4% less time than at
                                     * 4096; 1-2 rows even or slower at 8192) */
#define QUANTIZE_PARALLEL_MIN 4096 /* x values (rows x K) below which their prologue and quantization stay serial */
#define Q4_1_BYTES 20 /* f16 d, f16 m, 16 bytes of nibbles */
#define Q8_0_BYTES 34 /* f16 d, 32 int8 */

enum { FM_Q4_1 = 3, FM_Q8_0 = 8 }; /* ggml type ids */

/* Activations, quantized row by row: for each 32-value block b of a row, x ~ d[b] * q[b][:]
 * and s[b] = d[b] * sum(q[b][:]) (what a Q4_1 block's minimum multiplies). */
typedef struct {
    const int8_t *q; /* [nb][32] */
    const float *d;  /* [nb] */
    const float *s;  /* [nb] */
} xrow;

/* Weights are repacked at load (fastmode.kernels.pack): the same bytes as the GGUF blocks, in
 * one of two orders. Matrices with N % 16 == 0 on AVX-512 VNNI builds (see r16_group), or else
 * N % 8 == 0 on AVX2 builds (see r8_group), are row-interleaved.
 * Otherwise a row is nb / 8 groups, then nb % 8 blocks as the GGUF has them:
 *   Q4_1 group (160 bytes): 8 f16 d, 8 f16 m, 8 x 16 bytes of nibbles (low nibbles: values 0..15)
 *   Q8_0 group (272 bytes): 8 f16 d, 8 x 32 int8 */
#define GROUP 8

/* ---- the thread pool ------------------------------------------------------------------------
 * run_team(fn, ctx, n) runs fn(ctx, tid, n) on the calling thread (tid 0) and n - 1 pool
 * workers (started at first need, kept for the process). A team body shares loops out with
 * share() and waits for the others with team_barrier(): between the steps of a pass the
 * workers spin (a pass has about 150 such barriers); between passes they spin WORKER_SPIN_NS
 * and then sleep until the next job. One team runs at a time: a caller that finds the pool
 * busy (a second engine) runs its job alone, which gives the same results (see the top). */
#define MAX_TEAM 64
#ifndef WORKER_SPIN_NS
#define WORKER_SPIN_NS 2000000 /* how long an idle worker spins for the next job before it sleeps */
#endif
#ifndef YIELD_AFTER
/* barrier spins (some milliseconds) before a waiting thread also yields its CPU: only when a
 * team thread has lost its core for that long. Yielding sooner hands the core to any other
 * runnable thread on the machine for a time slice, which made multi-row passes slower. */
#define YIELD_AFTER (1 << 18)
#endif

typedef void (*team_fn)(void *ctx, int tid, int nth);

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* workers' sleep and start */
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER; /* held while a team runs */
static int pool_size = 0;      /* workers started: tids 1 .. pool_size (written under both locks) */
static int pool_sleepers = 0;  /* under pool_lock */
static atomic_ulong pool_gen;  /* bumped for each job */
static atomic_int pool_left;   /* workers yet to finish the current job */
static atomic_int bar_count;   /* threads arrived at the current barrier */
static atomic_uint bar_phase;  /* barriers passed */
static unsigned long start_gen[MAX_TEAM]; /* pool_gen when each worker was started */
static team_fn job_fn;         /* the current job (written before pool_gen is bumped) */
static void *job_ctx;
static int job_nth;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *worker_main(void *arg) {
    const int tid = (int)(intptr_t)arg;
    unsigned long seen = start_gen[tid]; /* jobs after this one are this worker's */
    for (;;) {
        unsigned long gen;
        int64_t since = 0;
        int spins = 0;
        while ((gen = atomic_load_explicit(&pool_gen, memory_order_acquire)) == seen) {
            cpu_relax();
            if (++spins % 256) continue;
            if (!since) since = now_ns();
            else if (now_ns() - since > WORKER_SPIN_NS) {
                pthread_mutex_lock(&pool_lock);
                pool_sleepers++;
                while (atomic_load_explicit(&pool_gen, memory_order_acquire) == seen)
                    pthread_cond_wait(&pool_wake, &pool_lock);
                pool_sleepers--;
                pthread_mutex_unlock(&pool_lock);
            }
        }
        seen = gen;
        if (tid < job_nth) job_fn(job_ctx, tid, job_nth);
        atomic_fetch_sub_explicit(&pool_left, 1, memory_order_acq_rel);
    }
    return NULL;
}

/* The n threads of the running team wait here for each other (n = the team's size). */
static void team_barrier(int nth) {
    if (nth <= 1) return;
    const unsigned phase = atomic_load_explicit(&bar_phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&bar_count, 1, memory_order_acq_rel) == nth - 1) {
        atomic_store_explicit(&bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&bar_phase, 1, memory_order_acq_rel);
        return;
    }
    int spins = 0;
    while (atomic_load_explicit(&bar_phase, memory_order_acquire) == phase) {
        cpu_relax();
        if (++spins > YIELD_AFTER) sched_yield(); /* another process took a core: let it run */
    }
}

/* Thread tid's share [*lo, *hi) of n loop iterations, in contiguous blocks (as OpenMP's static schedule). */
static inline void share(int64_t n, int tid, int nth, int64_t *lo, int64_t *hi) {
    const int64_t per = n / nth, extra = n % nth;
    *lo = tid * per + (tid < extra ? tid : extra);
    *hi = *lo + per + (tid < extra ? 1 : 0);
}

/* In a child process (fork) the workers do not exist: start from an empty pool there. */
static void pool_after_fork(void) {
    pthread_mutex_init(&pool_lock, NULL);
    pthread_cond_init(&pool_wake, NULL);
    pthread_mutex_init(&pool_busy, NULL);
    pool_size = 0;
    pool_sleepers = 0;
}

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

static void run_team(team_fn fn, void *ctx, int nth) {
    if (nth > MAX_TEAM) nth = MAX_TEAM;
    pthread_once(&pool_once, pool_init);
    if (nth <= 1 || pthread_mutex_trylock(&pool_busy) != 0) {
        fn(ctx, 0, 1);
        return;
    }
    if (pool_size < nth - 1) {
        pthread_mutex_lock(&pool_lock);
        while (pool_size < nth - 1) {
            pthread_t t;
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            start_gen[pool_size + 1] = atomic_load_explicit(&pool_gen, memory_order_acquire);
            const int failed = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(pool_size + 1));
            pthread_attr_destroy(&attr);
            if (failed) break;
            pool_size++;
        }
        pthread_mutex_unlock(&pool_lock);
    }
    if (nth > pool_size + 1) nth = pool_size + 1;
    if (nth <= 1) {
        pthread_mutex_unlock(&pool_busy);
        fn(ctx, 0, 1);
        return;
    }
    job_fn = fn;
    job_ctx = ctx;
    job_nth = nth;
    atomic_store_explicit(&bar_count, 0, memory_order_relaxed);
    atomic_store_explicit(&pool_left, pool_size, memory_order_relaxed);
    pthread_mutex_lock(&pool_lock);
    atomic_fetch_add_explicit(&pool_gen, 1, memory_order_acq_rel);
    if (pool_sleepers) pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);
    fn(ctx, 0, nth);
    int spins = 0;
    while (atomic_load_explicit(&pool_left, memory_order_acquire) != 0) {
        cpu_relax();
        if (++spins > YIELD_AFTER) sched_yield();
    }
    pthread_mutex_unlock(&pool_busy);
}

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000 | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* float -> f16, rounding to nearest even (the KV cache's storage) */
static inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000, absx = x & 0x7FFFFFFF;
    if (absx >= 0x7F800000) return (uint16_t)(sign | 0x7C00 | (absx > 0x7F800000 ? 0x200 : 0)); /* inf, nan */
    if (absx >= 0x477FF000) return (uint16_t)(sign | 0x7C00); /* rounds past the largest half */
    if (absx < 0x38800000) { /* subnormal or zero: a multiple of 2^-24 */
        const float scaled = fabsf(f) * 16777216.0f; /* exact */
        return (uint16_t)(sign | (uint32_t)nearbyintf(scaled));
    }
    uint32_t h = ((absx >> 13) - (112u << 10)), rest = absx & 0x1FFF;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
#endif
}

/* n floats -> f16 (n a multiple of 8 on F16C builds' fast path) */
static void store_half(uint16_t *dst, const float *src, int64_t n) {
    int64_t i = 0;
#if defined(FM_AVX2)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = float_to_half(src[i]);
}

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }


static void quantize_row(const float *x, int64_t K, int8_t *q, float *d, float *s, int32_t *isum) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float *v = x + b * QK;
#ifdef FM_AVX2
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
        __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float db = amax / 127.0f >= FLT_MIN ? amax / 127.0f : 0.0f, id = db > 0.0f ? 1.0f / db : 0.0f;
        const __m256 mul = _mm256_set1_ps(id);
        const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), rnd));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), rnd));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), rnd));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), rnd));
        __m256i t = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        t4 = _mm_hadd_epi32(t4, t4);
        t4 = _mm_hadd_epi32(t4, t4);
        const int sum = _mm_cvtsi128_si32(t4);
        i0 = _mm256_packs_epi32(i0, i1);
        i2 = _mm256_packs_epi32(i2, i3);
        i0 = _mm256_packs_epi16(i0, i2);
        i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + b * QK), i0);
#else
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) { float a = fabsf(v[j]); amax = a > amax ? a : amax; }
        const float db = amax / 127.0f >= FLT_MIN ? amax / 127.0f : 0.0f, id = db > 0.0f ? 1.0f / db : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int qi = (int)nearbyintf(v[j] * id);
            qi = qi > 127 ? 127 : (qi < -127 ? -127 : qi);
            q[b * QK + j] = (int8_t)qi;
            sum += qi;
        }
#endif
        d[b] = db;
        s[b] = db * (float)sum;
        isum[b] = sum;
    }
}

#ifdef FM_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x for x <= 88 (softmax after subtracting the maximum; SwiGLU), 8 at a time: x = n ln2 + r with
 * |r| <= ln2/2, e^r by its Taylor polynomial to degree 7 (relative error < 2e-8 before
 * rounding), scaled by 2^n through the exponent bits; below -87 the result is 0. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* silu(g) * u = g / (1 + e^-g) * u, 8 at a time (e^-g capped at e^88: the quotient is then 0) */
static inline __m256 swiglu8(__m256 g, __m256 u) {
    const __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(88.0f)));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

static inline __m256i q4_unpack(const uint8_t *qs) {
    __m128i packed = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
}

static inline __m256i q4_dot(__m256i qw, const int8_t *xq) { /* 0..15 x int8, pairwise in int32 */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(qw, _mm256_loadu_si256((const __m256i *)xq)), _mm256_set1_epi16(1));
}

static inline __m256i q8_dot(__m256i qw, const int8_t *xq) { /* int8 x int8: qw's sign moves onto x */
    __m256i qx = _mm256_loadu_si256((const __m256i *)xq);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw)),
                             _mm256_set1_epi16(1));
}
#endif

/* The tail blocks of a row (GGUF layout), in one fixed order. */
static float tail_dot(int type, const uint8_t *w, int64_t b0, int64_t nb, const xrow *x) {
#ifdef FM_AVX2
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t b = b0; b < nb; b++) {
        const int8_t *xq = x->q + b * QK;
        __m256i p;
        float dw;
        if (type == FM_Q4_1) {
            p = q4_dot(q4_unpack(w + 4), xq);
            dw = half_to_float(rd16(w));
            mins += half_to_float(rd16(w + 2)) * x->s[b];
            w += Q4_1_BYTES;
        } else {
            p = q8_dot(_mm256_loadu_si256((const __m256i *)(w + 2)), xq);
            dw = half_to_float(rd16(w));
            w += Q8_0_BYTES;
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * x->d[b]), _mm256_cvtepi32_ps(p), acc);
    }
    return hsum8(acc) + mins;
#else
    float acc = 0.0f;
    for (int64_t b = b0; b < nb; b++) {
        const int8_t *xq = x->q + b * QK;
        int isum = 0;
        if (type == FM_Q4_1) {
            for (int j = 0; j < 16; j++) isum += (w[4 + j] & 0x0F) * xq[j] + (w[4 + j] >> 4) * xq[j + 16];
            acc += half_to_float(rd16(w)) * x->d[b] * (float)isum + half_to_float(rd16(w + 2)) * x->s[b];
            w += Q4_1_BYTES;
        } else {
            const int8_t *qw = (const int8_t *)(w + 2);
            for (int j = 0; j < QK; j++) isum += qw[j] * xq[j];
            acc += half_to_float(rd16(w)) * x->d[b] * (float)isum;
            w += Q8_0_BYTES;
        }
    }
    return acc;
#endif
}

#define R 4 /* x rows sharing one pass over a weight row */

/* out[r] = dot(weight row w, x row xs[r]) for r < nx (nx = 1 or R). Each output's operations
 * and their order are the same whatever nx is, so results never depend on the batch. */
static inline __attribute__((always_inline)) void dot_rows_n(int type, const uint8_t *w, int64_t nb,
                                                              const xrow *xs, const int nx, float *out) {
    const int64_t groups = nb / GROUP;
    const int64_t gbytes = GROUP * (type == FM_Q4_1 ? Q4_1_BYTES : Q8_0_BYTES);
#ifdef FM_AVX2
    __m256 acc[R], accm[R];
    for (int r = 0; r < nx; r++) { acc[r] = _mm256_setzero_ps(); accm[r] = _mm256_setzero_ps(); }
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *gw = w + g * gbytes;
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)gw));
        __m256i qw[GROUP]; /* the group's weights, unpacked once for every x row */
        if (type == FM_Q4_1)
            for (int b = 0; b < GROUP; b++) qw[b] = q4_unpack(gw + 32 + b * 16);
        else
            for (int b = 0; b < GROUP; b++) qw[b] = _mm256_loadu_si256((const __m256i *)(gw + 16 + b * QK));
        for (int r = 0; r < nx; r++) {
            const int8_t *xq = xs[r].q + g * GROUP * QK;
            __m256i sums;
            /* block dots, reduced pairwise as they come (few live registers) */
#define DOT(b) (type == FM_Q4_1 ? q4_dot(qw[b], xq + (b) * QK) : q8_dot(qw[b], xq + (b) * QK))
            const __m256i lo = _mm256_hadd_epi32(_mm256_hadd_epi32(DOT(0), DOT(1)), _mm256_hadd_epi32(DOT(2), DOT(3)));
            const __m256i hi = _mm256_hadd_epi32(_mm256_hadd_epi32(DOT(4), DOT(5)), _mm256_hadd_epi32(DOT(6), DOT(7)));
#undef DOT
            sums = _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
            const __m256 scale = _mm256_mul_ps(dw, _mm256_loadu_ps(xs[r].d + g * GROUP));
            acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[r]);
            if (type == FM_Q4_1) {
                const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gw + 16)));
                accm[r] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(xs[r].s + g * GROUP), accm[r]);
            }
        }
    }
    for (int r = 0; r < nx; r++)
        out[r] = hsum8(acc[r]) + hsum8(accm[r]) + tail_dot(type, w + groups * gbytes, groups * GROUP, nb, &xs[r]);
#else
    for (int r = 0; r < nx; r++) {
        float acc = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *gw = w + g * gbytes;
            for (int b = 0; b < GROUP; b++) {
                const int64_t blk = g * GROUP + b;
                const int8_t *xq = xs[r].q + blk * QK;
                int isum = 0;
                float dw = half_to_float(rd16(gw + 2 * b)), mterm = 0.0f;
                if (type == FM_Q4_1) {
                    const uint8_t *qs = gw + 32 + b * 16;
                    for (int j = 0; j < 16; j++) isum += (qs[j] & 0x0F) * xq[j] + (qs[j] >> 4) * xq[j + 16];
                    mterm = half_to_float(rd16(gw + 16 + 2 * b)) * xs[r].s[blk];
                } else {
                    const int8_t *qw = (const int8_t *)(gw + 16 + b * QK);
                    for (int j = 0; j < QK; j++) isum += qw[j] * xq[j];
                }
                acc += dw * xs[r].d[blk] * (float)isum + mterm;
            }
        }
        out[r] = acc + tail_dot(type, w + groups * gbytes, groups * GROUP, nb, &xs[r]);
    }
#endif
}

/* The x operand of the R8 tiles, pre-broadcast: per row and block, its 8 chunks of 4 int8 values
 * (values 4j..4j+3 for chunk j), each repeated over the 8 output rows' lanes (32 bytes), so the
 * tiles read each chunk as one vector load instead of broadcasting it once per weight tile. */
#define XW_BLOCK (8 * 32)
#ifdef FM_AVX2
#define XCHUNK(xb, j) _mm256_loadu_si256((const __m256i *)((xb) + 32 * (j)))

static void broadcast_chunks(const int8_t *xq, int64_t blocks, int8_t *xw) {
    for (int64_t i = 0; i < blocks * 8; i++) {
        int32_t a;
        memcpy(&a, xq + 4 * i, 4);
        _mm256_storeu_si256((__m256i *)(xw + 32 * i), _mm256_set1_epi32(a));
    }
}

/* Row-interleaved layout ("R8", used when N % 8 == 0 on AVX2 builds): 8 weight rows' blocks
 * are stored together, per block index b: 8 f16 d, (Q4_1) 8 f16 m, then the values in 4-byte
 * chunks, chunk-major then row: Q4_1 chunk c (c < 4) holds bytes 4c..4c+3 of each row's 16
 * nibble bytes (values 4c..4c+3 low, 16+4c..16+4c+3 high); Q8_0 chunk c (c < 8) holds values
 * 4c..4c+3 of each row. Then lane j of every vector belongs to output row j: no horizontal
 * sums, and each output's operations do not depend on M or on the other rows. */
/* x rows m0 .. m0 + nx - 1 (nx <= R, a constant in each inlined copy: sums stay in registers) */
static inline __attribute__((always_inline)) void r8_tile(int type, const uint8_t *w, int64_t nb, int64_t m0,
                                                           const int nx, const int8_t *xw, const float *xd,
                                                           const float *xs, float *dst, int64_t N, int64_t n0) {
    const int64_t bbytes = GROUP * (type == FM_Q4_1 ? Q4_1_BYTES : Q8_0_BYTES);
    const __m256i lo = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    {
        __m256 acc[R], accm[R];
        for (int r = 0; r < R; r++) { acc[r] = _mm256_setzero_ps(); accm[r] = _mm256_setzero_ps(); }
        const uint8_t *wb = w;
        for (int64_t b = 0; b < nb; b++, wb += bbytes) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)wb));
            /* the weights stream from memory once per pass: ask for them ahead of use */
            _mm_prefetch((const char *)(wb + PREFETCH_BYTES), FM_PREFETCH_HINT);
            _mm_prefetch((const char *)(wb + PREFETCH_BYTES + 64), FM_PREFETCH_HINT);
            _mm_prefetch((const char *)(wb + PREFETCH_BYTES + 128), FM_PREFETCH_HINT);
            if (type == FM_Q8_0) _mm_prefetch((const char *)(wb + PREFETCH_BYTES + 192), FM_PREFETCH_HINT);
            if (type == FM_Q4_1) {
                const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wb + 16)));
                __m256i vl[4], vh[4];
                for (int c = 0; c < 4; c++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 32 + 32 * c));
                    vl[c] = _mm256_and_si256(v, lo);
                    vh[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo);
                }
                for (int r = 0; r < nx; r++) {
                    const int64_t row = m0 + r;
                    const int8_t *xb = xw + (row * nb + b) * XW_BLOCK;
                    __m256i s16 = _mm256_setzero_si256(); /* at most 8 x 3810: fits int16 */
                    for (int c = 0; c < 4; c++) {
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(vl[c], XCHUNK(xb, c)));
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(vh[c], XCHUNK(xb, 4 + c)));
                    }
                    const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(xd[row * nb + b]));
                    acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones)), acc[r]);
                    accm[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xs[row * nb + b]), accm[r]);
                }
            } else {
                __m256i v[8];
                for (int c = 0; c < 8; c++) v[c] = _mm256_loadu_si256((const __m256i *)(wb + 16 + 32 * c));
                for (int r = 0; r < nx; r++) {
                    const int64_t row = m0 + r;
                    const int8_t *xb = xw + (row * nb + b) * XW_BLOCK;
                    __m256i s32 = _mm256_setzero_si256();
                    for (int c = 0; c < 8; c++) {
                        const __m256i xv = XCHUNK(xb, c);
                        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(
                            _mm256_maddubs_epi16(_mm256_sign_epi8(v[c], v[c]), _mm256_sign_epi8(xv, v[c])), ones));
                    }
                    const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(xd[row * nb + b]));
                    acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(s32), acc[r]);
                }
            }
        }
        for (int r = 0; r < nx; r++)
            _mm256_storeu_ps(dst + (m0 + r) * N + n0,
                             type == FM_Q4_1 ? _mm256_add_ps(acc[r], accm[r]) : acc[r]);
    }
}

static void r8_group(int type, const uint8_t *w, int64_t nb, int64_t M, const int8_t *xw, const float *xd,
                     const float *xs, float *dst, int64_t N, int64_t n0) {
#define TILES(T)                                                                  \
    for (int64_t m0 = 0; m0 < M; m0 += R) {                                       \
        const int64_t left = M - m0;                                              \
        if (left >= 4) r8_tile(T, w, nb, m0, 4, xw, xd, xs, dst, N, n0);          \
        else if (left == 3) r8_tile(T, w, nb, m0, 3, xw, xd, xs, dst, N, n0);     \
        else if (left == 2) r8_tile(T, w, nb, m0, 2, xw, xd, xs, dst, N, n0);     \
        else r8_tile(T, w, nb, m0, 1, xw, xd, xs, dst, N, n0);                    \
    }
    if (type == FM_Q4_1) { TILES(FM_Q4_1) } else { TILES(FM_Q8_0) }
#undef TILES
}
#endif

#ifdef FM_VNNI512
/* Row-interleaved by 16 ("R16", AVX-512 VNNI builds, N % 16 == 0): as R8 with 16 weight rows a
 * group, so one 64-byte chunk holds 4 values of each of 16 rows and lane j of a 512-bit vector
 * is output row j. Per block b: 16 f16 d, (Q4_1) 16 f16 m, then 4-byte chunks, chunk-major:
 * Q4_1 chunk c (c < 4) holds bytes 4c..4c+3 of each row's 16 nibble bytes, Q8_0 chunk c (c < 8)
 * values 4c..4c+3 of each row. The x values are broadcast straight from the quantized row
 * (4 at a time). Each output's integer block sums are exact and its float steps are the R8
 * tile's, so the results equal the R8 and AVX2 paths' bit for bit. */
#define R16_ROWS 8 /* x rows sharing one pass over a group's weights */

static inline int32_t rd32(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

static inline __attribute__((always_inline)) void r16_tile(int type, const uint8_t *w, int64_t nb, int64_t m0,
                                                            const int nx, const int8_t *xq, const float *xd,
                                                            const float *xs, const int32_t *xi, float *dst,
                                                            int64_t N, int64_t n0) {
    const int64_t bbytes = 16 * (type == FM_Q4_1 ? Q4_1_BYTES : Q8_0_BYTES);
    __m512 acc[R16_ROWS], accm[R16_ROWS];
    for (int r = 0; r < R16_ROWS; r++) { acc[r] = _mm512_setzero_ps(); accm[r] = _mm512_setzero_ps(); }
    const uint8_t *wb = w;
    for (int64_t b = 0; b < nb; b++, wb += bbytes) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)wb));
        /* the weights stream from memory once per pass: ask for them ahead of use */
        for (int64_t line = 0; line < bbytes; line += 64)
            _mm_prefetch((const char *)(wb + (nx > 2 ? PREFETCH_BYTES_R16_WIDE : PREFETCH_BYTES_R16) + line), FM_PREFETCH_HINT);
        if (type == FM_Q4_1) {
            const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wb + 32)));
            const __m512i lo = _mm512_set1_epi8(0x0F);
            __m512i vl[4], vh[4];
            for (int c = 0; c < 4; c++) {
                const __m512i v = _mm512_loadu_si512((const void *)(wb + 64 + 64 * c));
                vl[c] = _mm512_and_si512(v, lo);
                vh[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo);
            }
            for (int r = 0; r < nx; r++) {
                const int64_t row = m0 + r;
                const int8_t *xb = xq + (row * nb + b) * QK;
                __m512i s32 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), vl[0], _mm512_set1_epi32(rd32(xb)));
                for (int c = 1; c < 4; c++) s32 = _mm512_dpbusd_epi32(s32, vl[c], _mm512_set1_epi32(rd32(xb + 4 * c)));
                for (int c = 0; c < 4; c++)
                    s32 = _mm512_dpbusd_epi32(s32, vh[c], _mm512_set1_epi32(rd32(xb + 16 + 4 * c)));
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(xd[row * nb + b]));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s32), acc[r]);
                accm[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xs[row * nb + b]), accm[r]);
            }
        } else {
            /* (w + 128) x x, less 128 x the block's integer x sum: exact */
            __m512i uw[8];
            for (int c = 0; c < 8; c++)
                uw[c] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wb + 32 + 64 * c)),
                                         _mm512_set1_epi8((char)0x80));
            for (int r = 0; r < nx; r++) {
                const int64_t row = m0 + r;
                const int8_t *xb = xq + (row * nb + b) * QK;
                __m512i s32 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), uw[0], _mm512_set1_epi32(rd32(xb)));
                for (int c = 1; c < 8; c++) s32 = _mm512_dpbusd_epi32(s32, uw[c], _mm512_set1_epi32(rd32(xb + 4 * c)));
                s32 = _mm512_sub_epi32(s32, _mm512_set1_epi32(128 * xi[row * nb + b]));
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(xd[row * nb + b]));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s32), acc[r]);
            }
        }
    }
    for (int r = 0; r < nx; r++)
        _mm512_storeu_ps(dst + (m0 + r) * N + n0, type == FM_Q4_1 ? _mm512_add_ps(acc[r], accm[r]) : acc[r]);
}

static void r16_group(int type, const uint8_t *w, int64_t nb, int64_t M, const int8_t *xq, const float *xd,
                      const float *xs, const int32_t *xi, float *dst, int64_t N, int64_t n0) {
#define TILES16(T)                                                                         \
    for (int64_t m0 = 0; m0 < M;) {                                                        \
        const int64_t left = M - m0;                                                       \
        const int nx = left >= R16_ROWS ? R16_ROWS : (int)left;                            \
        switch (nx) {                                                                      \
        case 8: r16_tile(T, w, nb, m0, 8, xq, xd, xs, xi, dst, N, n0); break;              \
        case 7: r16_tile(T, w, nb, m0, 7, xq, xd, xs, xi, dst, N, n0); break;              \
        case 6: r16_tile(T, w, nb, m0, 6, xq, xd, xs, xi, dst, N, n0); break;              \
        case 5: r16_tile(T, w, nb, m0, 5, xq, xd, xs, xi, dst, N, n0); break;              \
        case 4: r16_tile(T, w, nb, m0, 4, xq, xd, xs, xi, dst, N, n0); break;              \
        case 3: r16_tile(T, w, nb, m0, 3, xq, xd, xs, xi, dst, N, n0); break;              \
        case 2: r16_tile(T, w, nb, m0, 2, xq, xd, xs, xi, dst, N, n0); break;              \
        default: r16_tile(T, w, nb, m0, 1, xq, xd, xs, xi, dst, N, n0);                    \
        }                                                                                  \
        m0 += nx;                                                                          \
    }
    if (type == FM_Q4_1) { TILES16(FM_Q4_1) } else { TILES16(FM_Q8_0) }
#undef TILES16
}
#endif

/* How many weight rows the layout of a matrix with N rows interleaves: 16 (R16), 8 (R8) or 0
 * (rows stay apart). fastmode.kernels.pack asks this and agrees. */
int fm_row_interleaved(int64_t N) {
#ifdef FM_VNNI512
    if (N % 16 == 0) return 16;
#endif
#ifdef FM_AVX2
    return N % GROUP == 0 ? GROUP : 0;
#else
    (void)N;
    return 0;
#endif
}

/* nx as a constant in each copy: the compiler keeps the partial sums in registers */
static void dot_rows(int type, const uint8_t *w, int64_t nb, const xrow *xs, int nx, float *out) {
    if (nx == R) dot_rows_n(type, w, nb, xs, R, out);
    else dot_rows_n(type, w, nb, xs, 1, out);
}

/* 1 if this build uses the AVX2 path (for reports). */
int fm_has_avx2(void) {
#ifdef FM_AVX2
    return 1;
#else
    return 0;
#endif
}

/* 1 if this build's attention uses AVX-512 (for reports and tests). */
int fm_has_avx512(void) {
#ifdef FM_AVX512
    return 1;
#else
    return 0;
#endif
}

/* 1 if this build's tiles use AVX-512 VNNI (for reports). */
int fm_has_vnni512(void) {
#ifdef FM_VNNI512
    return 1;
#else
    return 0;
#endif
}

/* The input row a linear layer quantizes, after its prologue:
 * PRO_NONE: x itself; PRO_RMSNORM: x / sqrt(mean(x^2) + eps) * pw (a pre-norm);
 * PRO_SWIGLU: x holds [gate (K) | up (K)], the row is silu(gate) * up. */
enum { PRO_NONE = 0, PRO_RMSNORM = 1, PRO_SWIGLU = 2 };

/* ss[i] = the sum of squares of row lo + i of x, i < hi - lo: each row's sum in order, as one
 * row alone would have it, up to four rows' sums interleaved (four independent chains of adds
 * instead of one at a time: a row's 576 dependent adds are latency-bound). */
static void sums_of_squares(const float *x, int64_t x_stride, int64_t lo, int64_t hi, int64_t K, float *ss) {
    for (int64_t m = lo; m < hi; m += 4) {
        if (m + 1 == hi) { /* a row alone */
            const float *r = x + m * x_stride;
            float s = 0.0f;
            for (int64_t j = 0; j < K; j++) s += r[j] * r[j];
            ss[m - lo] = s;
            break;
        }
        const float *r[4];
        for (int i = 0; i < 4; i++) r[i] = x + (m + i < hi ? m + i : m) * x_stride; /* spare chains repeat row m */
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        for (int64_t j = 0; j < K; j++) {
            s0 += r[0][j] * r[0][j];
            s1 += r[1][j] * r[1][j];
            s2 += r[2][j] * r[2][j];
            s3 += r[3][j] * r[3][j];
        }
        const float s[4] = {s0, s1, s2, s3};
        for (int i = 0; i < 4 && m + i < hi; i++) ss[m + i - lo] = s[i];
    }
}

/* Values [j0, j1) of a row's prologue (x: the row, K values wide; j0 and j1 multiples of 8)
 * into out[0, j1 - j0); ss: the row's sum of squares (sums_of_squares), for PRO_RMSNORM. Each
 * value is computed alike whatever the span it is in. */
static void prologue_span(int prologue, const float *x, int64_t K, int64_t j0, int64_t j1, const float *pw,
                          float eps, float ss, float *out) {
    if (prologue == PRO_RMSNORM) {
        const float scale = 1.0f / sqrtf(ss / (float)K + eps);
        for (int64_t j = j0; j < j1; j++) out[j - j0] = x[j] * scale * pw[j];
    } else { /* PRO_SWIGLU */
        int64_t j = j0;
#ifdef FM_AVX2
        for (; j + 8 <= j1; j += 8)
            _mm256_storeu_ps(out + j - j0, swiglu8(_mm256_loadu_ps(x + j), _mm256_loadu_ps(x + K + j)));
#endif
        for (; j < j1; j++) {
            const float g = x[j];
            out[j - j0] = g / (1.0f + expf(-g)) * x[K + j];
        }
    }
}

/* Bytes of activation buffer (int8 values, scales d, sums s, integer sums) for M rows of nb blocks. */
static size_t xbuf_bytes(int64_t M, int64_t nb) { return (size_t)(M * nb) * (QK + 2 * sizeof(float) + sizeof(int32_t)); }

/* Whether a matrix of N rows uses the R8 tiles, whose x is pre-broadcast (xw, XW_BLOCK bytes a block). */
static int uses_xw(int64_t N) {
#ifdef FM_AVX2
    return fm_row_interleaved(N) == GROUP;
#else
    (void)N;
    return 0;
#endif
}

#define LINEAR_TILE 16 /* output columns per tile of linear_team (its threads' shares are whole tiles) */

/* The output columns [*c0, *c1) thread tid of nth computes in linear_team. */
static inline void column_span(int64_t N, int tid, int nth, int64_t *c0, int64_t *c1) {
    int64_t lo, hi;
    share((N + LINEAR_TILE - 1) / LINEAR_TILE, tid, nth, &lo, &hi);
    *c0 = lo * LINEAR_TILE < N ? lo * LINEAR_TILE : N;
    *c1 = hi * LINEAR_TILE < N ? hi * LINEAR_TILE : N;
}

/* The body of fm_linear, run by each thread tid of a team of nth (see run_team). Buffers come
 * from the caller: xbuf (xbuf_bytes(M, K / QK)); xw (M * nb * XW_BLOCK bytes) where uses_xw(N); scratch
 * (M * N floats) with accumulate; tmp (tmp_stride >= K floats per thread) with a prologue. Ends
 * at a barrier: y is complete for every thread when it returns. */
static void linear_team(int tid, int nth, int type, const uint8_t *w, int64_t N, int64_t K, const float *x,
                        int64_t M, float *y, int prologue, const float *pw, float eps, int accumulate,
                        uint8_t *xbuf, int8_t *xw, float *scratch, float *tmp, int64_t tmp_stride) {
    const int64_t nb = K / QK;
    const int64_t row_bytes = nb * (type == FM_Q4_1 ? Q4_1_BYTES : Q8_0_BYTES);
    const int64_t x_stride = prologue == PRO_SWIGLU ? 2 * K : K;
    int8_t *xq = (int8_t *)xbuf;
    float *xd = (float *)(xbuf + M * nb * QK), *xs = xd + M * nb;
    int32_t *xi = (int32_t *)(xs + M * nb);
    const int interleaved = fm_row_interleaved(N);
    if (!uses_xw(N)) xw = NULL;
    (void)xw; /* read only by the R8 tiles (AVX2 builds) */
    float *mine = tmp ? tmp + tid * tmp_stride : NULL;
    int64_t lo, hi;
    /* quantize the activations (blocks are quantized apart, and a row's prologue needs only that
     * row): whole rows, or, with fewer rows than threads (a lone row: every standard pass), each
     * row in nth parts of its blocks, so that threads do not wait while others quantize (each
     * part's thread sums its row's squares itself: one chain of adds, as for any row alone) */
    const int64_t parts = M < nth ? nth : 1;
    share(M * parts, tid, nth, &lo, &hi);
    float ss[64]; /* this thread's rows' sums of squares, 64 at a time */
    for (int64_t u = lo; u < hi; u++) {
        const int64_t m = u / parts;
        int64_t b0 = 0, b1 = nb;
        if (parts > 1) share(nb, (int)(u % parts), (int)parts, &b0, &b1);
        if (b1 == b0) continue;
        if (prologue == PRO_RMSNORM && (parts > 1 || (u - lo) % 64 == 0))
            sums_of_squares(x, x_stride, m, parts > 1 ? m + 1 : (m + 64 < hi ? m + 64 : hi), K, ss);
        const float *src = x + m * x_stride + b0 * QK;
        if (prologue != PRO_NONE) {
            prologue_span(prologue, x + m * x_stride, K, b0 * QK, b1 * QK, pw, eps,
                          prologue == PRO_RMSNORM ? ss[parts > 1 ? 0 : (u - lo) % 64] : 0.0f, mine);
            src = mine;
        }
        const int64_t at = m * nb + b0;
        quantize_row(src, (b1 - b0) * QK, xq + at * QK, xd + at, xs + at, xi + at);
#ifdef FM_AVX2
        if (xw) broadcast_chunks(xq + at * QK, b1 - b0, xw + at * XW_BLOCK);
#endif
    }
    team_barrier(nth);
    /* tiles of output columns: a tile's weight rows stay in cache while every x row passes */
    const int64_t tile = LINEAR_TILE;
    const int64_t ntiles = (N + tile - 1) / tile;
    float *dst = accumulate ? scratch : y; /* with accumulate: dot products, then added to y row by row */
    share(ntiles, tid, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        const int64_t n0 = t * tile, n1 = n0 + tile < N ? n0 + tile : N;
        int64_t m = 0;
#ifdef FM_VNNI512
        if (interleaved == 16) {
            r16_group(type, w + n0 * row_bytes, nb, M, xq, xd, xs, xi, dst, N, n0);
            m = M; /* done (n1 - n0 == 16: N is a multiple of the tile) */
        }
#endif
#ifdef FM_AVX2
        if (xw) {
            for (int64_t g0 = n0; g0 < n1; g0 += GROUP)
                r8_group(type, w + g0 * row_bytes, nb, M, xw, xd, xs, dst, N, g0);
            m = M; /* done */
        }
#endif
        for (; m < M; m += (M - m >= R ? R : 1)) {
            const int nx = M - m >= R ? R : 1;
            xrow xr[R];
            float out[R];
            for (int r = 0; r < nx; r++) {
                const int64_t row = m + r;
                xr[r].q = xq + row * nb * QK;
                xr[r].d = xd + row * nb;
                xr[r].s = xs + row * nb;
            }
            for (int64_t n = n0; n < n1; n++) {
                dot_rows(type, w + n * row_bytes, nb, xr, nx, out);
                for (int r = 0; r < nx; r++) dst[(m + r) * N + n] = out[r];
            }
        }
        if (accumulate)
            for (int64_t mm = 0; mm < M; mm++)
                for (int64_t n = n0; n < n1; n++) y[mm * N + n] += scratch[mm * N + n];
    }
    team_barrier(nth);
    (void)interleaved;
}

typedef struct {
    int type;
    const uint8_t *w;
    int64_t N, K;
    const float *x;
    int64_t M;
    float *y;
    int prologue;
    const float *pw;
    float eps;
    int accumulate;
    uint8_t *xbuf;
    int8_t *xw;
    float *scratch, *tmp;
    int64_t tmp_stride;
    int64_t *argmax; /* with it: each row's argmax over y's columns (the fused greedy choice) */
    int64_t *part;   /* [team][M]: each thread's argmax over its own columns (-1: it has none) */
} linear_job;

static int64_t argmax_span(const float *row, int64_t n);

static void run_linear(void *ctx, int tid, int nth) {
    const linear_job *j = (const linear_job *)ctx;
    linear_team(tid, nth, j->type, j->w, j->N, j->K, j->x, j->M, j->y, j->prologue, j->pw, j->eps, j->accumulate,
                j->xbuf, j->xw, j->scratch, j->tmp, j->tmp_stride);
    if (!j->argmax || j->M == 0) return;
    /* each thread scans the columns it wrote (still in its own caches), then thread 0 joins the
     * spans in column order: a NaN in an earlier span, else a strictly larger value, wins, so
     * the answer is fm_argmax_rows' (torch.argmax's) for the whole row */
    int64_t c0, c1;
    column_span(j->N, tid, nth, &c0, &c1);
    for (int64_t m = 0; m < j->M; m++)
        j->part[tid * j->M + m] = c1 > c0 ? c0 + argmax_span(j->y + m * j->N + c0, c1 - c0) : -1;
    team_barrier(nth);
    if (tid != 0) return;
    for (int64_t m = 0; m < j->M; m++) {
        const float *row = j->y + m * j->N;
        int64_t at = -1;
        for (int t = 0; t < nth; t++) {
            const int64_t i = j->part[t * j->M + m];
            if (i < 0) continue;
            if (row[i] != row[i]) { at = i; break; } /* the first NaN of the row */
            if (at < 0 || row[i] > row[at]) at = i;
        }
        j->argmax[m] = at < 0 ? 0 : at;
    }
}

/* y[M, N] (=, or += with accumulate) (prologue(x))[M, K] @ W^T, W [N, K] in `type` blocks;
 * with `argmax` (not with accumulate), also argmax[m] = fm_argmax_rows' answer for row m of y.
 * Returns 0, -1 for a bad type or shape, -2 when out of memory. */
int fm_linear(int type, const uint8_t *w, int64_t N, int64_t K, const float *x, int64_t M, float *y,
              int nthreads, int prologue, const float *pw, float eps, int accumulate, int64_t *argmax) {
    if (K % QK != 0 || (type != FM_Q4_1 && type != FM_Q8_0) || prologue < PRO_NONE || prologue > PRO_SWIGLU
        || (argmax && (accumulate || N < 1)))
        return -1;
    const int64_t nb = K / QK;
    if (nthreads < 1) nthreads = 1;
    /* small products run on one thread: a fork and join costs more than they do */
    const int parallel = nthreads > 1 && (M * N * nb >= PARALLEL_MIN_BLOCKS || (M > 1 && M * K >= QUANTIZE_PARALLEL_MIN));
    const int team = parallel ? nthreads : 1;
    uint8_t *xbuf = (uint8_t *)malloc(xbuf_bytes(M, nb));
    int8_t *xw = uses_xw(N) ? (int8_t *)malloc((size_t)(M * nb) * XW_BLOCK) : NULL;
    float *scratch = accumulate ? (float *)malloc((size_t)(M * N) * sizeof(float)) : NULL;
    float *tmp = prologue != PRO_NONE ? (float *)malloc((size_t)(team * K) * sizeof(float)) : NULL;
    int64_t *part = argmax && M > 0 ? (int64_t *)malloc((size_t)(team * M) * sizeof(int64_t)) : NULL;
    int rc = 0;
    if (!xbuf || (uses_xw(N) && !xw) || (accumulate && !scratch) || (prologue != PRO_NONE && !tmp) || (argmax && M > 0 && !part)) {
        rc = -2;
    } else {
        linear_job job = {type, w, N, K, x, M, y, prologue, pw, eps, accumulate, xbuf, xw, scratch, tmp, K, argmax, part};
        run_team(run_linear, &job, team);
    }
    free(part);
    free(tmp);
    free(scratch);
    free(xw);
    free(xbuf);
    return rc;
}

/* Whether every row's position is below max_position and each of the first num_real rows' cache
 * slot below num_slots (what fm_rope_store and fm_blocks check before writing anything). */
static int rope_args_ok(int64_t T, const int64_t *positions, int64_t max_position, const int64_t *slots,
                        int64_t num_real, int64_t num_slots) {
    for (int64_t t = 0; t < T; t++)
        if (positions[t] < 0 || positions[t] >= max_position || (t < num_real && (slots[t] < 0 || slots[t] >= num_slots)))
            return 0;
    return 1;
}

/* The heads [u0, u1) of the pass, counted row by row (row t's q heads, then its k heads, then its v
 * heads): each one's bias added (with `bias`), a q or k head rotated at its row's position, a k
 * or v head of one of the first num_real rows stored at the row's cache slot. Heads are apart,
 * so any split of them between threads gives the same results. */
static void rope_store_heads(float *qkv, int64_t heads, int64_t kv_heads, int64_t head_dim, const float *bias,
                             const float *cos, const float *ssin, const int64_t *positions, const int64_t *slots,
                             int64_t num_real, uint16_t *kc, uint16_t *vc, int64_t u0, int64_t u1) {
    const int64_t per_row = heads + 2 * kv_heads, width = per_row * head_dim, half = head_dim / 2;
    const int64_t kv_width = kv_heads * head_dim;
    float tmp[1024];
    for (int64_t u = u0; u < u1; u++) {
        const int64_t t = u / per_row, h = u % per_row;
        float *x = qkv + t * width + h * head_dim;
        if (bias)
            for (int64_t e = 0; e < head_dim; e++) x[e] += bias[h * head_dim + e];
        if (h < heads + kv_heads) {
            const float *c = cos + positions[t] * head_dim, *s = ssin + positions[t] * head_dim;
            for (int64_t e = 0; e < half; e++) {
                tmp[e] = x[e] * c[e] + x[e + half] * s[e];
                tmp[e + half] = x[e + half] * c[e + half] + x[e] * s[e + half];
            }
            memcpy(x, tmp, (size_t)head_dim * sizeof(float));
        }
        if (h >= heads && t < num_real) {
            const int64_t g = h - heads; /* k heads 0 .. kv_heads - 1, then the v heads */
            uint16_t *dst = g < kv_heads ? kc + slots[t] * kv_width + g * head_dim
                                         : vc + slots[t] * kv_width + (g - kv_heads) * head_dim;
            store_half(dst, x, head_dim);
        }
    }
}

/* Rotary embedding and the KV cache write for one layer, in place on the qkv projection.
 * qkv: [T, (heads + 2 kv_heads) * head_dim] rows (q heads, k heads, v heads); the q and k heads
 * of row t are rotated at positions[t] (rotate-half layout: x * cos + swap_halves(x) * ssin,
 * cos and ssin tables [max_position, head_dim]); rows t < num_real then store their k and v at
 * cache slot slots[t] of kc, vc ([num_slots, kv_heads, head_dim], f16). Returns -1, writing
 * nothing, for a position or slot out of range. */
int fm_rope_store(float *qkv, int64_t T, int64_t heads, int64_t kv_heads, int64_t head_dim,
                  const float *cos, const float *ssin, int64_t max_position, const int64_t *positions,
                  const int64_t *slots, int64_t num_real, uint16_t *kc, uint16_t *vc, int64_t num_slots) {
    if (head_dim % 2 != 0 || head_dim > 1024) return -1;
    if (!rope_args_ok(T, positions, max_position, slots, num_real, num_slots)) return -1;
    rope_store_heads(qkv, heads, kv_heads, head_dim, NULL, cos, ssin, positions, slots, num_real, kc, vc, 0,
                     T * (heads + 2 * kv_heads));
    return 0;
}

#ifdef FM_AVX2
/* The 8 sums of a[0..7]'s lanes, as one vector (lane i: the sum of a[i]); one fixed tree. */
static inline __m256 hsum8x8(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

#define ATTN_Q 3 /* query heads of one row sharing a kv head that read its keys together */

/* Ask for rows[0..n) + next (head_dim f16 values each): a layer's attention read its keys and
 * values from memory at the latency of each miss (the default model, 282 keys, a 1-row pass:
 * 745 us, against 269 us for the same work again at once), while the next layer's are in cache
 * if they were asked for a layer ahead, as this layer's are read. Measured on Zen 5 (profiling
 * build, interleaved, 30 rounds): 1-row attention 685 -> 443 us, 2 rows 780 -> 562, 6 rows
 * 1440 -> 1237; asking for them into L2 only (locality 2) or two layers ahead gained less. */
static inline void prefetch_rows(const uint16_t *const *rows, int n, int64_t next, int64_t head_dim) {
    for (int j = 0; j < n; j++)
        for (int64_t b = 0; b < head_dim * 2; b += 64) __builtin_prefetch((const char *)(rows[j] + next) + b, 0, 3);
}

#ifdef FM_AVX2
/* o[h][e0 ..) = sum_t p[h][t] v_t / sum, for one chunk of up to 64 values of each v_t (from e0
 * on, in the kv head's part at offset `off` of a cache row): its nz 16-value vectors and, if odd, an 8-value one, kept in
 * registers (each output one lane, summed over t in order: the vector width does not change
 * it). The callers pass constant chunk shapes for whole 64-value chunks, so that the loop over
 * keys holds no loop over chunks. */
#ifdef FM_AVX512
static inline __attribute__((always_inline)) void weigh_values16(const int nq, const int nz, const int odd,
                                                                  const uint16_t *v, const int64_t *sl, int64_t n,
                                                                  int64_t stride, int64_t off, int64_t head_dim,
                                                                  int64_t next, float *const *p, const float *inv,
                                                                  float *const *o, int64_t e0) {
    __m512 acc[ATTN_Q][4];
    __m256 rest[ATTN_Q];
    for (int h = 0; h < nq; h++) {
        for (int c = 0; c < 4; c++) acc[h][c] = _mm512_setzero_ps();
        rest[h] = _mm256_setzero_ps();
    }
    for (int64_t t = 0; t < n; t++) {
        const uint16_t *vh = v + sl[t] * stride + off + e0;
        if (next) prefetch_rows(&vh, 1, next, head_dim);
        __m512 w[ATTN_Q];
        for (int h = 0; h < nq; h++) w[h] = _mm512_set1_ps(p[h][t]);
        for (int c = 0; c < nz; c++) {
            const __m512 vv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vh + 16 * c)));
            for (int h = 0; h < nq; h++) acc[h][c] = _mm512_fmadd_ps(w[h], vv, acc[h][c]);
        }
        if (odd) {
            const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vh + 16 * nz)));
            for (int h = 0; h < nq; h++) rest[h] = _mm256_fmadd_ps(_mm512_castps512_ps256(w[h]), vv, rest[h]);
        }
    }
    for (int h = 0; h < nq; h++) {
        const __m512 vi = _mm512_set1_ps(inv[h]);
        for (int c = 0; c < nz; c++) _mm512_storeu_ps(o[h] + e0 + 16 * c, _mm512_mul_ps(acc[h][c], vi));
        if (odd) _mm256_storeu_ps(o[h] + e0 + 16 * nz, _mm256_mul_ps(rest[h], _mm512_castps512_ps256(vi)));
    }
}
#else
/* The same in 8-value vectors, nv of them. */
static inline __attribute__((always_inline)) void weigh_values8(const int nq, const int nv, const uint16_t *v,
                                                                 const int64_t *sl, int64_t n, int64_t stride,
                                                                 int64_t off, int64_t head_dim, int64_t next,
                                                                 float *const *p, const float *inv, float *const *o,
                                                                 int64_t e0) {
    __m256 acc[ATTN_Q][8];
    for (int h = 0; h < nq; h++)
        for (int c = 0; c < 8; c++) acc[h][c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; t++) {
        const uint16_t *vh = v + sl[t] * stride + off + e0;
        if (next) prefetch_rows(&vh, 1, next, head_dim);
        __m256 w[ATTN_Q];
        for (int h = 0; h < nq; h++) w[h] = _mm256_set1_ps(p[h][t]);
        for (int c = 0; c < nv; c++) {
            const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vh + 8 * c)));
            for (int h = 0; h < nq; h++) acc[h][c] = _mm256_fmadd_ps(w[h], vv, acc[h][c]);
        }
    }
    for (int h = 0; h < nq; h++) {
        const __m256 vi = _mm256_set1_ps(inv[h]);
        for (int c = 0; c < nv; c++) _mm256_storeu_ps(o[h] + e0 + 8 * c, _mm256_mul_ps(acc[h][c], vi));
    }
}
#endif
#endif

/* Query heads qh[0..nq) of one row over the same n keys at cache slots sl[0..n) (k, v: f16 rows
 * `stride` values apart, their kv head's part at offset `off`); p[i]: n + 8 floats of scratch;
 * o[i]: head_dim outputs. Each key and value vector is loaded once for all nq heads, and each
 * head's operations are the same as with nq = 1: they depend only on that query, its keys and n.
 * next (0: none): how far, in values, the same keys and values of the next layer are; they are
 * prefetched as these are read, so that the next layer's attention finds them in cache. */
static inline __attribute__((always_inline)) void attend_heads_n(const int nq, const float *const *qh,
                                                                  const uint16_t *k, const uint16_t *v,
                                                                  const int64_t *sl, int64_t n, int64_t stride,
                                                                  int64_t off, int64_t head_dim, float scale,
                                                                  int64_t next, float *const *p, float *const *o) {
#ifdef FM_AVX2
    /* scores, 8 keys at a time (missing keys of the last 8 are zero vectors, never read) */
    __m256 vmax[ATTN_Q];
    for (int h = 0; h < nq; h++) vmax[h] = _mm256_set1_ps(-INFINITY);
    for (int64_t i0 = 0; i0 < n; i0 += 8) {
        const int nk = n - i0 < 8 ? (int)(n - i0) : 8;
        __m256 acc[ATTN_Q][8];
        const uint16_t *kh[8];
#ifdef FM_AVX512
        /* keys 2i and 2i + 1 in the low and high halves of one vector, each half the AVX2 path's
         * 8 lanes of that key's sum (a missing key of the last 8 reads key i0's values; its
         * score is never used) */
        for (int j = 0; j < 8; j++) kh[j] = k + sl[i0 + (j < nk ? j : 0)] * stride + off;
        if (next) prefetch_rows(kh, nk, next, head_dim);
        __m512 pair[ATTN_Q][4];
        for (int h = 0; h < nq; h++)
            for (int j = 0; j < 4; j++) pair[h][j] = _mm512_setzero_ps();
        for (int64_t e = 0; e < head_dim; e += 8) {
            __m512 qv[ATTN_Q];
            for (int h = 0; h < nq; h++) qv[h] = _mm512_broadcast_f32x8(_mm256_loadu_ps(qh[h] + e));
            for (int j = 0; j < 4; j++) {
                const __m256i kk = _mm256_inserti128_si256(
                    _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(kh[2 * j] + e))),
                    _mm_loadu_si128((const __m128i *)(kh[2 * j + 1] + e)), 1);
                const __m512 kv = _mm512_cvtph_ps(kk);
                for (int h = 0; h < nq; h++) pair[h][j] = _mm512_fmadd_ps(qv[h], kv, pair[h][j]);
            }
        }
        for (int h = 0; h < nq; h++)
            for (int j = 0; j < 4; j++) {
                acc[h][2 * j] = _mm512_castps512_ps256(pair[h][j]);
                acc[h][2 * j + 1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(pair[h][j]), 1));
            }
#else
        for (int j = 0; j < nk; j++) kh[j] = k + sl[i0 + j] * stride + off;
        if (next) prefetch_rows(kh, nk, next, head_dim);
        for (int h = 0; h < nq; h++)
            for (int j = 0; j < 8; j++) acc[h][j] = _mm256_setzero_ps();
        /* each (head, key) sum runs over e in order; keys and heads interleave for throughput */
        for (int64_t e = 0; e < head_dim; e += 8) {
            __m256 qv[ATTN_Q];
            for (int h = 0; h < nq; h++) qv[h] = _mm256_loadu_ps(qh[h] + e);
            for (int j = 0; j < nk; j++) {
                const __m256 kv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kh[j] + e)));
                for (int h = 0; h < nq; h++) acc[h][j] = _mm256_fmadd_ps(qv[h], kv, acc[h][j]);
            }
        }
#endif
        for (int h = 0; h < nq; h++) {
            const __m256 s = _mm256_mul_ps(hsum8x8(acc[h]), _mm256_set1_ps(scale));
            if (nk == 8) {
                _mm256_storeu_ps(p[h] + i0, s);
                vmax[h] = _mm256_max_ps(vmax[h], s);
            } else {
                float tmp[8];
                _mm256_storeu_ps(tmp, s);
                for (int j = 0; j < nk; j++) { p[h][i0 + j] = tmp[j]; }
                for (int j = nk; j < 8; j++) tmp[j] = -INFINITY;
                vmax[h] = _mm256_max_ps(vmax[h], _mm256_loadu_ps(tmp));
            }
        }
    }
    float inv[ATTN_Q];
    for (int h = 0; h < nq; h++) {
        float mx8[8];
        _mm256_storeu_ps(mx8, vmax[h]);
        float mx = mx8[0];
        for (int j = 1; j < 8; j++) mx = mx8[j] > mx ? mx8[j] : mx;
        /* weights e^(s - max) and their sum (lane sums in one order, then the lanes) */
        const __m256 vm = _mm256_set1_ps(mx);
        __m256 vsum = _mm256_setzero_ps();
        float *ph = p[h];
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 w = exp8(_mm256_sub_ps(_mm256_loadu_ps(ph + i), vm));
            _mm256_storeu_ps(ph + i, w);
            vsum = _mm256_add_ps(vsum, w);
        }
        if (i < n) {
            float tmp[8];
            for (int j = 0; j < 8; j++) tmp[j] = i + j < n ? ph[i + j] : -INFINITY;
            const __m256 w = exp8(_mm256_sub_ps(_mm256_loadu_ps(tmp), vm));
            _mm256_storeu_ps(tmp, w);
            for (int64_t j = 0; i + j < n; j++) ph[i + j] = tmp[j];
            vsum = _mm256_add_ps(vsum, w);  /* lanes past n are e^-inf = 0 */
        }
        inv[h] = 1.0f / hsum8(vsum);
    }
    /* o = sum_i w_i v_i / sum, 64 outputs at a time (see weigh_values16) */
#ifdef FM_AVX512
    for (int64_t e0 = 0; e0 < head_dim; e0 += 64) {
        const int nv = head_dim - e0 < 64 ? (int)(head_dim - e0) / 8 : 8; /* 8-value chunks */
        if (nv == 8) weigh_values16(nq, 4, 0, v, sl, n, stride, off, head_dim, e0 == 0 ? next : 0, p, inv, o, e0);
        else weigh_values16(nq, nv / 2, nv % 2, v, sl, n, stride, off, head_dim, e0 == 0 ? next : 0, p, inv, o, e0);
    }
#else
    for (int64_t e0 = 0; e0 < head_dim; e0 += 64) {
        const int nv = head_dim - e0 < 64 ? (int)(head_dim - e0) / 8 : 8;
        if (nv == 8) weigh_values8(nq, 8, v, sl, n, stride, off, head_dim, e0 == 0 ? next : 0, p, inv, o, e0);
        else weigh_values8(nq, nv, v, sl, n, stride, off, head_dim, e0 == 0 ? next : 0, p, inv, o, e0);
    }
#endif
#else
    for (int h = 0; h < nq; h++) {
        float mx = -INFINITY, *ph = p[h], *oh = o[h];
        for (int64_t i = 0; i < n; i++) {
            const uint16_t *kh = k + sl[i] * stride + off;
            if (next && h == 0) prefetch_rows(&kh, 1, next, head_dim);
            float s = 0.0f;
            for (int64_t e = 0; e < head_dim; e++) s += qh[h][e] * half_to_float(kh[e]);
            ph[i] = s * scale;
            mx = ph[i] > mx ? ph[i] : mx;
        }
        float sum = 0.0f;
        for (int64_t i = 0; i < n; i++) { ph[i] = expf(ph[i] - mx); sum += ph[i]; }
        const float inv = 1.0f / sum;
        for (int64_t e = 0; e < head_dim; e++) oh[e] = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            const uint16_t *vh = v + sl[i] * stride + off;
            if (next && h == 0) prefetch_rows(&vh, 1, next, head_dim);
            for (int64_t e = 0; e < head_dim; e++) oh[e] += ph[i] * half_to_float(vh[e]);
        }
        for (int64_t e = 0; e < head_dim; e++) oh[e] *= inv;
    }
#endif
}

/* nq as a constant in each copy: the partial sums stay in registers */
static void attend_heads(int nq, const float *const *qh, const uint16_t *k, const uint16_t *v, const int64_t *sl,
                         int64_t n, int64_t stride, int64_t off, int64_t head_dim, float scale, int64_t next,
                         float *const *p, float *const *o) {
    if (nq == 3) attend_heads_n(3, qh, k, v, sl, n, stride, off, head_dim, scale, next, p, o);
    else if (nq == 2) attend_heads_n(2, qh, k, v, sl, n, stride, off, head_dim, scale, next, p, o);
    else attend_heads_n(1, qh, k, v, sl, n, stride, off, head_dim, scale, next, p, o);
}

/* The end of the segment of rows starting at r0: rows reading the same keys, one more each. */
static int64_t segment_end(const int64_t *offsets, const int64_t *lengths, int64_t rows, int64_t r0) {
    int64_t r = r0 + 1;
    while (r < rows && offsets[r] == offsets[r0] && lengths[r] == lengths[r - 1] + 1) r++;
    return r;
}

/* The body of fm_attn_rows, run by each thread of a team (see linear_team); scratch: per thread ATTN_Q * (max_len + 8) floats, max_len the longest row.
 * Ends at a barrier. */
static void attn_team(int tid, int nth, const float *q, int64_t q_stride, const uint16_t *k, const uint16_t *v, const int64_t *slots,
                      const int64_t *offsets, const int64_t *lengths, int64_t rows, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, float scale, float *out, float *scratch, int64_t max_len,
                      int64_t next) {
    const int64_t group = heads / kv_heads, stride = kv_heads * head_dim;
    float *mine = scratch + tid * ATTN_Q * (max_len + 8);
    /* the threads share the (row, query head) pairs evenly (one row's 9 heads: 5 and 4, not
     * two kv heads' 6 and one's 3); a task is up to ATTN_Q of a thread's heads of one row that
     * share a kv head. A head's operations do not depend on which heads it goes with. Within a
     * segment (rows reading the same keys, as a request's drafts do) the pairs go kv head by kv
     * head, so that a thread reads fewer kv heads' keys, and reads them for row after row. */
    int64_t lo, hi;
    share(rows * heads, tid, nth, &lo, &hi);
    int64_t r0 = 0, r1 = segment_end(offsets, lengths, rows, 0); /* the segment's rows [r0, r1) */
    for (int64_t u = lo; u < hi;) {
        while (u >= r1 * heads) { r0 = r1; r1 = segment_end(offsets, lengths, rows, r0); }
        const int64_t in_seg = u - r0 * heads, per_kv = (r1 - r0) * group;
        const int64_t g = in_seg / per_kv, r = r0 + in_seg % per_kv / group, h0 = g * group + in_seg % group;
        int64_t end = (g + 1) * group; /* the kv head's last query head + 1 */
        if (end > h0 + ATTN_Q) end = h0 + ATTN_Q;
        if (end > h0 + hi - u) end = h0 + hi - u;
        const int nq = (int)(end - h0);
        const float *qh[ATTN_Q];
        float *p[ATTN_Q], *o[ATTN_Q];
        for (int i = 0; i < nq; i++) {
            qh[i] = q + r * q_stride + (h0 + i) * head_dim;
            p[i] = mine + i * (max_len + 8);
            o[i] = out + (r * heads + h0 + i) * head_dim;
        }
        /* the next layer's keys and values are asked for by the thread that will read them there (the
         * same share): by its last row of the segment reading this kv head (rows read more keys in
         * turn); the same heads of the next row are the pair `group` on */
        const int last = r + 1 == r1 || u + group >= hi;
        attend_heads(nq, qh, k, v, slots + offsets[r], lengths[r], stride, g * head_dim, head_dim, scale,
                     last ? next : 0, p, o);
        u += nq;
    }
    team_barrier(nth);
}

typedef struct {
    const float *q;
    int64_t q_stride;
    const uint16_t *k, *v;
    const int64_t *slots, *offsets, *lengths;
    int64_t rows, heads, kv_heads, head_dim;
    float scale;
    float *out, *scratch;
    int64_t max_len;
} attn_job;

static void run_attn(void *ctx, int tid, int nth) {
    const attn_job *j = (const attn_job *)ctx;
    attn_team(tid, nth, j->q, j->q_stride, j->k, j->v, j->slots, j->offsets, j->lengths, j->rows, j->heads,
              j->kv_heads, j->head_dim, j->scale, j->out, j->scratch, j->max_len, 0);
}

/* Whether the attention kernel can take these heads: kv heads dividing the query heads, a head
 * size in whole 8-float vectors. */
static int attn_shape_ok(int64_t heads, int64_t kv_heads, int64_t head_dim) {
    return kv_heads >= 1 && heads % kv_heads == 0 && head_dim % 8 == 0;
}

/* The longest of `rows` lengths, or -1 if one is below 1. */
static int64_t longest(const int64_t *lengths, int64_t rows) {
    int64_t max_len = 0;
    for (int64_t r = 0; r < rows; r++) {
        if (lengths[r] < 1) return -1;
        max_len = lengths[r] > max_len ? lengths[r] : max_len;
    }
    return max_len;
}

/* Attention over the paged KV cache, one query row at a time.
 * q: rows `q_stride` floats apart, each [heads, head_dim] (head_dim a multiple of 8); k, v: one
 * layer's cache [slots, kv_heads, head_dim] in f16; slots: the cache slot of each key position;
 * row r attends to positions [0, lengths[r]) whose slots start at slots + offsets[r]; out:
 * [rows, heads, head_dim]. Each (row, head) is computed by the same operations whatever else
 * is in the batch and however the work is split between threads. */
int fm_attn_rows(const float *q, int64_t q_stride, const uint16_t *k, const uint16_t *v, const int64_t *slots,
                 const int64_t *offsets, const int64_t *lengths, int64_t rows, int64_t heads,
                 int64_t kv_heads, int64_t head_dim, float scale, float *out, int nthreads) {
    if (!attn_shape_ok(heads, kv_heads, head_dim)) return -1;
    const int64_t max_len = longest(lengths, rows);
    if (max_len < 0) return -1;
    int64_t work = 0;
    for (int64_t r = 0; r < rows; r++) work += lengths[r];
    const int64_t tasks = rows * kv_heads * ((heads / kv_heads + ATTN_Q - 1) / ATTN_Q);
    if (nthreads < 1) nthreads = 1;
    const int parallel = nthreads > 1 && tasks > 1 && work * heads * head_dim >= PARALLEL_MIN_ATTN;
    const int team = parallel ? nthreads : 1;
    float *scratch = (float *)malloc((size_t)(team * ATTN_Q * (max_len + 8)) * sizeof(float));
    if (!scratch) return -2;
    attn_job job = {q, q_stride, k, v, slots, offsets, lengths, rows, heads, kv_heads, head_dim, scale, out, scratch,
                    max_len};
    run_team(run_attn, &job, team);
    free(scratch);
    return 0;
}

/* The transformer blocks of one pass, all in here: per layer, qkv = (RMS-norm x) W_qkv (+ bias),
 * rope and the KV-cache write, attention of every row over its keys (see fm_attn_rows), x +=
 * attn W_o, x += SwiGLU((RMS-norm x) W_gate_up) W_down. The same functions, in the same order,
 * as calling them one by one, so results are identical; one call instead of six per layer.
 * layers: [num_layers][FM_LAYER_FIELDS] int64: the packed weights of qkv, o, gate_up, down
 * (pointers), their ggml types, the two norm weights (pointers) and the qkv bias (0: none).
 * dims: hidden, heads, kv_heads, head_dim, intermediate, max_position, num_slots.
 * kc, vc: the caches [num_layers][num_slots][kv_heads][head_dim], f16; kv_slots [num_kv]. x [T, hidden]
 * is updated in place. Returns 0, -1 (writing nothing) for a key slot or range, a position or a
 * row's cache slot out of bounds, or -2 when out of memory. */
enum { FM_QKV_W, FM_O_W, FM_GU_W, FM_DOWN_W, FM_QKV_T, FM_O_T, FM_GU_T, FM_DOWN_T, FM_ATTN_NORM, FM_MLP_NORM,
       FM_QKV_BIAS, FM_LAYER_FIELDS };

typedef struct {
    const int64_t *layers;
    int64_t num_layers, H, heads, kv_heads, hd, I, nqkv, cache_stride, widest, max_len;
    float eps, scale;
    float *x;
    int64_t T;
    const float *cos, *ssin;
    const int64_t *positions, *slots;
    int64_t num_real;
    uint16_t *kc, *vc;
    const int64_t *kv_slots, *offsets, *lengths;
    float *qkv, *att, *gu, *sum, *tmp, *scores;
    uint8_t *xbuf;
    int8_t *xw;
} blocks_job;

/* Every layer of the pass, by each thread of the team: the steps in order, a barrier after each. */
static void run_blocks(void *ctx, int tid, int nth) {
    blocks_job *j = (blocks_job *)ctx;
    const int64_t T = j->T, H = j->H, hd = j->hd, I = j->I, heads = j->heads, nqkv = j->nqkv;
    for (int64_t l = 0; l < j->num_layers; l++) {
        const int64_t *L = j->layers + l * FM_LAYER_FIELDS;
        uint16_t *kl = j->kc + l * j->cache_stride, *vl = j->vc + l * j->cache_stride;
        linear_team(tid, nth, (int)L[FM_QKV_T], (const uint8_t *)L[FM_QKV_W], nqkv, H, j->x, T, j->qkv, PRO_RMSNORM,
                    (const float *)L[FM_ATTN_NORM], j->eps, 0, j->xbuf, j->xw, NULL, j->tmp, j->widest);
        /* bias, rope and the cache write, the heads shared between the threads (fm_blocks has
         * checked the positions and slots) */
        int64_t u0, u1;
        share(T * (heads + 2 * j->kv_heads), tid, nth, &u0, &u1);
        rope_store_heads(j->qkv, heads, j->kv_heads, hd, (const float *)L[FM_QKV_BIAS], j->cos, j->ssin, j->positions,
                         j->slots, j->num_real, kl, vl, u0, u1);
        team_barrier(nth);
        /* the next layer's keys, or after the last layer the first one's, for the next pass */
        const int64_t next_layer = (l + 1 < j->num_layers ? 1 : 1 - j->num_layers) * j->cache_stride;
        attn_team(tid, nth, j->qkv, nqkv, kl, vl, j->kv_slots, j->offsets, j->lengths, T, heads, j->kv_heads, hd,
                  j->scale, j->att, j->scores, j->max_len, next_layer);
        linear_team(tid, nth, (int)L[FM_O_T], (const uint8_t *)L[FM_O_W], H, heads * hd, j->att, T, j->x, PRO_NONE,
                    NULL, 0.0f, 1, j->xbuf, j->xw, j->sum, NULL, j->widest);
        linear_team(tid, nth, (int)L[FM_GU_T], (const uint8_t *)L[FM_GU_W], 2 * I, H, j->x, T, j->gu, PRO_RMSNORM,
                    (const float *)L[FM_MLP_NORM], j->eps, 0, j->xbuf, j->xw, NULL, j->tmp, j->widest);
        linear_team(tid, nth, (int)L[FM_DOWN_T], (const uint8_t *)L[FM_DOWN_W], H, I, j->gu, T, j->x, PRO_SWIGLU,
                    NULL, 0.0f, 1, j->xbuf, j->xw, j->sum, j->tmp, j->widest);
    }
}

int fm_blocks(const int64_t *layers, int64_t num_layers, const int64_t *dims, float eps, float scale, float *x,
              int64_t T, const float *cos, const float *ssin, const int64_t *positions, const int64_t *slots,
              int64_t num_real, uint16_t *kc, uint16_t *vc, const int64_t *kv_slots, int64_t num_kv,
              const int64_t *offsets, const int64_t *lengths, int nthreads) {
    const int64_t H = dims[0], heads = dims[1], kv_heads = dims[2], hd = dims[3], I = dims[4];
    for (int64_t i = 0; i < num_kv; i++)
        if (kv_slots[i] < 0 || kv_slots[i] >= dims[6]) return -1;
    for (int64_t t = 0; t < T; t++)
        if (offsets[t] < 0 || lengths[t] < 1 || offsets[t] + lengths[t] > num_kv) return -1;
    if (!attn_shape_ok(heads, kv_heads, hd) || H % QK || (heads * hd) % QK || I % QK || hd > 1024) return -1;
    if (!rope_args_ok(T, positions, dims[5], slots, num_real, dims[6])) return -1;
    for (int64_t l = 0; l < num_layers; l++) {
        const int64_t *L = layers + l * FM_LAYER_FIELDS;
        for (int f = FM_QKV_T; f <= FM_DOWN_T; f++)
            if (L[f] != FM_Q4_1 && L[f] != FM_Q8_0) return -1;
    }
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_TEAM) nthreads = MAX_TEAM;
    blocks_job j = {.layers = layers, .num_layers = num_layers, .H = H, .heads = heads, .kv_heads = kv_heads,
                    .hd = hd, .I = I, .eps = eps, .scale = scale,
                    .x = x, .T = T, .cos = cos, .ssin = ssin, .positions = positions, .slots = slots,
                    .num_real = num_real, .kc = kc, .vc = vc, .kv_slots = kv_slots, .offsets = offsets,
                    .lengths = lengths};
    j.nqkv = (heads + 2 * kv_heads) * hd;
    j.cache_stride = dims[6] * kv_heads * hd;
    j.max_len = longest(lengths, T);
    j.widest = H > heads * hd ? H : heads * hd; /* the most values a layer's input row has */
    j.widest = j.widest > I ? j.widest : I;
    /* every buffer of the pass, made once: the layers' outputs, the quantized activations (the
     * widest input), pre-broadcast x for R8 tiles, the residual adds' products, and per thread a
     * prologue row and attention scores */
    j.qkv = (float *)malloc((size_t)(T * j.nqkv + T * heads * hd + T * 2 * I) * sizeof(float));
    j.att = j.qkv ? j.qkv + T * j.nqkv : NULL;
    j.gu = j.att ? j.att + T * heads * hd : NULL;
    j.xbuf = (uint8_t *)malloc(xbuf_bytes(T, j.widest / QK));
    const int xw_needed = uses_xw(j.nqkv) || uses_xw(H) || uses_xw(2 * I);
    j.xw = xw_needed ? (int8_t *)malloc((size_t)(T * (j.widest / QK)) * XW_BLOCK) : NULL;
    j.sum = (float *)malloc((size_t)(T * H) * sizeof(float));
    j.tmp = (float *)malloc((size_t)(nthreads * j.widest) * sizeof(float));
    j.scores = (float *)malloc((size_t)(nthreads * ATTN_Q * (j.max_len + 8)) * sizeof(float));
    int rc = -2;
    if (j.qkv && j.xbuf && (j.xw || !xw_needed) && j.sum && j.tmp && j.scores) {
        /* one team for the whole pass: its threads meet at a barrier after each step */
        run_team(run_blocks, &j, nthreads);
        rc = 0;
    }
    free(j.scores);
    free(j.tmp);
    free(j.sum);
    free(j.xw);
    free(j.xbuf);
    free(j.qkv);
    return rc;
}

/* x[t] = table[ids[t]] for t < rows (rows of `hidden` floats): a pass's input rows, copied from the
 * embedding without a torch call; -1 (nothing written) if an id is not below `vocab`. */
int fm_embed_rows(const float *table, int64_t vocab, int64_t hidden, const int64_t *ids, int64_t rows, float *x) {
    for (int64_t t = 0; t < rows; t++)
        if (ids[t] < 0 || ids[t] >= vocab) return -1;
    for (int64_t t = 0; t < rows; t++) memcpy(x + t * hidden, table + ids[t] * hidden, (size_t)hidden * sizeof(float));
    return 0;
}

/* The index of the largest of row[0..n), the first one where several are equal, or of the
 * first NaN if there is one: torch.argmax's answer, in one vector pass (per lane its largest
 * value and where it first was). */
static int64_t argmax_span(const float *row, int64_t n) {
    float best = -INFINITY;
    int64_t at = -1, j = 0;
    int nan = 0;
#ifdef FM_AVX2
    if (n >= 8) {
        __m256 m = _mm256_loadu_ps(row), unordered = _mm256_cmp_ps(m, m, _CMP_UNORD_Q);
        __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), cur = idx;
        const __m256i step = _mm256_set1_epi32(8);
        for (j = 8; j + 8 <= n; j += 8) {
            cur = _mm256_add_epi32(cur, step);
            const __m256 v = _mm256_loadu_ps(row + j);
            const __m256 gt = _mm256_cmp_ps(v, m, _CMP_GT_OQ); /* strictly larger: a lane keeps its first */
            m = _mm256_blendv_ps(m, v, gt);
            idx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(idx), _mm256_castsi256_ps(cur), gt));
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        nan = _mm256_movemask_ps(unordered) != 0;
        float lv[8];
        int32_t li[8];
        _mm256_storeu_ps(lv, m);
        _mm256_storeu_si256((__m256i *)li, idx);
        for (int i = 0; i < 8; i++)
            if (lv[i] > best || (lv[i] == best && (at < 0 || li[i] < at))) { best = lv[i]; at = li[i]; }
    }
#endif
    for (; j < n; j++) {
        if (row[j] != row[j]) nan = 1;
        else if (row[j] > best || at < 0) { best = row[j]; at = j; }
    }
    if (nan)
        for (j = 0; j < n; j++)
            if (row[j] != row[j]) { at = j; break; }
    return at < 0 ? 0 : at;
}

/* out[r] = argmax_span of row r of x (rows `stride` floats apart). Serial: the greedy
 * verification of a pass's rows, without starting any thread team. */
void fm_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_span(x + r * stride, n);
}
