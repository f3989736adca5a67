// The C kernels of int8_dot.c as two PyTorch operators, torch.ops.llmlab.int4_int8_dot and int8_int8_dot.
// Registered from C++ so that a call costs what a call of PyTorch's own int4 kernel costs (~2 us from
// Python, measured), where an operator implemented in Python costs ~8 us: a decode step makes ~200 calls.
// The shapes were checked when the layers were switched (llmlab.quant.linear.use_int8_dot); the checks
// here keep a wrong call from reading outside its tensors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

extern "C" {
int int4_matmul(const void *x, int x_bf16, long M, long K, long N, const uint8_t *packed, const uint16_t *scales,
                const uint16_t *offsets, long group, void *y, int y_bf16);
int int8_matmul(const void *x, int x_bf16, long M, long K, long N, const int8_t *weight, const uint16_t *scale,
                void *y, int y_bf16);
}

static void check_activations(const at::Tensor &x, int64_t in_features) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features && x.is_contiguous(),
                "int8-dot: contiguous activations of shape (tokens, ", in_features, ") expected, got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
                "int8-dot: bf16 or fp32 activations expected, got ", x.scalar_type());
}

static void check_status(int status) {
    TORCH_CHECK(status != -2, "int8-dot: in_features and the group size must be multiples of 32");
    TORCH_CHECK(status == 0, "int8-dot: could not allocate the work space for the quantized activations");
}

at::Tensor int4_int8_dot(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scales,
                         const at::Tensor &offsets, int64_t group_size) {
    const int64_t n = packed.size(0), k = packed.size(1) * 2;
    check_activations(x, k);
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "int8-dot: packed int4 weights expected");
    for (const at::Tensor *t : {&scales, &offsets})
        TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->dim() == 2 && t->size(0) == n &&
                    t->size(1) * group_size == k, "int8-dot: bf16 scales and offsets of shape (", n, ", ",
                    k / group_size, ") expected, got ", t->sizes());
    at::Tensor y = at::empty({x.size(0), n}, x.options());
    const int bf16 = x.scalar_type() == at::kBFloat16;
    check_status(int4_matmul(x.data_ptr(), bf16, x.size(0), k, n, packed.data_ptr<uint8_t>(),
                             static_cast<const uint16_t *>(scales.data_ptr()),
                             static_cast<const uint16_t *>(offsets.data_ptr()), group_size, y.data_ptr(), bf16));
    return y;
}

at::Tensor int8_int8_dot(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &scale) {
    const int64_t n = weight.size(0), k = weight.size(1);
    check_activations(x, k);
    TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous(), "int8-dot: int8 weights expected");
    TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.numel() == n,
                "int8-dot: one bf16 scale per output row expected, got ", scale.sizes());
    at::Tensor y = at::empty({x.size(0), n}, x.options());
    const int bf16 = x.scalar_type() == at::kBFloat16;
    check_status(int8_matmul(x.data_ptr(), bf16, x.size(0), k, n, weight.data_ptr<int8_t>(),
                             static_cast<const uint16_t *>(scale.data_ptr()), y.data_ptr(), bf16));
    return y;
}

TORCH_LIBRARY(llmlab, m) {
    m.def("int4_int8_dot(Tensor x, Tensor packed, Tensor scales, Tensor offsets, int group_size) -> Tensor");
    m.def("int8_int8_dot(Tensor x, Tensor weight, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmlab, CPU, m) {
    m.impl("int4_int8_dot", &int4_int8_dot);
    m.impl("int8_int8_dot", &int8_int8_dot);
}
