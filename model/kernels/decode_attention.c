/* Decode attention: one new query per row and head over that row's cached keys, in float32.
 *
 *     out[b][h] = sum_{j < n_b} softmax_j(q[b][h] . k[b][h / G][j] / sqrt(D)) v[b][h / G][j],   n_b = pos_b + 1 <= L
 *
 * Why a kernel of our own: in plain ops this is a (G x D) @ (D x L) product per row and key head, then a
 * softmax, then another product (model/decode_attention.py): 96 tiny matmuls a layer at 32 rows, which took
 * a quarter of a 32-row decode step on a 2-core Zen 4. Here each (row, key head) streams its keys and values
 * once for all G query heads that share them, and reads only the row's own keys, not the masked rest of
 * the step's key length.
 *
 * Why batch invariant: a row's output is one fixed sequence of instructions over its own n_b keys (dot
 * products in order of d then a fixed reduction tree, exp by a fixed polynomial, sums in order of j),
 * whatever the batch, the step's key length or the threads. model/decode_attention.py checks it at load.
 *
 * q: (B, H, D) float32 with strides (q_b, q_h, 1); keys and values: (B, KVH, L, D) with strides (kv_b, kv_h,
 * kv_l, 1); positions: (B) int64; out: (B, H, D) contiguous. AVX-512 only (else the caller keeps its ops).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_THREADS 256
#define MAX_GROUP 16   /* query heads per key head */
#define MAX_CHUNKS 16  /* D / 16 */

#if defined(__AVX512F__)
#include <immintrin.h>

/* e^x for x <= 0, Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n (within ~2 ulp). */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* One (row, key head): G queries of D over n keys. scores: G * n floats of scratch. */
static void attend(const float *q, long q_h, const float *k, const float *v, long kv_l, long n, int G, int D,
                   float scale, float *scores, float *out) {
    const int chunks = D / 16;
    __m512 qv[MAX_GROUP][MAX_CHUNKS];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < chunks; c++) qv[g][c] = _mm512_mul_ps(_mm512_loadu_ps(q + g * q_h + 16 * c), _mm512_set1_ps(scale));
    /* scores: a dot product per (query, key), lanes then a fixed tree */
    for (long j = 0; j < n; j++) {
        const float *kj = k + j * kv_l;
        for (int g = 0; g < G; g++) {
            __m512 acc = _mm512_mul_ps(qv[g][0], _mm512_loadu_ps(kj));
            for (int c = 1; c < chunks; c++) acc = _mm512_fmadd_ps(qv[g][c], _mm512_loadu_ps(kj + 16 * c), acc);
            scores[g * n + j] = _mm512_reduce_add_ps(acc);
        }
    }
    /* softmax numerators in place, and their sums (16 lanes, then a fixed tree) */
    float total[MAX_GROUP];
    for (int g = 0; g < G; g++) {
        float *s = scores + g * n;
        float top = s[0];
        for (long j = 1; j < n; j++) top = s[j] > top ? s[j] : top;
        const __m512 max = _mm512_set1_ps(top);
        __m512 sum = _mm512_setzero_ps();
        long j = 0;
        for (; j + 16 <= n; j += 16) {
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + j), max));
            _mm512_storeu_ps(s + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (j < n) {
            const __mmask16 tail = (__mmask16)((1u << (n - j)) - 1);
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), max));
            _mm512_mask_storeu_ps(s + j, tail, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
        }
        total[g] = _mm512_reduce_add_ps(sum);
    }
    /* weighted sum of the values, then divided by the softmax's sum */
    __m512 acc[MAX_GROUP][MAX_CHUNKS];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < chunks; c++) acc[g][c] = _mm512_setzero_ps();
    for (long j = 0; j < n; j++) {
        const float *vj = v + j * kv_l;
        for (int c = 0; c < chunks; c++) {
            const __m512 vc = _mm512_loadu_ps(vj + 16 * c);
            for (int g = 0; g < G; g++) acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n + j]), vc, acc[g][c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < chunks; c++)
            _mm512_storeu_ps(out + g * D + 16 * c, _mm512_div_ps(acc[g][c], _mm512_set1_ps(total[g])));
}

/* Returns 0, -1 for bad arguments, -2 when memory could not be had. */
int decode_attention(const float *q, long q_b, long q_h, const float *keys, const float *values, long kv_b, long kv_h,
                     long kv_l, const int64_t *positions, float *out, long B, long H, long KVH, long L, long D,
                     int threads) {
    if (B < 1 || KVH < 1 || H % KVH || H / KVH > MAX_GROUP || D % 16 || D / 16 > MAX_CHUNKS || D < 16 || L < 1 ||
        threads < 1 || threads > MAX_THREADS)
        return -1;
    const int G = (int)(H / KVH);
    const float scale = 1.0f / sqrtf((float)D);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * G * L);
        if (!scores) failed = 1;
#pragma omp for schedule(static)
        for (long item = 0; item < B * KVH; item++) {
            if (!scores) continue;
            const long b = item / KVH, h = item % KVH;
            /* A real row reads its own new key, so position < L; a row at or past L pads a bucket (its position
               is the cache's scratch one): one key, not L, for an output nobody reads. */
            long n = positions[b] + 1;
            n = n < 1 || n > L ? 1 : n;
            attend(q + b * q_b + h * G * q_h, q_h, keys + b * kv_b + h * kv_h, values + b * kv_b + h * kv_h, kv_l, n, G,
                   (int)D, scale, scores, out + (b * H + h * G) * D);
        }
        free(scores);
    }
    return failed ? -2 : 0;
}

int decode_attention_available(void) { return 1; }

#else /* no AVX-512 here: the caller keeps its plain ops */

int decode_attention(const float *q, long q_b, long q_h, const float *keys, const float *values, long kv_b, long kv_h,
                     long kv_l, const int64_t *positions, float *out, long B, long H, long KVH, long L, long D,
                     int threads) {
    (void)q, (void)q_b, (void)q_h, (void)keys, (void)values, (void)kv_b, (void)kv_h, (void)kv_l, (void)positions;
    (void)out, (void)B, (void)H, (void)KVH, (void)L, (void)D, (void)threads;
    return -3;
}

int decode_attention_available(void) { return 0; }

#endif
