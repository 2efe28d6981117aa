// CUDA C++ fallback of the collapse op (see lopfast/ops/collapse.py; the fast path is Triton).
//
// Per group g and tap t (A1 = W1[g] p_g x m_g, A2_t = W2[g,:,:,t] q_g x p_g, A3 = W3[g] n_g x q_g):
//   forward   U_t = A2_t . A1 (workspace), W_t = A3 . U_t
//   backward  S_t = A3^T . dW_t,  V_t = dW_t . A1^T (workspaces)
//             dA1 = sum_t A2_t^T . S_t,  dA2_t = A3^T . V_t,  dA3 = sum_t V_t . A2_t^T
// Two-stage products through an fp32 (fp64) workspace: no recomputation, every launch a plain
// strided batched matmul (lopfast::strided_bmm). 2 launches forward, 5 backward per layer.
#include "bmm.cuh"

namespace lopfast {
namespace {

struct Dims {
  int G, n, m, p, q, T;
};

// Strided views of the factors and of the effective kernel (one group = one batch entry).
inline MatView A1(const Dims& d) { return {0, (long long)d.p * d.m, d.m, 1, 0}; }
inline MatView A1T(const Dims& d) { return {0, (long long)d.p * d.m, 1, d.m, 0}; }
inline MatView A2(const Dims& d) { return {0, (long long)d.q * d.p * d.T, (long long)d.p * d.T, d.T, 1}; }
inline MatView A2T(const Dims& d) { return {0, (long long)d.q * d.p * d.T, d.T, (long long)d.p * d.T, 1}; }
inline MatView A3(const Dims& d) { return {0, (long long)d.n * d.q, d.q, 1, 0}; }
inline MatView A3T(const Dims& d) { return {0, (long long)d.n * d.q, 1, d.q, 0}; }
inline MatView Wk(const Dims& d) { return {0, (long long)d.n * d.m * d.T, (long long)d.m * d.T, d.T, 1}; }
// workspace matrix rows x cols per tap, tap-major inside a group
inline MatView Ws(const Dims& d, long long off, int rows, int cols) {
  return {off, (long long)d.T * rows * cols, cols, 1, (long long)rows * cols};
}

template <typename S, typename ACC>
cudaError_t forward(const S* w1, const S* w2, const S* w3, S* out, ACC* ws, const Dims& d, cudaStream_t st) {
  cudaError_t e = strided_bmm<S, S, ACC, ACC>(w2, A2(d), w1, A1(d), ws, Ws(d, 0, d.q, d.m), d.G, d.q, d.m, d.p,
                                              d.T, false, st);
  if (e != cudaSuccess) return e;
  return strided_bmm<S, ACC, S, ACC>(w3, A3(d), ws, Ws(d, 0, d.q, d.m), out, Wk(d), d.G, d.n, d.m, d.q, d.T, false,
                                     st);
}

template <typename S, typename ACC>
cudaError_t backward(const S* w1, const S* w2, const S* w3, const S* dw, S* d1, S* d2, S* d3, ACC* ws,
                     const Dims& d, cudaStream_t st) {
  const MatView s_view = Ws(d, 0, d.q, d.m);
  const MatView v_view = Ws(d, (long long)d.G * d.T * d.q * d.m, d.n, d.p);
  cudaError_t e;
  // S_t = A3^T dW_t
  e = strided_bmm<S, S, ACC, ACC>(w3, A3T(d), dw, Wk(d), ws, s_view, d.G, d.q, d.m, d.n, d.T, false, st);
  if (e != cudaSuccess) return e;
  // dA1 = sum_t A2_t^T S_t
  e = strided_bmm<S, ACC, S, ACC>(w2, A2T(d), ws, s_view, d1, A1(d), d.G, d.p, d.m, d.q, d.T, true, st);
  if (e != cudaSuccess) return e;
  // V_t = dW_t A1^T
  e = strided_bmm<S, S, ACC, ACC>(dw, Wk(d), w1, A1T(d), ws, v_view, d.G, d.n, d.p, d.m, d.T, false, st);
  if (e != cudaSuccess) return e;
  // dA2_t = A3^T V_t
  e = strided_bmm<S, ACC, S, ACC>(w3, A3T(d), ws, v_view, d2, A2(d), d.G, d.q, d.p, d.n, d.T, false, st);
  if (e != cudaSuccess) return e;
  // dA3 = sum_t V_t A2_t^T
  return strided_bmm<ACC, S, S, ACC>(ws, v_view, w2, A2T(d), d3, A3(d), d.G, d.n, d.q, d.p, d.T, true, st);
}

}  // namespace
}  // namespace lopfast

using lopfast::Dims;

size_t lopfast_collapse_workspace_bytes(int dtype, int G, int n_g, int m_g, int p_g, int q_g, int T,
                                        int backward) {
  const size_t acc = dtype == LOPFAST_F64 ? sizeof(double) : sizeof(float);
  size_t elems = (size_t)G * T * q_g * m_g;
  if (backward) elems += (size_t)G * T * n_g * p_g;
  return elems * acc;
}

cudaError_t lopfast_collapse_forward(int dtype, const void* w1, const void* w2, const void* w3, void* out,
                                     void* ws, int G, int n_g, int m_g, int p_g, int q_g, int T,
                                     cudaStream_t stream) {
  const Dims d{G, n_g, m_g, p_g, q_g, T};
  switch (dtype) {
    case LOPFAST_F32:
      return lopfast::forward<float, float>((const float*)w1, (const float*)w2, (const float*)w3, (float*)out,
                                            (float*)ws, d, stream);
    case LOPFAST_F64:
      return lopfast::forward<double, double>((const double*)w1, (const double*)w2, (const double*)w3,
                                              (double*)out, (double*)ws, d, stream);
    case LOPFAST_F16:
      return lopfast::forward<__half, float>((const __half*)w1, (const __half*)w2, (const __half*)w3,
                                             (__half*)out, (float*)ws, d, stream);
    case LOPFAST_BF16:
      return lopfast::forward<__nv_bfloat16, float>((const __nv_bfloat16*)w1, (const __nv_bfloat16*)w2,
                                                    (const __nv_bfloat16*)w3, (__nv_bfloat16*)out, (float*)ws, d,
                                                    stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t lopfast_collapse_backward(int dtype, const void* w1, const void* w2, const void* w3, const void* dw,
                                      void* dw1, void* dw2, void* dw3, void* ws, int G, int n_g, int m_g,
                                      int p_g, int q_g, int T, cudaStream_t stream) {
  const Dims d{G, n_g, m_g, p_g, q_g, T};
  switch (dtype) {
#define LOPFAST_BWD(S, ACC)                                                                                   \
  return lopfast::backward<S, ACC>((const S*)w1, (const S*)w2, (const S*)w3, (const S*)dw, (S*)dw1, (S*)dw2, \
                                   (S*)dw3, (ACC*)ws, d, stream)
    case LOPFAST_F32:
      LOPFAST_BWD(float, float);
    case LOPFAST_F64:
      LOPFAST_BWD(double, double);
    case LOPFAST_F16:
      LOPFAST_BWD(__half, float);
    case LOPFAST_BF16:
      LOPFAST_BWD(__nv_bfloat16, float);
#undef LOPFAST_BWD
  }
  return cudaErrorInvalidValue;
}
