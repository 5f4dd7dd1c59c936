/* Fused elementwise maps of megatron_shaping (CPU): one pass per tensor, in place, no temporary.
 *
 * Built by megatron_shaping/stats/kernels.py with the system C compiler into a shared library
 * (called through ctypes on raw data pointers, entry point ms_run). On x86-64 each loop is also
 * compiled for AVX2+FMA and AVX-512 and chosen at run time by the CPU (ms_level). Storage dtypes: fp32, bf16, fp16 (dtype codes
 * 0, 1, 2); a 16-bit value is widened to fp32 exactly, the map runs in fp32 and the result is
 * rounded once (round to nearest even) on write, as widen -> fp32 op -> copy_ back does.
 * With a loss scale ls != 1 the value is divided by (float)ls before the map and multiplied
 * by it after, both in fp32.
 *
 * Every element goes through the same IEEE operations whatever its position, vector width or
 * clone (no fast-math, -ffp-contract=off: no implicit FMA contraction, only the explicit fmaf):
 * the result of an element does not depend on how a tensor is split into shards, nor on the CPU.
 *
 *   power:      x <- copysign(coef * |x|^alpha, x) for 0 < alpha <= 1, computed in float64
 *               (own log2 / exp2, minimax polynomials with explicit FMAs, relative error
 *               below 2.1e-9 before the one rounding to fp32, i.e. below 0.04 ulp: at most
 *               1 ulp from the correctly rounded value, equal to it except within 0.04 ulp
 *               of a halfway point, about 1.4 % of inputs); x = 0 -> x, inf -> inf,
 *               NaN -> NaN. Needs hardware FMA: not run by the x86-64 baseline variant, nor
 *               for an exponent outside (0, 1] (ms_run returns 1: the caller takes torch's pow).
 *   shrink2:    x <- clamp(x, -bound, bound) (bound = inf: no clamp), then
 *               x * (1 / sqrt(fma(invT2 * x, x, 1))), the operations of ShrinkMap's p = 2 path
 *               as torch runs them on AVX2 / AVX-512 (addcmul contracted to an FMA, rsqrt as
 *               1 / sqrt); fmaf is exact everywhere (in software on a CPU without FMA).
 *   clamp:      x <- min(max(x, -clip), clip).
 *
 * Statistics (entry point ms_sums, read only): for runs of k chunks of ``len`` elements, the
 * float64 partials sum x^2 and/or sum |x| of every chunk. A stored value is widened exactly to
 * fp32 and then to float64; x*x of an fp32 value is exact in float64 (24-bit significands give
 * a 48-bit product, and 2^-298 <= x^2 <= 2^256 stays a normal double), so the square needs no
 * rounding and no exact recomputation: a float64 sum of up to 2^60 such squares can neither
 * overflow nor lose a nonzero square to underflow. The same exactness makes an FMA and a
 * multiply-then-add give the same bits (the flags keep contraction off anyway). Every chunk is
 * summed in MS_LANES float64 lanes, element i of the chunk (counted from the chunk's first
 * element, not from an address) into lane i % MS_LANES in order, and the lanes are combined in
 * one fixed tree: a partial depends only on the chunk's values, never on the instruction set,
 * the alignment or where the chunk lies. inf and NaN propagate (inf -> inf, NaN -> NaN; all
 * terms are >= 0, so inf - inf cannot occur). ms_clamp_sums takes, in the same chunks, lanes
 * and tree, the sums of squares of x and of the value the clamp map would store for x (value
 * clipping's sums after its map, from the first pass: bit for bit a pass after the map).
 * ms_run_sums maps and takes ms_sums' partials of what it stored, chunk by chunk in L1 (the
 * statistics pass after a map, in the map's call).
 *
 * Row factors (entry point ms_rows, in place): AGC's unit factors on slices of rows, each
 * element times its row's float64 factor rounded to fp32, in fp32, rounded once on store.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define MS_X86 1
#define MS_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#define MS_AVX2 __attribute__((target("avx2,fma")))
#endif
#define MS_INLINE static inline __attribute__((always_inline))

MS_INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
MS_INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
MS_INLINE uint64_t d2u(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }
MS_INLINE double u2d(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }

/* bf16 <-> fp32: exact widening; rounding to nearest even (c10::BFloat16's rule) */
MS_INLINE float bf16_load(uint16_t h) { return u2f((uint32_t)h << 16); }
MS_INLINE uint16_t bf16_store(float f) {
    uint32_t u = f2u(f);
    uint16_t r = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : r;
}

/* fp16 <-> fp32: exact widening; rounding to nearest even (the FP16 library's, as c10::Half) */
MS_INLINE float fp16_load(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
    uint32_t bits = two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized);
    return u2f(sign | bits);
}
MS_INLINE uint16_t fp16_store(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t w = f2u(f), shl1_w = w + w, sign = w & 0x80000000u, bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = u2f((bias >> 1) + 0x07800000u) + base;
    uint32_t bits = f2u(base);
    uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* coef * |x|^alpha in float64, rounded once to fp32 (sign of x restored); 0 < alpha <= 1
 * (ms_power_ok), so that for finite x the exponent y = alpha * log2|x| lies in [-150, 129]
 * and 2^n below is a normal double without clamping. Polynomials: minimax fits (Lawson's
 * algorithm, 40-digit reference) of log2((1+s)/(1-s)) / s in s^2 on |s| <= 3 - 2 sqrt2
 * (absolute error 1.7e-10) and of 2^f on |f| <= 1/2 (relative error 1.9e-9). */
MS_INLINE float power_one(float x, double alpha, double coef) {
    double ax = fabs((double)x);                   /* every fp32 value, subnormals too, is a normal double */
    /* ax = 2^e * m with m in [1/sqrt2, sqrt2): adding bits(1.0) - bits(1/sqrt2) to the bits
     * carries into the exponent field exactly when the significand is >= sqrt2 (no compare,
     * no blend); m keeps the significand, its exponent set to 0 or -1 accordingly */
    uint64_t b = d2u(ax) + 0x00095F619980C433ull;
    double e = u2d(0x4330000000000000ull | (b >> 52)) - 0x1.0p52 - 1023.0;
    double m = u2d(d2u(ax) - (b & 0xFFF0000000000000ull) + 0x3FF0000000000000ull);
    double s = (m - 1.0) / (m + 1.0), z = s * s;                          /* |s| <= 0.1716 */
    double p = 0.43425657546762636;                /* log2(m) = s * p(s^2) */
    p = fma(p, z, 0.5765845133047386);
    p = fma(p, z, 0.9618007595587829);
    p = fma(p, z, 2.885390072751113);
    double y = alpha * fma(s, p, e);
    double t = y + 0x1.8p52;                                    /* round to an integer n */
    double n = t - 0x1.8p52, f = y - n;                         /* |f| <= 0.5 */
    double scale = u2d((d2u(t) + 1023ull) << 52);               /* 2^n */
    double q = 0.00015345822188949157;             /* 2^f */
    q = fma(q, f, 0.001339993564599816);
    q = fma(q, f, 0.00961848896137353);
    q = fma(q, f, 0.055503287661323446);
    q = fma(q, f, 0.240226468902073);
    q = fma(q, f, 0.6931472057421797);
    q = fma(q, f, 1.0000000005542775);
    float r = (float)(coef * (q * scale));
    r = ax == 0.0 ? 0.0f : r;
    r = ax == (double)INFINITY ? INFINITY : r;     /* inf^alpha = inf (y above was not clamped) */
    r = x != x ? x : r;
    return copysignf(r, x);
}

/* the exponents of the tensors the power map runs on (every one; with ``on``, those with
 * on[k] = 1) are in its domain (0, 1] (NaN is not) */
static int ms_power_ok(long nt, const double *alpha, const unsigned char *on) {
    for (long k = 0; k < nt; k++)
        if ((!on || on[k] == 1) && !(alpha[k] > 0.0 && alpha[k] <= 1.0))
            return 0;
    return 1;
}

MS_INLINE float shrink2_one(float x, float invT2, float bound) {
    x = x < -bound ? -bound : x;
    x = x > bound ? bound : x;
    float t = fmaf(invT2 * x, x, 1.0f);          /* as torch's addcmul on AVX2 / AVX-512 (an FMA) */
    return x * (1.0f / sqrtf(t));
}

MS_INLINE float clamp_one(float x, float clip) {
    x = x < -clip ? -clip : x;
    return x > clip ? clip : x;
}

/* one loop per (map, storage dtype, instruction set); the loss scale divides before and
 * multiplies after */
#define MS_LOOPS(NAME, T, LOAD, STORE, ATTR)                                                    \
ATTR static void power_##NAME(void *p, long n, double alpha, double coef, float ls) {         \
    T *d = (T *)p;                                                                              \
    if (ls == 1.0f) { for (long i = 0; i < n; i++) d[i] = STORE(power_one(LOAD(d[i]), alpha, coef)); } \
    else { for (long i = 0; i < n; i++) d[i] = STORE(power_one(LOAD(d[i]) / ls, alpha, coef) * ls); } \
}                                                                                               \
ATTR static void shrink2_##NAME(void *p, long n, double invT2, double bound, float ls) {      \
    T *d = (T *)p;                                                                              \
    float i2 = (float)invT2, b = (float)bound;                                                  \
    if (ls == 1.0f) { for (long i = 0; i < n; i++) d[i] = STORE(shrink2_one(LOAD(d[i]), i2, b)); } \
    else { for (long i = 0; i < n; i++) d[i] = STORE(shrink2_one(LOAD(d[i]) / ls, i2, b) * ls); } \
}                                                                                               \
ATTR static void clamp_##NAME(void *p, long n, double clip, double unused, float ls) {        \
    T *d = (T *)p;                                                                              \
    float c = (float)clip;                                                                      \
    (void)unused;                                                                               \
    if (ls == 1.0f) { for (long i = 0; i < n; i++) d[i] = STORE(clamp_one(LOAD(d[i]), c)); }   \
    else { for (long i = 0; i < n; i++) d[i] = STORE(clamp_one(LOAD(d[i]) / ls, c) * ls); }     \
}

#define MS_F32_LOAD(v) (v)
#define MS_F32_STORE(v) (v)
#define MS_ALL(SUFFIX, ATTR)                                                                    \
MS_LOOPS(f32##SUFFIX, float, MS_F32_LOAD, MS_F32_STORE, ATTR)                                  \
MS_LOOPS(bf16##SUFFIX, uint16_t, bf16_load, bf16_store, ATTR)                                  \
MS_LOOPS(f16##SUFFIX, uint16_t, fp16_load, fp16_store, ATTR)

typedef void (*ms_loop)(void *, long, double, double, float);
/* [instruction set][map: power, shrink2, clamp][dtype: fp32, bf16, fp16] */
MS_ALL(_base, )
#ifdef MS_X86
MS_ALL(_avx2, MS_AVX2)
MS_ALL(_avx512, MS_AVX512)
#define MS_TABLE(S) {{power_f32##S, power_bf16##S, power_f16##S}, {shrink2_f32##S, shrink2_bf16##S, shrink2_f16##S}, \
                     {clamp_f32##S, clamp_bf16##S, clamp_f16##S}}
static const ms_loop ms_loops[3][3][3] = {MS_TABLE(_base), MS_TABLE(_avx2), MS_TABLE(_avx512)};
#else
#define MS_TABLE(S) {{power_f32##S, power_bf16##S, power_f16##S}, {shrink2_f32##S, shrink2_bf16##S, shrink2_f16##S}, \
                     {clamp_f32##S, clamp_bf16##S, clamp_f16##S}}
static const ms_loop ms_loops[1][3][3] = {MS_TABLE(_base)};
#endif

/* ------------------------------------------------------------------------ statistics (ms_sums)
 * MS_SUMS_CONTROL (tests only, never in the library the package builds): 1 accumulates the
 * lanes in fp32 (precision lost), 2 peels the elements before the first 16-element-aligned
 * address into lane 0 and aligns the lanes to the address (a partial that depends on where its
 * chunk lies). */
#define MS_LANES 16
#ifndef MS_SUMS_CONTROL
#define MS_SUMS_CONTROL 0
#endif
#if MS_SUMS_CONTROL == 1
typedef float ms_acc;
#else
typedef double ms_acc;
#endif

MS_INLINE double ms_tree(const ms_acc *a) {
    double b[8], c[4];
    for (int l = 0; l < 8; l++) b[l] = (double)a[l] + (double)a[l + 8];
    for (int l = 0; l < 4; l++) c[l] = b[l] + b[l + 4];
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* One chunk: SQ and/or AB (compile-time 0/1) partials of the n values at p. */
#define MS_CHUNK(NAME, T, LOAD, SQ, AB, ATTR)                                                  \
ATTR static void NAME(const void *p, long n, double *sq, double *ab) {                         \
    const T *d = (const T *)p;                                                                  \
    ms_acc s[MS_LANES] = {0}, a[MS_LANES] = {0};                                                \
    long i = 0, off = MS_SUMS_CONTROL == 2 ? (long)(((uintptr_t)d / sizeof(T)) % MS_LANES) : 0; \
    for (; off && i < n && (off + i) % MS_LANES; i++) {  /* control 2: peeled into lane 0 */   \
        double v = (double)LOAD(d[i]);                                                          \
        if (SQ) s[0] += v * v;                                                                  \
        if (AB) a[0] += fabs(v);                                                                \
    }                                                                                           \
    for (; i + MS_LANES <= n; i += MS_LANES) {                                                  \
        for (int l = 0; l < MS_LANES; l++) {                                                    \
            double v = (double)LOAD(d[i + l]);                                                  \
            if (SQ) s[l] += v * v;                                                              \
            if (AB) a[l] += fabs(v);                                                            \
        }                                                                                       \
    }                                                                                           \
    for (int l = 0; i + l < n; l++) {                                                           \
        double v = (double)LOAD(d[i + l]);                                                      \
        if (SQ) s[l] += v * v;                                                                  \
        if (AB) a[l] += fabs(v);                                                                \
    }                                                                                           \
    if (SQ) *sq = ms_tree(s);                                                                   \
    if (AB) *ab = ms_tree(a);                                                                   \
}

/* One chunk: sum w^2, w the value the clamp map stores for x at loss scale 1 (clamp_ loops:
 * STORE(clamp_one(x, c)), widened exactly). For a stored x that is clamp(x, -cb, cb) with
 * cb = STORE(c) widened (rounding is monotone and leaves stored values alone:
 * ClampMap.exact_in_storage), computed here in float64 on the widened value: the sum a pass over
 * the clamped chunk takes, bit for bit (same lanes, same tree), from the unclamped one. One
 * accumulator array, as MS_CHUNK (the compiler vectorises that form, not two sums in one loop;
 * ms_clamp_sums takes sum x^2 by MS_CHUNK's loop while the chunk is in L1). */
#define MS_CHUNK_CL(NAME, T, LOAD, STORE, ATTR)                                                 \
ATTR static void NAME(const void *p, long n, float c, double *csq) {                           \
    const T *d = (const T *)p;                                                                  \
    ms_acc w[MS_LANES] = {0};                                                                   \
    const double cb = (double)LOAD(STORE(c));                                                   \
    long i = 0;                                                                                 \
    for (; i + MS_LANES <= n; i += MS_LANES) {                                                  \
        for (int l = 0; l < MS_LANES; l++) {                                                    \
            double v = (double)LOAD(d[i + l]);                                                  \
            v = v < -cb ? -cb : v;                                                              \
            v = v > cb ? cb : v;                                                                \
            w[l] += v * v;                                                                      \
        }                                                                                       \
    }                                                                                           \
    for (int l = 0; i + l < n; l++) {                                                           \
        double v = (double)LOAD(d[i + l]);                                                      \
        v = v < -cb ? -cb : v;                                                                  \
        v = v > cb ? cb : v;                                                                    \
        w[l] += v * v;                                                                          \
    }                                                                                           \
    *csq = ms_tree(w);                                                                          \
}

typedef void (*ms_chunk_fn)(const void *, long, double *, double *);
typedef void (*ms_clamp_fn)(const void *, long, float, double *);
/* chunk loops per (storage dtype, sum x^2 / sum |x|); both sums of a chunk are taken by two
 * loops over it while it is in L1 (one loop with both vectorises worse: 2.5 vs 2 x 0.8 ms) */
#define MS_SUMS_DT(DT, T, LOAD, STORE, S, ATTR)                                                 \
MS_CHUNK(sq_##DT##S, T, LOAD, 1, 0, ATTR)                                                      \
MS_CHUNK(ab_##DT##S, T, LOAD, 0, 1, ATTR)                                                      \
MS_CHUNK_CL(cl_##DT##S, T, LOAD, STORE, ATTR)
#define MS_SUMS_ALL(S, ATTR)                                                                    \
MS_SUMS_DT(f32, float, MS_F32_LOAD, MS_F32_STORE, S, ATTR)                                     \
MS_SUMS_DT(bf16, uint16_t, bf16_load, bf16_store, S, ATTR)                                     \
MS_SUMS_DT(f16, uint16_t, fp16_load, fp16_store, S, ATTR)
#define MS_SUMS_TABLE(S) {{sq_f32##S, ab_f32##S}, {sq_bf16##S, ab_bf16##S}, {sq_f16##S, ab_f16##S}}
#define MS_CLAMP_TABLE(S) {cl_f32##S, cl_bf16##S, cl_f16##S}
MS_SUMS_ALL(_base, )
#ifdef MS_X86
MS_SUMS_ALL(_avx2, MS_AVX2)
MS_SUMS_ALL(_avx512, MS_AVX512)
static const ms_chunk_fn ms_sums_loops[3][3][2] = {MS_SUMS_TABLE(_base), MS_SUMS_TABLE(_avx2), MS_SUMS_TABLE(_avx512)};
static const ms_clamp_fn ms_clamp_loops[3][3] = {MS_CLAMP_TABLE(_base), MS_CLAMP_TABLE(_avx2), MS_CLAMP_TABLE(_avx512)};
#else
static const ms_chunk_fn ms_sums_loops[1][3][2] = {MS_SUMS_TABLE(_base)};
static const ms_clamp_fn ms_clamp_loops[1][3] = {MS_CLAMP_TABLE(_base)};
#endif

/* The instruction set of this CPU (same operations, same results, wider vectors). */
static int ms_isa = -1;
static int ms_detect(void) {
    int level = 0;
#ifdef MS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = 1;
    if (level == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) level = 2;
#endif
    return level;
}
int ms_level(void) {
    if (ms_isa < 0)
        ms_isa = ms_detect();
    return ms_isa;
}
/* Use at most instruction set ``cap`` (tests compare the variants); returns the one in use. */
int ms_cap_level(int cap) {
    int level = ms_detect();
    ms_isa = cap >= 0 && cap < level ? cap : level;
    return ms_isa;
}

/* Map ``map`` (0 power, 1 shrink2, 2 clamp) on nt tensors (data pointers, lengths, dtype codes
 * 0 fp32 / 1 bf16 / 2 fp16), per-tensor parameters a, b (b unused by clamp), one loss scale.
 * Returns 0 (done), 1 (this map is not run on this CPU, or the power map with an exponent
 * outside (0, 1]: nothing touched), or -1 (an unknown map or dtype code). */
int ms_run(int map, long nt, void **ptrs, const long *lens, const int *dtypes, const double *a,
           const double *b, double ls) {
    int level = ms_level();
    if (map < 0 || map > 2)
        return -1;
#ifdef MS_X86
    if (map == 0 && level == 0)
        return 1;                    /* fma() would be a library call per operation */
#endif
    if (map == 0 && !ms_power_ok(nt, a, NULL))
        return 1;                    /* an exponent outside (0, 1]: torch's pow */
    for (long k = 0; k < nt; k++) {
        if (dtypes[k] < 0 || dtypes[k] > 2)
            return -1;
        ms_loops[level][map][dtypes[k]](ptrs[k], lens[k], a[k], b ? b[k] : 0.0, (float)ls);
    }
    return 0;
}

/* Partials of nr runs: run r is ks[r] chunks of lens[r] elements of tensor rt[r] (data pointer
 * tptrs[rt[r]], dtype code tcodes[rt[r]]) from element starts[r]. Writes sum x^2 to sq and/or
 * sum |x| to ab (either may be NULL, not both), one float64 per chunk in run order. Returns 0,
 * or -1 (an unknown dtype code, nothing asked). */
int ms_sums(long nr, void *const *tptrs, const int *tcodes, const int *rt, const long *starts, const long *ks,
            const long *lens, double *sq, double *ab) {
    int level = ms_level();
    if (!sq && !ab)
        return -1;
    long out = 0;
    for (long r = 0; r < nr; r++) {
        int code = tcodes[rt[r]];
        if (code < 0 || code > 2)
            return -1;
        ms_chunk_fn fsq = ms_sums_loops[level][code][0], fab = ms_sums_loops[level][code][1];
        size_t es = code == 0 ? 4 : 2;
        const char *base = (const char *)tptrs[rt[r]] + (size_t)starts[r] * es;
        for (long j = 0; j < ks[r]; j++, out++) {
            const char *c = base + (size_t)(j * lens[r]) * es;
            if (sq)
                fsq(c, lens[r], sq + out, NULL);
            if (ab)
                fab(c, lens[r], NULL, ab + out);
        }
    }
    return 0;
}

/* Partials of nr runs as ms_sums takes them, of x (sq, may be NULL) and of the values the clamp
 * map stores at loss scale 1 with bound cl[r] for run r (csq; inf: x itself): the premap sums of
 * value clipping from the gradient before it is clamped. Returns 0, or -1 (an unknown dtype code). */
int ms_clamp_sums(long nr, void *const *tptrs, const int *tcodes, const int *rt, const long *starts, const long *ks,
                  const long *lens, const double *cl, double *sq, double *csq) {
    int level = ms_level();
    long out = 0;
    for (long r = 0; r < nr; r++) {
        int code = tcodes[rt[r]];
        if (code < 0 || code > 2)
            return -1;
        ms_clamp_fn f = ms_clamp_loops[level][code];
        ms_chunk_fn fsq = ms_sums_loops[level][code][0];
        size_t es = code == 0 ? 4 : 2;
        const char *base = (const char *)tptrs[rt[r]] + (size_t)starts[r] * es;
        float c = (float)cl[r];                  /* as the clamp_ map loops convert it */
        for (long j = 0; j < ks[r]; j++, out++) {
            const char *chunk = base + (size_t)(j * lens[r]) * es;
            if (sq)
                fsq(chunk, lens[r], sq + out, NULL);
            f(chunk, lens[r], c, csq + out);
        }
    }
    return 0;
}

/* ms_run's map and, from the values it stores, ms_sums' partials of them, in one call (the
 * statistics pass after an elementwise map taken while each chunk is in L1). Tensors k < nt as
 * ms_run (pointer, length, dtype code, per-tensor a, b; one loss scale), on[k] = 0: tensor k is
 * not mapped (an identity map, an empty slice), only read; on[k] = 2: neither mapped nor read,
 * its partials are 0 (a slice left unchanged whose sums the caller already has). Runs as ms_sums (rt[r] indexes the
 * same tensors): every chunk of a run is mapped and then summed by ms_sums' chunk loop (the
 * bits a pass after the map takes), sum x^2 per chunk into sq in run order. The runs of a tensor
 * must tile it ([0, length), no overlap: the caller's table guarantees it); a tensor in no run
 * (whole[k] = 1) is mapped as ms_run maps it. nr = 0: the map alone. Returns 0, 1 (as ms_run:
 * nothing touched) or -1 (an unknown map or dtype code, a run outside its
 * tensor: nothing touched). MS_RUNSUMS_CONTROL (tests only): 1 sums a chunk before mapping it
 * (the partials of the gradient, not of the map's result); 2 reads the chunks of on[k] = 2
 * tensors (their partials taken, not 0). */
#ifndef MS_RUNSUMS_CONTROL
#define MS_RUNSUMS_CONTROL 0
#endif
int ms_run_sums(int map, long nt, void **ptrs, const long *lens, const int *dtypes, const double *a,
                const double *b, const unsigned char *on, const unsigned char *whole, double ls,
                long nr, const int *rt, const long *starts, const long *ks, const long *clens, double *sq) {
    int level = ms_level();
    if (map < 0 || map > 2)
        return -1;
#ifdef MS_X86
    if (map == 0 && level == 0)
        return 1;
#endif
    if (map == 0 && !ms_power_ok(nt, a, on))
        return 1;
    for (long k = 0; k < nt; k++)
        if (dtypes[k] < 0 || dtypes[k] > 2)
            return -1;
    for (long r = 0; r < nr; r++)
        if (rt[r] < 0 || rt[r] >= nt || starts[r] < 0 || ks[r] < 0 || clens[r] < 0
            || starts[r] + ks[r] * clens[r] > lens[rt[r]])
            return -1;
    float fl = (float)ls;
    for (long k = 0; k < nt; k++)
        if (on[k] == 1 && whole[k])
            ms_loops[level][map][dtypes[k]](ptrs[k], lens[k], a[k], b ? b[k] : 0.0, fl);
    long out = 0;
    for (long r = 0; r < nr; r++) {
        long t = rt[r];
        int code = dtypes[t];
        if (on[t] == 2 && MS_RUNSUMS_CONTROL != 2) {
            for (long j = 0; j < ks[r]; j++, out++)
                sq[out] = 0.0;
            continue;
        }
        ms_loop f = on[t] == 1 ? ms_loops[level][map][code] : NULL;
        ms_chunk_fn fsq = ms_sums_loops[level][code][0];
        size_t es = code == 0 ? 4 : 2;
        char *base = (char *)ptrs[t] + (size_t)starts[r] * es;
        for (long j = 0; j < ks[r]; j++, out++) {
            char *c = base + (size_t)(j * clens[r]) * es;
            if (MS_RUNSUMS_CONTROL == 1)
                fsq(c, clens[r], sq + out, NULL);
            if (f)
                f(c, clens[r], a[t], b ? b[t] : 0.0, fl);
            if (MS_RUNSUMS_CONTROL != 1)
                fsq(c, clens[r], sq + out, NULL);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ row factors (ms_rows)
 * AGC's unit factors on slices of rows, in place: element j of a slice lies in row
 * (offset + j) / row_len of its matrix; the slice's first ``head`` = (-offset) mod row_len
 * elements (at most n) are the end of a partial first row, then whole rows, then a partial
 * last row (SliceSet's _row_pieces). Each element is multiplied by its row's factor rounded to
 * fp32 ((float) of the float64 factor, as torch's .to(torch.float32)), in fp32, and rounded
 * once on store: for fp32 the multi-tensor multiply by the fp32 factors, for bf16 / fp16 the
 * widened copy multiplied by them and copied back, bit for bit; no temporary.
 * MS_ROWS_CONTROL (tests only): 1 multiplies by the float64 factor in float64 before the one
 * rounding to fp32 (the factor not rounded to fp32 first); 2 gives the first whole row after a
 * partial head the head's factor (rows off by one). A row whose factor rounds to exactly 1 is
 * not touched (x * 1 is x in fp32, and stores back as the value it was loaded from; a NaN keeps
 * its payload): the multiply of a factor-1 row is skipped, not a pass over it. */
#ifndef MS_ROWS_CONTROL
#define MS_ROWS_CONTROL 0
#endif
#if MS_ROWS_CONTROL == 1
typedef double ms_fac;
#define MS_ROW_MUL(v, c) ((float)((double)(v) * (c)))
#else
typedef float ms_fac;
#define MS_ROW_MUL(v, c) ((v) * (c))
#endif

#define MS_ROWS(NAME, T, LOAD, STORE, ATTR)                                                    \
ATTR static void rows_##NAME(void *p, long n, long head, long row_len, const double *f) {      \
    T *d = (T *)p;                                                                              \
    long i = 0, r = 0;                                                                          \
    if (head > 0) {                                                                             \
        long m = head < n ? head : n;                                                           \
        const ms_fac c = (ms_fac)f[0];                                                          \
        if (c != (ms_fac)1 || MS_ROWS_CONTROL == 3)                                             \
            for (long j = 0; j < m; j++) d[j] = STORE(MS_ROW_MUL(LOAD(d[j]), c));               \
        i = m;                                                                                  \
        r = MS_ROWS_CONTROL == 2 ? 0 : 1;                                                       \
    }                                                                                           \
    for (; i < n; i += row_len, r++) {                                                          \
        long m = n - i < row_len ? n - i : row_len;                                             \
        const ms_fac c = (ms_fac)f[r];                                                          \
        if (c == (ms_fac)1 && MS_ROWS_CONTROL != 3) continue;   /* x * 1 stores x: not touched */ \
        T *q = d + i;                                                                           \
        for (long j = 0; j < m; j++) q[j] = STORE(MS_ROW_MUL(LOAD(q[j]), c));                   \
    }                                                                                           \
}
#define MS_ROWS_ALL(S, ATTR)                                                                    \
MS_ROWS(f32##S, float, MS_F32_LOAD, MS_F32_STORE, ATTR)                                        \
MS_ROWS(bf16##S, uint16_t, bf16_load, bf16_store, ATTR)                                        \
MS_ROWS(f16##S, uint16_t, fp16_load, fp16_store, ATTR)
typedef void (*ms_rows_fn)(void *, long, long, long, const double *);
#define MS_ROWS_TABLE(S) {rows_f32##S, rows_bf16##S, rows_f16##S}
MS_ROWS_ALL(_base, )
#ifdef MS_X86
MS_ROWS_ALL(_avx2, MS_AVX2)
MS_ROWS_ALL(_avx512, MS_AVX512)
static const ms_rows_fn ms_rows_loops[3][3] = {MS_ROWS_TABLE(_base), MS_ROWS_TABLE(_avx2), MS_ROWS_TABLE(_avx512)};
#else
static const ms_rows_fn ms_rows_loops[1][3] = {MS_ROWS_TABLE(_base)};
#endif

/* Row factors on ns slices: slice k is lens[k] elements at ptrs[k] of dtype code codes[k], its
 * first heads[k] elements (0 <= heads[k] < row_lens[k]) the end of a partial row, the factors
 * of its rows float64 factors[firsts[k]], factors[firsts[k] + 1], ... (one vector for all).
 * Returns 0, or -1 (an unknown dtype code or a bad geometry; the slices before it are done). */
int ms_rows(long ns, void *const *ptrs, const int *codes, const long *lens, const long *heads,
            const long *row_lens, const long *firsts, const double *factors) {
    int level = ms_level();
    for (long k = 0; k < ns; k++) {
        if (codes[k] < 0 || codes[k] > 2 || row_lens[k] <= 0 || heads[k] < 0 || heads[k] >= row_lens[k])
            return -1;
        ms_rows_loops[level][codes[k]](ptrs[k], lens[k], heads[k], row_lens[k], factors + firsts[k]);
    }
    return 0;
}
