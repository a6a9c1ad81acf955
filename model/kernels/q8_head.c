/* The output head for int8 weights in groups of 32 with one float scale each (llama.cpp's Q8_0 grid):
 *
 *     out[b][v] = sum_k (q[v][k] * d[v][k / 32]) * x[b][k]        (float32 throughout)
 *
 * Why a kernel of our own: the head is the widest matrix of a small model (SmolLM2: 49,152 x 576), and
 * torch has no CPU GEMM for group-quantised int8, so it ran in float32, streaming 113 MB for every
 * decode step. Here it reads 28 MB of int8 and 3.5 MB of scales instead.
 *
 * Why it is exact and batch invariant: q * d is exact in float32 for a GGUF's scales (an 8-bit integer
 * times a float16 scale), so the dequantised weights are the float32 head's own values; and every output
 * is one fixed sequence of operations (fused multiply-adds across the vector's lanes in order of k, then
 * the lanes summed in one fixed order), whatever the number of rows, their neighbours or the threads. Register
 * tiles only decide which independent sums run side by side. model/q8_head.py checks both at load.
 *
 * Built at load with the system C compiler, -march=native and -fopenmp (model/native.py); no torch headers.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define GROUP 32
#define BLOCK_V 8 /* weight rows dequantised together into a buffer that stays in L1/L2 */
#define MAX_THREADS 256

/* Vectors as wide as the machine's registers, and register tiles of WR weight rows x XR activation rows:
   AVX-512 has 32 registers of 16 floats (4 x 4 accumulators fit), AVX2 16 registers of 8 (2 x 2). */
#if defined(__AVX512F__)
#define LANES 16
#define WR 4
#define XR 4
#else
#define LANES 8
#define WR 2
#define XR 2
#endif
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef float vf_unaligned __attribute__((vector_size(LANES * 4), aligned(4)));

/* A fixed order either way; with AVX-512, the intrinsic's shuffle tree: a 32-row head 22.7 -> 18.2 ms (Zen 4),
   where extracting 16 lanes one by one for every logit cost ~30% of the multiply-adds. */
static inline float sum_lanes(const vf *a) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)*a);
#else
    float s = 0.f;
    for (int l = 0; l < LANES; l++) s += (*a)[l];
    return s;
#endif
}

/* Dequantise `rows` weight rows (K int8 each, K / 32 scales each) into w. */
static void dequantise(const int8_t *q, const float *d, long K, long rows, float *w) {
    for (long r = 0; r < rows; r++)
        for (long g = 0; g < K / GROUP; g++) {
            const float scale = d[r * (K / GROUP) + g];
            for (int k = 0; k < GROUP; k++) w[r * K + g * GROUP + k] = (float)q[r * K + g * GROUP + k] * scale;
        }
}

/* out[j * V + i] = dot(w row i, x row j) for i < NW, j < NX. */
#define TILE(NAME, NW, NX)                                                                              \
    static void NAME(const float *w, const float *x, float *out, long K, long V) {          \
        vf acc[NW][NX];                                                                                 \
        for (int i = 0; i < NW; i++)                                                                    \
            for (int j = 0; j < NX; j++) acc[i][j] = (vf){0};                                           \
        for (long k = 0; k < K; k += LANES) {                                                           \
            vf xv[NX];                                                                                  \
            for (int j = 0; j < NX; j++) xv[j] = *(const vf_unaligned *)(x + j * K + k);                \
            for (int i = 0; i < NW; i++) {                                                              \
                const vf wv = *(const vf *)(w + i * K + k);                                             \
                for (int j = 0; j < NX; j++) acc[i][j] += wv * xv[j];                                   \
            }                                                                                           \
        }                                                                                               \
        for (int i = 0; i < NW; i++)                                                                    \
            for (int j = 0; j < NX; j++) out[j * V + i] = sum_lanes(&acc[i][j]);                        \
    }
TILE(wide_1, WR, 1) TILE(wide_2, WR, 2) TILE(one_1, 1, 1) TILE(one_2, 1, 2)
#if XR == 4
TILE(wide_3, WR, 3) TILE(wide_4, WR, 4) TILE(one_3, 1, 3) TILE(one_4, 1, 4)
#endif

/* By the number of activation rows: WR weight rows at a time, then one for the rest. */
typedef void (*tile_fn)(const float *, const float *, float *, long, long);
#if XR == 4
static const tile_fn wide[XR + 1] = {0, wide_1, wide_2, wide_3, wide_4};
static const tile_fn narrow[XR + 1] = {0, one_1, one_2, one_3, one_4};
#else
static const tile_fn wide[XR + 1] = {0, wide_1, wide_2};
static const tile_fn narrow[XR + 1] = {0, one_1, one_2};
#endif

typedef struct {
    const int8_t *q;
    const float *d, *x;
    float *out;
    long V, K, B, v0, v1;
    int failed;
} job_t;

static void *run(void *arg) {
    job_t *job = arg;
    const long K = job->K;
    float *w = aligned_alloc(64, sizeof(float) * BLOCK_V * K);
    if (!w) {
        job->failed = 1;
        return 0;
    }
    for (long v = job->v0; v < job->v1; v += BLOCK_V) {
        const long rows = job->v1 - v < BLOCK_V ? job->v1 - v : BLOCK_V;
        dequantise(job->q + v * K, job->d + v * (K / GROUP), K, rows, w);
        for (long b = 0; b < job->B; b += XR) {
            const long nx = job->B - b < XR ? job->B - b : XR;
            const float *x = job->x + b * K;
            float *out = job->out + b * job->V + v;
            long r = 0;
            for (; r + WR <= rows; r += WR) wide[nx](w + r * K, x, out + r, K, job->V);
            for (; r < rows; r++) narrow[nx](w + r * K, x, out + r, K, job->V);
        }
    }
    free(w);
    return 0;
}

/* q: V x K int8; d: V x (K / 32) float; x: B x K float; out: B x V float; all contiguous. Splits the
   vocabulary over `threads` OpenMP threads: torch's own pool (the process has one libgomp), whose threads
   are awake from the layers just before, where threads of our own would wait for them to stop spinning.
   Returns 0, or -1 for bad arguments, -2 when memory could not be had. */
int q8_head(const int8_t *q, const float *d, const float *x, float *out, long V, long K, long B, int threads) {
    if (V < 1 || K < GROUP || K % GROUP || B < 1 || threads < 1 || threads > MAX_THREADS) return -1;
    job_t jobs[MAX_THREADS];
    const long per = ((V + threads - 1) / threads + BLOCK_V - 1) / BLOCK_V * BLOCK_V;
    for (int t = 0; t < threads; t++) {
        const long v0 = t * per < V ? t * per : V, v1 = (t + 1) * per < V ? (t + 1) * per : V;
        jobs[t] = (job_t){q, d, x, out, V, K, B, v0, v1, 0};
    }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) run(&jobs[t]);
    int failed = 0;
    for (int t = 0; t < threads; t++) failed |= jobs[t].failed;
    return failed ? -2 : 0;
}

/* How many threads a parallel region of `threads` gets here: 1 when built without OpenMP. */
int q8_head_threads(int threads) {
    int got = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#pragma omp single
    got = omp_get_num_threads();
#endif
    return got;
}
