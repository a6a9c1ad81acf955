/* Our C kernels (int4_gemm.c, decode_attention.c) as torch operators implemented in C++, so that the compiled
 * decode step's 150 calls a token go from its wrapper straight to the kernel.
 *
 * Why: an operator implemented in Python (torch.library with a Python function that calls the kernel through
 * ctypes) costs ~7 us a call on a 2-core Zen 4: the dispatcher boxing its arguments into Python objects, the
 * Python body, ctypes. Here it is ~1.6 us, ~0.8 ms of a ~10 ms one-row step. Written against torch's stable
 * C ABI (torch/csrc/stable): the headers are small (this file builds in ~1 s, the full C++ API's take ~7 s)
 * and the library does not depend on torch's C++ ABI.
 *
 * The kernels stay where they are, built for this CPU by model/native.py; Python hands their addresses to
 * `llamaserve_bind` after loading this library, and an operator whose kernel is not bound fails with a clear
 * error rather than crash. Schemas and argument meanings: model/int4_gemm.py, model/decode_attention.py.
 */
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <cstring>

using torch::stable::Tensor;

typedef int (*int4_gemm_fn)(const float *, const uint8_t *, const uint16_t *, const uint16_t *, float *, long, long,
                            long, int);
typedef int (*decode_attention_fn)(const float *, long, long, const float *, const float *, long, long, long,
                                   const int64_t *, float *, long, long, long, long, long, int);

static int4_gemm_fn int4_gemm_kernel = nullptr;
static decode_attention_fn decode_attention_kernel = nullptr;

/* Returns 0, or -1 for a name this library does not know. */
extern "C" int llamaserve_bind(const char *name, void *kernel) {
    if (std::strcmp(name, "int4_gemm") == 0) {
        int4_gemm_kernel = reinterpret_cast<int4_gemm_fn>(kernel);
        return 0;
    }
    if (std::strcmp(name, "decode_attention") == 0) {
        decode_attention_kernel = reinterpret_cast<decode_attention_fn>(kernel);
        return 0;
    }
    return -1;
}

static int threads() {
    uint32_t n = 1;
    STABLE_TORCH_ERROR_CODE_CHECK(torch_get_num_threads(&n));
    return static_cast<int>(n);
}

static Tensor empty_float(int64_t ndim, const int64_t *sizes) {
    int64_t strides[4];
    strides[ndim - 1] = 1;
    for (int64_t d = ndim - 2; d >= 0; d--) strides[d] = strides[d + 1] * sizes[d + 1];
    AtenTensorHandle handle = nullptr;
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(ndim, sizes, strides, aoti_torch_dtype_float32(),
                                                    aoti_torch_device_type_cpu(), 0, &handle));
    return Tensor(handle);
}

static bool is_float(const Tensor &t) { return t.scalar_type() == torch::headeronly::ScalarType::Float; }

/* x (M, K) float32; packed, scale, zero as int4_gemm.pack lays them out -> (M, N) float32. */
static Tensor int4_gemm(Tensor x, Tensor packed, Tensor scale, Tensor zero) {
    STD_TORCH_CHECK(int4_gemm_kernel != nullptr, "llamaserve_c::int4_gemm: no kernel bound");
    STD_TORCH_CHECK(x.dim() == 2 && is_float(x), "int4_gemm takes x as (M, K) float32");
    STD_TORCH_CHECK(packed.is_contiguous() && scale.is_contiguous() && zero.is_contiguous() && scale.dim() == 3,
                    "int4_gemm takes contiguous packed weights, scales and zeros (int4_gemm.pack)");
    if (!x.is_contiguous()) x = torch::stable::contiguous(x);
    const int64_t sizes[2] = {x.size(0), scale.size(0) * 16};
    Tensor out = empty_float(2, sizes);
    const int status = int4_gemm_kernel(static_cast<const float *>(x.data_ptr()), static_cast<const uint8_t *>(packed.data_ptr()),
                                        static_cast<const uint16_t *>(scale.data_ptr()), static_cast<const uint16_t *>(zero.data_ptr()),
                                        static_cast<float *>(out.data_ptr()), x.size(0), sizes[1], x.size(1), threads());
    STD_TORCH_CHECK(status == 0, "int4_gemm kernel failed with status ", status, " (-1: bad arguments, -2: out of memory)");
    return out;
}

/* q (B, H, 1, D); keys, values (B, KVH, L, D) with the same strides; positions (B, 1) int64 -> (B, H, 1, D). */
static Tensor decode_attention(Tensor q, Tensor keys, Tensor values, Tensor positions) {
    STD_TORCH_CHECK(decode_attention_kernel != nullptr, "llamaserve_c::decode_attention: no kernel bound");
    STD_TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.dim() == 4 && is_float(q) && is_float(keys) && is_float(values),
                    "decode_attention takes 4-D float32 q, keys and values");
    STD_TORCH_CHECK(positions.scalar_type() == torch::headeronly::ScalarType::Long && positions.numel() == q.size(0),
                    "decode_attention takes one int64 position a row");
    if (q.stride(3) != 1) q = torch::stable::contiguous(q);
    if (keys.stride(3) != 1) keys = torch::stable::contiguous(keys);
    if (values.stride(3) != 1) values = torch::stable::contiguous(values);
    bool same_strides = true;
    for (int64_t d = 0; d < 4; d++) same_strides = same_strides && keys.stride(d) == values.stride(d);
    if (!same_strides) {
        keys = torch::stable::contiguous(keys);
        values = torch::stable::contiguous(values);
    }
    if (!positions.is_contiguous()) positions = torch::stable::contiguous(positions);
    const int64_t sizes[4] = {q.size(0), q.size(1), 1, q.size(3)};
    Tensor out = empty_float(4, sizes);
    const int status = decode_attention_kernel(
        static_cast<const float *>(q.data_ptr()), q.stride(0), q.stride(1), static_cast<const float *>(keys.data_ptr()),
        static_cast<const float *>(values.data_ptr()), keys.stride(0), keys.stride(1), keys.stride(2),
        static_cast<const int64_t *>(positions.data_ptr()), static_cast<float *>(out.data_ptr()), q.size(0), q.size(1),
        keys.size(1), keys.size(2), q.size(3), threads());
    STD_TORCH_CHECK(status == 0, "decode_attention kernel failed with status ", status);
    return out;
}

STABLE_TORCH_LIBRARY(llamaserve_c, m) {
    m.def("int4_gemm(Tensor x, Tensor packed, Tensor scale, Tensor zero) -> Tensor");
    m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor positions) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(llamaserve_c, CPU, m) {
    m.impl("int4_gemm", TORCH_BOX(&int4_gemm));
    m.impl("decode_attention", TORCH_BOX(&decode_attention));
}
