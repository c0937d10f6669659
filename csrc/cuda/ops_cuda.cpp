// Torch glue for the CUDA kernels: CUDA implementations of the schemas defined in csrc/cpu/ops.cpp.
// Launches on the current stream and never synchronises the host, so the ops work inside CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launchers.h"

namespace {
using flashquant::cuda::DType;

DType dtype_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, "flashquant CUDA: ", name,
              " must be fp16 or bf16, got ", t.scalar_type());
  return t.scalar_type() == at::kHalf ? DType::kHalf : DType::kBFloat16;
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "flashquant CUDA: ", what, " failed: ", cudaGetErrorString(err));
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

at::Tensor quant_matmul_cuda(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && qdata.is_cuda() && scales.is_cuda(), "flashquant CUDA: tensors must be on CUDA");
  TORCH_CHECK(x.dim() == 2, "flashquant CUDA: x must be (M, K), got ", x.sizes());
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = qdata.size(0);
  TORCH_CHECK(M >= 1 && M <= 16, "flashquant CUDA quant_matmul handles 1 <= M <= 16 (decode); got M=", M);
  TORCH_CHECK(K % 32 == 0 && group_size % 32 == 0, "flashquant CUDA quant_matmul needs K and group_size "
              "multiples of 32, got K=", K, ", group_size=", group_size);
  TORCH_CHECK(qdata.scalar_type() == at::kByte && qdata.is_contiguous() && qdata.size(1) * 8 / bits == K,
              "flashquant CUDA: qdata must be contiguous uint8 (N, K*bits/8), got ", qdata.sizes());
  // The kernel reads x and the packed weights with 16-byte loads. x (at most 16 rows) is copied when a view
  // starts off 16-byte alignment; the weight is not copied on every call: that is an error to fix once.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qdata.data_ptr()) % 16 == 0,
              "flashquant CUDA: qdata must start 16-byte aligned (it is a view at an offset); pass qdata.clone()");
  const at::Tensor xc = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 ? x.contiguous() : x.contiguous().clone();
  const at::Tensor& qc = qdata;
  const at::Tensor sc = scales.to(x.scalar_type()).contiguous();
  const std::optional<at::Tensor> zc = zeros ? std::optional<at::Tensor>(zeros->contiguous()) : std::nullopt;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_cuda() && at::isFloatingType(bias->scalar_type()),
                "flashquant CUDA quant_matmul: bias must be a floating-point (N=", N, ",) CUDA tensor, got ",
                bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
  }
  // In x's dtype, as F.linear takes it (a no-op when it already is); the kernel adds it to its fp32 sums.
  const std::optional<at::Tensor> bc =
      bias ? std::optional<at::Tensor>(bias->to(x.scalar_type()).contiguous()) : std::nullopt;
  // A block covers 64 output channels (4 warps x 16). Split K until there are ~4 blocks per SM (16 warps, each
  // with kStepsAhead steps of loads in flight), keeping >= 512 codes of K per slice. The kernel sums the slices
  // itself (the last block of each tile), so a split costs a memset of the tile counters, not two more kernels.
  const int64_t blocks = (N + 63) / 64;
  const int64_t split_k =
      std::max<int64_t>(1, std::min<int64_t>((4 * num_sms() + blocks - 1) / blocks, K / 512));
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor partials, tile_counters;
  if (split_k > 1) {
    partials = at::empty({split_k, M, N}, x.options().dtype(at::kFloat));
    tile_counters = at::empty({blocks}, x.options().dtype(at::kInt));
  }
  flashquant::cuda::QuantGemvParams p{xc.data_ptr(),
                                      qc.data_ptr<uint8_t>(),
                                      sc.data_ptr(),
                                      zc ? zc->data_ptr<uint8_t>() : nullptr,
                                      bc ? bc->data_ptr() : nullptr,
                                      out.data_ptr(),
                                      split_k > 1 ? partials.data_ptr<float>() : nullptr,
                                      split_k > 1 ? tile_counters.data_ptr<int>() : nullptr,
                                      static_cast<int>(M),
                                      static_cast<int>(N),
                                      static_cast<int>(K),
                                      static_cast<int>(K / group_size),
                                      static_cast<int>(group_size),
                                      static_cast<int>(bits),
                                      static_cast<int>(split_k),
                                      dtype_of(x, "x")};
  check(flashquant::cuda::quant_gemv(p, at::cuda::getCurrentCUDAStream()), "quant_gemv");
  return out;
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& seqlens_k, const std::optional<at::Tensor>& block_table,
                                 double softmax_scale, int64_t num_splits) {
  TORCH_CHECK(q.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda(), "flashquant CUDA: tensors must be on CUDA");
  TORCH_CHECK(q.dim() == 3, "flashquant CUDA decode: q must be (B, Hq, D), got ", q.sizes());
  const at::cuda::CUDAGuard guard(q.device());
  // q is read with 16-byte loads: a view off 16-byte alignment is copied (it is only B x Hq x D).
  const at::Tensor qc = reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 ? q.contiguous() : q.contiguous().clone();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= (D == 256 ? 8 : 16) && (D == 64 || D == 128 || D == 256),
              "flashquant CUDA decode: head_dim 64/128 with up to 16 query heads per KV head, or 256 with up to 8; "
              "got D=", D, ", Hq=", Hq, ", Hkv=", Hkv);
  for (const at::Tensor* t : {&k_cache, &v_cache}) {
    TORCH_CHECK(t->stride(3) == 1 && t->stride(2) % 8 == 0 && t->stride(1) % 8 == 0 && t->stride(0) % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                "flashquant CUDA decode: caches need a contiguous, 16-byte aligned head_dim");
  }
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type(), "flashquant CUDA decode: cache dtype must match q");
  const int64_t block_size = block_table ? k_cache.size(1) : 0;
  TORCH_CHECK(block_size % 16 == 0, "flashquant CUDA decode: paged blocks must hold a multiple of 16 keys, got ",
              block_size);
  const int64_t capacity = block_table ? block_table->size(1) * block_size : k_cache.size(1);
  const at::Tensor table = block_table ? block_table->contiguous() : at::Tensor();
  if (num_splits <= 0) {  // ~2 waves of blocks, at least 256 keys per split; host-side shapes only
    num_splits = std::max<int64_t>(1, std::min<int64_t>((2 * num_sms() + B * Hkv - 1) / std::max<int64_t>(1, B * Hkv),
                                                        (capacity + 255) / 256));
  }
  const int64_t split_len = std::max<int64_t>(64, ((capacity + num_splits - 1) / num_splits + 63) / 64 * 64);
  num_splits = std::max<int64_t>(1, (capacity + split_len - 1) / split_len);
  at::Tensor out = at::empty_like(qc);
  at::Tensor out_part, lse_part;
  if (num_splits > 1) {
    out_part = at::empty({num_splits, B, Hq, D}, q.options().dtype(at::kFloat));
    lse_part = at::empty({num_splits, B, Hq}, q.options().dtype(at::kFloat));
  }
  flashquant::cuda::DecodeParams p{};
  p.q = qc.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.seqlens_k = seqlens_k.data_ptr<int32_t>();
  p.block_table = block_table ? table.data_ptr<int32_t>() : nullptr;
  p.out = out.data_ptr();
  p.out_partial = num_splits > 1 ? out_part.data_ptr<float>() : nullptr;
  p.lse_partial = num_splits > 1 ? lse_part.data_ptr<float>() : nullptr;
  p.k_batch_stride = k_cache.stride(0);
  p.k_row_stride = k_cache.stride(1);
  p.k_head_stride = k_cache.stride(2);
  p.v_batch_stride = v_cache.stride(0);
  p.v_row_stride = v_cache.stride(1);
  p.v_head_stride = v_cache.stride(2);
  p.B = static_cast<int>(B);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.D = static_cast<int>(D);
  p.block_size = static_cast<int>(block_size);
  p.max_blocks = block_table ? static_cast<int>(block_table->size(1)) : 0;
  p.split_len = static_cast<int>(split_len);
  p.num_splits = static_cast<int>(num_splits);
  p.capacity = static_cast<int>(capacity);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.dtype = dtype_of(q, "q");
  check(flashquant::cuda::decode_attention(p, at::cuda::getCurrentCUDAStream()), "decode_attention");
  return out;
}
}  // namespace

TORCH_LIBRARY_IMPL(flashquant, CUDA, m) {
  m.impl("quant_matmul_packed", &quant_matmul_cuda);
  m.impl("decode_attention_packed", &decode_attention_cuda);
}

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda", "flashquant CUDA ops", -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
