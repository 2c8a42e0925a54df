// vlm-bench: the one op this build serves, vlm_bench_marlin::w4a16_gemm (torch.ops), over
// gptq_marlin.cu's gptq_marlin_gemm with 4-bit weights, integer zero points, no act-order and an
// fp32 global reduce: y [M, N] = x [M, K] (float16) times the Marlin-layout weight.
#include <torch/all.h>
#include <torch/library.h>

#include "core/scalar_type.hpp"

torch::Tensor gptq_marlin_gemm(torch::Tensor& a, torch::Tensor& b_q_weight, torch::Tensor& b_scales,
                               torch::Tensor& b_zeros, torch::Tensor& g_idx, torch::Tensor& perm,
                               torch::Tensor& workspace, marlin_kernels::ScalarTypeId const& b_q_type_id,
                               int64_t size_m, int64_t size_n, int64_t size_k, bool is_k_full, bool has_zp,
                               bool use_fp32_reduce, bool is_zp_float);

// x [M, K] float16; qweight [K / 16, N * 2] int32; scales [K / 128, N] float16; zeros [K / 128, N / 8]
// int32; workspace: (N / 64) * 16 int32 zeros, which every call leaves zeroed again.
torch::Tensor w4a16_gemm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                         torch::Tensor workspace) {
  auto none = torch::empty({0}, torch::TensorOptions().dtype(torch::kInt).device(x.device()));
  marlin_kernels::ScalarTypeId const u4 = marlin_kernels::kU4.id();
  return gptq_marlin_gemm(x, qweight, scales, zeros, none, none, workspace, u4, x.size(0), scales.size(1),
                          x.size(1), /*is_k_full=*/true, /*has_zp=*/true, /*use_fp32_reduce=*/true,
                          /*is_zp_float=*/false);
}

TORCH_LIBRARY(vlm_bench_marlin, m) {
  m.def("w4a16_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor workspace) -> Tensor");
}

TORCH_LIBRARY_IMPL(vlm_bench_marlin, CUDA, m) { m.impl("w4a16_gemm", &w4a16_gemm); }
