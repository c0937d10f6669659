#pragma once
// Stub for the CI syntax check of csrc/cuda/ops_cuda.cpp only (this header is absent from the CI toolkit).
typedef struct cusparseContext* cusparseHandle_t;
typedef int cusparseStatus_t;
