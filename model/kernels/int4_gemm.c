/* Linear layers of 4-bit weights in groups of 32 (llama.cpp's Q4_1: w = q * scale + minimum, q in 0..15),
 * for float32 activations rounded to bfloat16, with zero = minimum + 8 * scale (the group's value at q = 8):
 *
 *     out[r][n] = sum_g ( scale[n][g] * sum_{k in g} bf16(x[r][k]) * (q[n][k] - 8)  +  zero[n][g] * sum_{k in g} x[r][k] )
 *
 * Why a kernel of our own: torch's int4 CPU kernel multiplies in float32 (dequantised weights times
 * activations), so a 32-row decode step spent 44 ms there on a 2-core Zen 4, ~12x its one-row cost. Here the
 * inner loop is AVX512-BF16's `vdpbf16ps` (two bfloat16 products per float32 lane per instruction, twice
 * float32 FMA's rate): q - 8 is a small integer, exact in bfloat16, so every product is exact, and scale and
 * zero apply once per group in float32. The only rounding beyond float32 sums is the activation's to
 * bfloat16 (torch's kernel did that too); centring q on 8 keeps the weight that multiplies that rounding
 * small (q itself, 0..15, doubled the KL to float32).
 *
 * Why batch invariant: every output is one fixed sequence of instructions (group by group, pair by pair
 * along k, in order), whatever the number of rows, their neighbours or the threads; register tiles only
 * decide which independent sums run side by side. model/int4_gemm.py checks that at load.
 *
 * Weights are packed by `int4_gemm.pack`'s layout: columns in blocks of 16; per block and chunk of 8 k, 64
 * bytes, column j's eight nibbles in bytes 4j..4j+3 (low nibbles q[k], q[k+4], q[k+1], q[k+5], high ones
 * q[k+2], q[k+6], q[k+3], q[k+7]: what `unpack` turns into four pairs of k in order). Scales and zeros
 * are (N / 16, K / 32, 16) float16, the type a Q4_1 GGUF stores (decode is bound by memory: float32 ones made
 * a step read 20% more bytes). Built at load with -march=native -fopenmp (model/native.py); no torch headers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define GROUP 32
#define MAX_THREADS 256

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

#define MR 4 /* activation rows per register tile */
#define NB 2 /* blocks of 16 columns per register tile */
#define AHEAD 16 /* groups prefetched ahead (4 KB a block): 4 -> 16 took 120 one-row calls 6.8 -> 5.5 ms (Zen 4) */

/* The four pairs of k of one chunk (8 k x 16 columns, 64 bytes) as four vectors of 32 bfloat16 lanes (lane
   2j + i: column j's q[k + i] - 8 for the pair's k), looked up in a table of bf16(q - 8) for q in 0..15 by vpermw,
   which reads the low five bits of each 16-bit word: the word's low byte's low nibble, then, shifted by 4, 8
   and 12, its other three nibbles (the table is there twice, so the fifth bit, a neighbour's, does not matter).
   Three shifts and four lookups a chunk, where one byte per 32-bit lane took a widening load, a shift, an or
   and a lookup per pair: one-row GEMMs were bound by those instructions (~17 GB/s of weights on a 2-core Zen 4
   that reads ~33), not by memory. `int4_gemm.pack` places the nibbles to suit. */
static inline void unpack(const uint8_t *bytes, __m512i table, __m512i pairs[4]) {
    const __m512i raw = _mm512_loadu_si512(bytes);
    pairs[0] = _mm512_permutexvar_epi16(raw, table);
    pairs[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(raw, 4), table);
    pairs[2] = _mm512_permutexvar_epi16(_mm512_srli_epi16(raw, 8), table);
    pairs[3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(raw, 12), table);
}

/* out rows [0, mr) x column blocks [0, nb) of one tile. w: the tile's packed bytes (block stride
   w_stride bytes), or, when dequantised, bf16 pairs (block stride K * 2 halfwords as 32-bit pairs). Each
   output's sum runs pair by pair along k in order, whatever the tile. */
static inline void tile(int mr, int nb, const uint8_t *w, long w_stride, const uint32_t *wd, long wd_stride,
                        const uint16_t *scale, const uint16_t *zero, long s_stride, const uint16_t *xb,
                        const float *xsum, long K, float *out, long N, __m512i table) {
    __m512 acc[MR][NB], total[MR][NB];
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nb; n++) total[m][n] = _mm512_setzero_ps();
    for (long g = 0; g < K / GROUP; g++) {
        if (!wd) /* decode streams the weights once from memory: ask for group g + AHEAD's while g computes */
            for (int n = 0; n < nb; n++) {
                const uint8_t *next = w + n * w_stride + (g + AHEAD) * GROUP / 2 * 16;
                for (int line = 0; line < GROUP / 2 * 16; line += 64) _mm_prefetch((const char *)(next + line), _MM_HINT_T0);
                _mm_prefetch((const char *)(scale + n * s_stride + (g + AHEAD) * 16), _MM_HINT_T0);
                _mm_prefetch((const char *)(zero + n * s_stride + (g + AHEAD) * 16), _MM_HINT_T0);
            }
        for (int m = 0; m < mr; m++)
            for (int n = 0; n < nb; n++) acc[m][n] = _mm512_setzero_ps();
        for (long c = g * GROUP / 8; c < (g + 1) * GROUP / 8; c++) { /* chunks of 8 k: 4 pairs */
            __m512i wv[NB][4];
            for (int n = 0; n < nb; n++) {
                if (wd)
                    for (int i = 0; i < 4; i++) wv[n][i] = _mm512_loadu_si512(wd + n * wd_stride + (4 * c + i) * 16);
                else
                    unpack(w + n * w_stride + c * 64, table, wv[n]);
            }
            for (int i = 0; i < 4; i++)
                for (int m = 0; m < mr; m++) {
                    const __m512i xv = _mm512_set1_epi32(*(const int32_t *)(xb + m * K + 2 * (4 * c + i)));
                    for (int n = 0; n < nb; n++) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], (__m512bh)xv, (__m512bh)wv[n][i]);
                }
        }
        for (int n = 0; n < nb; n++) {
            const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + n * s_stride + g * 16)));
            const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(zero + n * s_stride + g * 16)));
            for (int m = 0; m < mr; m++) {
                total[m][n] = _mm512_fmadd_ps(s, acc[m][n], total[m][n]);
                total[m][n] = _mm512_fmadd_ps(z, _mm512_set1_ps(xsum[m * (K / GROUP) + g]), total[m][n]);
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nb; n++) _mm512_storeu_ps(out + m * N + n * 16, total[m][n]);
}

/* One tile shape per (rows, blocks) so the compiler unrolls each fully and keeps it in registers. */
#define TILE(M, NBLK)                                                                                        \
    static void tile_##M##_##NBLK(const uint8_t *w, long ws, const uint32_t *wd, long wds, const uint16_t *s,\
                                  const uint16_t *z, long ss,  const uint16_t *xb, const float *xsum, long K,  \
                                  float *out, long N, __m512i table) {                                       \
        tile(M, NBLK, w, ws, wd, wds, s, z, ss, xb, xsum, K, out, N, table);                               \
    }
TILE(1, 1) TILE(2, 1) TILE(3, 1) TILE(4, 1) TILE(1, 2) TILE(2, 2) TILE(3, 2) TILE(4, 2)
typedef void (*tile_fn)(const uint8_t *, long, const uint32_t *, long, const uint16_t *, const uint16_t *, long,
                        const uint16_t *, const float *, long, float *, long, __m512i);
static const tile_fn tiles[NB + 1][MR + 1] = {
    {0}, {0, tile_1_1, tile_2_1, tile_3_1, tile_4_1}, {0, tile_1_2, tile_2_2, tile_3_2, tile_4_2}};

static inline uint16_t to_bf16(float f) { /* round to nearest even, as vcvtneps2bf16 */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* x: M x K float32; w: packed (N / 16 blocks of K / 2 x 16 bytes); scale, zero: N / 16 x K / 32 x 16
   float16; out: M x N float32. Returns 0, -1 for bad arguments, -2 when memory could not be had. */
int int4_gemm(const float *x, const uint8_t *w, const uint16_t *scale, const uint16_t *zero, float *out,
              long M, long N, long K, int threads) {
    if (M < 1 || N < 16 || N % 16 || K < GROUP || K % GROUP || threads < 1 || threads > MAX_THREADS) return -1;
    const long groups = K / GROUP, blocks = N / 16, pairs = (blocks + NB - 1) / NB;
    uint16_t *xb = malloc(sizeof(uint16_t) * M * K);
    float *xsum = malloc(sizeof(float) * M * groups);
    if (!xb || !xsum) {
        free(xb);
        free(xsum);
        return -2;
    }
    for (long i = 0; i < M * K; i++) xb[i] = to_bf16(x[i]);
    for (long i = 0; i < M * groups; i++) {
        float s = 0.f;
        for (int k = 0; k < GROUP; k++) s += x[i * GROUP + k];
        xsum[i] = s;
    }
    __m512i table;
    {
        uint16_t entries[32];
        for (int i = 0; i < 32; i++) entries[i] = to_bf16((float)((i & 15) - 8));
        table = _mm512_loadu_si512(entries);
    }
    /* Above MR rows, each pair of blocks is dequantised once into a per-thread buffer of bf16 pairs that
       every row tile then reads: the same values the register path computes, so the same bits. */
    const int dequantise = M > MR;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        uint32_t *wd = dequantise ? aligned_alloc(64, sizeof(uint32_t) * NB * (K / 2) * 16) : 0;
        if (dequantise && !wd) failed = 1;
#pragma omp for schedule(static)
        for (long pair = 0; pair < pairs; pair++) {
            if (dequantise && !wd) continue;
            const long b0 = pair * NB, nb = blocks - b0 < NB ? blocks - b0 : NB;
            const uint8_t *wb = w + b0 * (K / 2) * 16;
            if (wd)
                for (long n = 0; n < nb; n++)
                    for (long c = 0; c < K / 8; c++) {
                        __m512i pairs[4];
                        _mm_prefetch((const char *)(wb + n * (K / 2) * 16 + (c + 16) * 64), _MM_HINT_T0);
                        unpack(wb + n * (K / 2) * 16 + c * 64, table, pairs);
                        for (int i = 0; i < 4; i++) _mm512_storeu_si512(wd + n * (K / 2) * 16 + (4 * c + i) * 16, pairs[i]);
                    }
            for (long m0 = 0; m0 < M; m0 += MR) {
                const long mr = M - m0 < MR ? M - m0 : MR;
                tiles[nb][mr](wb, (K / 2) * 16, wd, (K / 2) * 16, scale + b0 * groups * 16, zero + b0 * groups * 16,
                              groups * 16, xb + m0 * K, xsum + m0 * groups, K, out + m0 * N + b0 * 16, N, table);
            }
        }
        free(wd);
    }
    free(xb);
    free(xsum);
    return failed ? -2 : 0;
}

int int4_gemm_available(void) { return 1; }

#else /* no AVX512-BF16 here: the caller keeps torch's int4 kernel */

int int4_gemm(const float *x, const uint8_t *w, const uint16_t *scale, const uint16_t *zero, float *out,
              long M, long N, long K, int threads) {
    (void)x, (void)w, (void)scale, (void)zero, (void)out, (void)M, (void)N, (void)K, (void)threads;
    return -3;
}

int int4_gemm_available(void) { return 0; }

#endif
