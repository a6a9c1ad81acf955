/* The output head for int8 weights in groups of 32 with one float scale each (llama.cpp's Q8_0 grid):
 *
 *     out[b][v] = sum_k (q[v][k] * d[v][k / 32]) * x[b][k]        (float32 throughout)
 *
 * Why a kernel of our own: the head is the widest matrix of a small model (SmolLM2: 49,152 x 576), and
 * torch has no CPU GEMM for group-quantised int8, so it ran in float32, streaming 113 MB for every
 * decode step. Here it reads 28 MB of int8 and 3.5 MB of scales instead.
 *
 * Layout: the vocabulary runs across a vector's lanes. model/q8_head.py packs the weights in blocks of
 * LANES vocabulary entries, k-major (block, k, lane), and the scales as (block, group, lane); a register
 * tile is MR activation rows x 2 blocks, one accumulator each, so every multiply-add serves LANES logits
 * and no logit ends with a sum across lanes (the earlier layout, k across the lanes, ended each of them
 * with a 16-lane reduction and ran at a third of its multiply-add bound at 8 rows).
 *
 * Why it is exact and batch invariant: q * d is exact in float32 for a GGUF's scales (an 8-bit integer
 * times a float16 scale), so the dequantised weights are the float32 head's own values; and every output
 * is one fixed chain of fused multiply-adds over k in order, from zero, whatever the number of rows, the
 * tile a row falls in, its neighbours or the threads. model/q8_head.py checks both at load.
 *
 * Needs AVX-512 or AVX2 with FMA (explicit fused multiply-adds: a compiler may not split them); elsewhere
 * the build fails and the head stays float32. Built at load with the system C compiler, -march=native
 * and -fopenmp (model/native.py); no torch headers.
 */
#include <immintrin.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define GROUP 32
#define NB 2 /* vocabulary blocks per register tile */
#define MAX_THREADS 256

#if defined(__AVX512F__)
#define LANES 16
#define MR 8 /* activation rows per register tile: 8 x 2 accumulators of 32 registers */
typedef __m512 vec;
static inline vec load_weights(const int8_t *q, vec scale) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), scale);
}
#define LOAD _mm512_loadu_ps
#define STORE _mm512_storeu_ps
#define ZERO _mm512_setzero_ps
#define BROADCAST _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
#define MR 4 /* 4 x 2 accumulators of 16 registers */
typedef __m256 vec;
static inline vec load_weights(const int8_t *q, vec scale) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q))), scale);
}
#define LOAD _mm256_loadu_ps
#define STORE _mm256_storeu_ps
#define ZERO _mm256_setzero_ps
#define BROADCAST _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#else
#error "q8_head needs AVX-512, or AVX2 with FMA"
#endif

/* out[m][n * LANES + l] for the first `rows` rows of x (rows <= MR), vocabulary blocks `block` and
   `block` + 1. q: (blocks, K, LANES) int8; d: (blocks, K / 32, LANES) float; x: rows x K; out rows V
   apart. The loops over m and n have constant bounds when `rows` is: each TILE below unrolls them. */
static inline __attribute__((always_inline)) void tile(const int8_t *q, const float *d, const float *x, float *out,
                                                       long K, long V, int rows) {
    vec acc[MR][NB];
    for (int m = 0; m < rows; m++)
        for (int n = 0; n < NB; n++) acc[m][n] = ZERO();
    for (long g = 0; g < K / GROUP; g++) {
        vec scale[NB];
        for (int n = 0; n < NB; n++) scale[n] = LOAD(d + (n * (K / GROUP) + g) * LANES);
        for (long k = g * GROUP; k < (g + 1) * GROUP; k++) {
            vec w[NB];
            for (int n = 0; n < NB; n++) w[n] = load_weights(q + (n * K + k) * LANES, scale[n]);
            for (int m = 0; m < rows; m++) {
                const vec xm = BROADCAST(x[m * K + k]);
                for (int n = 0; n < NB; n++) acc[m][n] = FMA(w[n], xm, acc[m][n]);
            }
        }
    }
    for (int m = 0; m < rows; m++)
        for (int n = 0; n < NB; n++) STORE(out + m * V + n * LANES, acc[m][n]);
}

#define TILE(R) \
    static void tile_##R(const int8_t *q, const float *d, const float *x, float *out, long K, long V) { tile(q, d, x, out, K, V, R); }
typedef void (*tile_fn)(const int8_t *, const float *, const float *, float *, long, long);
TILE(1) TILE(2) TILE(3) TILE(4)
#if MR == 8
TILE(5) TILE(6) TILE(7) TILE(8)
static const tile_fn tiles[MR + 1] = {0, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6, tile_7, tile_8};
#else
static const tile_fn tiles[MR + 1] = {0, tile_1, tile_2, tile_3, tile_4};
#endif

/* Vocabulary entries per block: what model/q8_head.py packs for. */
int q8_head_lanes(void) { return LANES; }

/* q: (V / LANES, K, LANES) int8; d: (V / LANES, K / 32, LANES) float; x: B x K float; out: B x V float;
   all contiguous, V a multiple of 2 * LANES. Splits the vocabulary over `threads` OpenMP threads:
   torch's own pool (the process has one libgomp), whose threads are awake from the layers just before,
   where threads of our own would wait for them to stop spinning. Each thread keeps a tile's weights in
   L1 while it runs every row through them. Returns 0, or -1 for bad arguments. */
int q8_head(const int8_t *q, const float *d, const float *x, float *out, long V, long K, long B, int threads) {
    if (V < 1 || V % (NB * LANES) || K < GROUP || K % GROUP || B < 1 || threads < 1 || threads > MAX_THREADS) return -1;
    const long pairs = V / (NB * LANES), per = (pairs + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) {
        const long p1 = (t + 1) * per < pairs ? (t + 1) * per : pairs;
        for (long p = t * per; p < p1; p++) {
            const long block = p * NB;
            for (long b = 0; b < B; b += MR) {
                const long rows = B - b < MR ? B - b : MR;
                tiles[rows](q + block * K * LANES, d + block * (K / GROUP) * LANES, x + b * K, out + b * V + block * LANES, K, V);
            }
        }
    }
    return 0;
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
