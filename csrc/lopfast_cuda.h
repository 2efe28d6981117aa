// Plain-CUDA API of lopfast's CUDA C++ fallbacks (no torch headers: nvcc alone compiles the
// .cu files, and the torch glue in binding.cpp is built only where CUDA torch is installed).
//
// Every function takes raw device pointers, sizes and a cudaStream_t, never blocks the host,
// and returns the launch status. Element type by code (LOPFAST_*); accumulation is float
// (double for LOPFAST_F64). Workspaces are caller-allocated, sized by the *_workspace_bytes
// helpers, so the caller's caching allocator owns all memory.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>

enum LopfastDType { LOPFAST_F32 = 0, LOPFAST_F64 = 1, LOPFAST_F16 = 2, LOPFAST_BF16 = 3 };

// ---- collapse of one 1x1 -> kxk -> 1x1 chain (per group g and tap t: W_t = A3 . A2_t . A1)
// w1 (G*p_g, m_g), w2 (G*q_g, p_g, T), w3 (G*n_g, q_g), out/dw (G*n_g, m_g, T), all contiguous.
size_t lopfast_collapse_workspace_bytes(int dtype, int G, int n_g, int m_g, int p_g, int q_g, int T,
                                        int backward);
cudaError_t lopfast_collapse_forward(int dtype, const void* w1, const void* w2, const void* w3, void* out,
                                     void* workspace, int G, int n_g, int m_g, int p_g, int q_g, int T,
                                     cudaStream_t stream);
cudaError_t lopfast_collapse_backward(int dtype, const void* w1, const void* w2, const void* w3,
                                      const void* dw, void* dw1, void* dw2, void* dw3, void* workspace,
                                      int G, int n_g, int m_g, int p_g, int q_g, int T, cudaStream_t stream);

// ---- similarity-preserving Gram loss of one (student, teacher) pair
// q_s (b, d_s), q_t (b, d_t) contiguous. G = Q Q^T, rows L2-normalised (x / max(|x|, 1e-12)),
// pair loss = |G_T - G_S|_F^2 / b^2, ADDED (atomically) to *loss_acc (float, double for F64).
size_t lopfast_sp_pair_workspace_bytes(int dtype, int b, int backward);
cudaError_t lopfast_sp_pair_forward(int dtype, const void* q_s, const void* q_t, int b, long long d_s,
                                    long long d_t, void* loss_acc, void* workspace, cudaStream_t stream);
// grad_loss: device pointer to the incoming scalar gradient (accumulation type); writes dq_s.
cudaError_t lopfast_sp_pair_backward(int dtype, const void* q_s, const void* q_t, int b, long long d_s,
                                     long long d_t, const void* grad_loss, void* dq_s, void* workspace,
                                     cudaStream_t stream);
