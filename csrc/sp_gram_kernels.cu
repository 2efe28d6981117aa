// CUDA C++ fallback of the similarity-preserving (SP) Gram loss, one (student, teacher) pair
// per call (see lopfast/ops/sp_loss.py for the op; the fast path there is Triton).
//
//   G = Q Q^T (b x b),  Gn = rows of G divided by max(|row|, eps), eps = 1e-12
//   loss += |Gn_T - Gn_S|_F^2 / b^2
// backward (incoming scalar gradient go, read on the device: no host sync):
//   dGn = go * 2 (Gn_S - Gn_T) / b^2
//   dG_i = (dGn_i - [|G_i| > eps] Gn_i <Gn_i, dGn_i>) / max(|G_i|, eps)   (F.normalize's rule)
//   dQ_S = (dG + dG^T) Q_S
// Accumulation in float (double for fp64 inputs); Grams live in the workspace.
#include "bmm.cuh"

namespace lopfast {
namespace {

constexpr double kEps = 1e-12;
constexpr int kThreads = 256;

template <typename ACC>
__device__ ACC block_sum(ACC v) {
  __shared__ ACC buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  ACC r = buf[0];
  __syncthreads();
  return r;
}

// One block per row: norm[i] = |G_i| (raw), then G_i /= max(|G_i|, eps) in place.
template <typename ACC>
__global__ void row_normalize_kernel(ACC* G, ACC* norm, int b) {
  const int i = blockIdx.x;
  ACC ss = 0;
  for (int j = threadIdx.x; j < b; j += blockDim.x) ss += G[(long long)i * b + j] * G[(long long)i * b + j];
  const ACC nrm = sqrt(block_sum(ss));
  const ACC den = nrm > ACC(kEps) ? nrm : ACC(kEps);
  if (threadIdx.x == 0) norm[i] = nrm;
  for (int j = threadIdx.x; j < b; j += blockDim.x) G[(long long)i * b + j] /= den;
}

template <typename ACC>
__global__ void sq_diff_kernel(const ACC* a, const ACC* c, long long n, ACC scale, ACC* loss) {
  ACC s = 0;
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
    const ACC d = a[k] - c[k];
    s += d * d;
  }
  s = block_sum(s);
  // launched as ONE block: a plain read-add-write after the pairs before it on the stream keeps the
  // summation order fixed (bitwise repeatable; an atomicAdd from many blocks would not be)
  if (threadIdx.x == 0) *loss += s * scale;
}

// One block per row i: dG_i from the normalised Grams (gs, gt), raw student norms, go.
template <typename ACC>
__global__ void normalize_backward_kernel(const ACC* gs, const ACC* gt, const ACC* norm_s, const ACC* go, int b,
                                          ACC* dG) {
  const int i = blockIdx.x;
  const ACC scale = go[0] * ACC(2) / (ACC(b) * ACC(b));
  const long long r = (long long)i * b;
  ACC dot = 0;
  for (int j = threadIdx.x; j < b; j += blockDim.x) dot += gs[r + j] * (gs[r + j] - gt[r + j]) * scale;
  dot = block_sum(dot);
  const ACC nrm = norm_s[i];
  const ACC den = nrm > ACC(kEps) ? nrm : ACC(kEps);
  const ACC proj = nrm > ACC(kEps) ? dot : ACC(0);
  for (int j = threadIdx.x; j < b; j += blockDim.x) {
    const ACC dgn = (gs[r + j] - gt[r + j]) * scale;
    dG[r + j] = (dgn - gs[r + j] * proj) / den;
  }
}

template <typename ACC>
__global__ void symmetrize_kernel(const ACC* dG, ACC* A, int b) {
  const long long n = (long long)b * b;
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
    const long long i = k / b, j = k % b;
    A[k] = dG[k] + dG[j * b + i];
  }
}

inline unsigned blocks_for(long long n) {
  long long g = (n + kThreads - 1) / kThreads;
  return (unsigned)(g < 1024 ? (g > 0 ? g : 1) : 1024);
}

// Normalised Gram of q (b x d) into gram (b x b), raw row norms into norm.
template <typename S, typename ACC>
cudaError_t normalized_gram(const S* q, int b, long long d, ACC* gram, ACC* norm, cudaStream_t st) {
  const MatView qv{0, 0, d, 1, 0}, qtv{0, 0, 1, d, 0}, gv{0, 0, b, 1, 0};
  cudaError_t e = strided_bmm<S, S, ACC, ACC>(q, qv, q, qtv, gram, gv, 1, b, b, d, 1, false, st);
  if (e != cudaSuccess) return e;
  row_normalize_kernel<ACC><<<b, kThreads, 0, st>>>(gram, norm, b);
  return cudaGetLastError();
}

template <typename S, typename ACC>
cudaError_t pair_forward(const S* qs, const S* qt, int b, long long ds, long long dt, ACC* loss, ACC* ws,
                         cudaStream_t st) {
  const long long bb = (long long)b * b;
  ACC *gs = ws, *gt = ws + bb, *ns = ws + 2 * bb, *nt = ns + b;
  cudaError_t e = normalized_gram(qs, b, ds, gs, ns, st);
  if (e != cudaSuccess) return e;
  e = normalized_gram(qt, b, dt, gt, nt, st);
  if (e != cudaSuccess) return e;
  sq_diff_kernel<ACC><<<1, kThreads, 0, st>>>(gt, gs, bb, ACC(1) / (ACC(b) * ACC(b)), loss);
  return cudaGetLastError();
}

template <typename S, typename ACC>
cudaError_t pair_backward(const S* qs, const S* qt, int b, long long ds, long long dt, const ACC* go, S* dqs,
                          ACC* ws, cudaStream_t st) {
  const long long bb = (long long)b * b;
  ACC *gs = ws, *gt = ws + bb, *dG = ws + 2 * bb, *A = ws + 3 * bb, *ns = ws + 4 * bb, *nt = ns + b;
  cudaError_t e = normalized_gram(qs, b, ds, gs, ns, st);
  if (e != cudaSuccess) return e;
  e = normalized_gram(qt, b, dt, gt, nt, st);
  if (e != cudaSuccess) return e;
  normalize_backward_kernel<ACC><<<b, kThreads, 0, st>>>(gs, gt, ns, go, b, dG);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  symmetrize_kernel<ACC><<<blocks_for(bb), kThreads, 0, st>>>(dG, A, b);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  const MatView av{0, 0, b, 1, 0}, qv{0, 0, ds, 1, 0};
  return strided_bmm<ACC, S, S, ACC>(A, av, qs, qv, dqs, qv, 1, b, (int)ds, b, 1, false, st);
}

}  // namespace
}  // namespace lopfast

size_t lopfast_sp_pair_workspace_bytes(int dtype, int b, int backward) {
  const size_t acc = dtype == LOPFAST_F64 ? sizeof(double) : sizeof(float);
  const size_t bb = (size_t)b * b;
  return ((backward ? 4 : 2) * bb + 2 * (size_t)b) * acc;
}

#define LOPFAST_SP_DISPATCH(...)                                   \
  switch (dtype) {                                                 \
    case LOPFAST_F32: { typedef float S; typedef float ACC; __VA_ARGS__; } \
    case LOPFAST_F64: { typedef double S; typedef double ACC; __VA_ARGS__; } \
    case LOPFAST_F16: { typedef __half S; typedef float ACC; __VA_ARGS__; } \
    case LOPFAST_BF16: { typedef __nv_bfloat16 S; typedef float ACC; __VA_ARGS__; } \
  }                                                                \
  return cudaErrorInvalidValue

cudaError_t lopfast_sp_pair_forward(int dtype, const void* q_s, const void* q_t, int b, long long d_s,
                                    long long d_t, void* loss_acc, void* ws, cudaStream_t stream) {
  LOPFAST_SP_DISPATCH(return lopfast::pair_forward<S, ACC>((const S*)q_s, (const S*)q_t, b, d_s, d_t,
                                                           (ACC*)loss_acc, (ACC*)ws, stream));
}

cudaError_t lopfast_sp_pair_backward(int dtype, const void* q_s, const void* q_t, int b, long long d_s,
                                     long long d_t, const void* grad_loss, void* dq_s, void* ws,
                                     cudaStream_t stream) {
  LOPFAST_SP_DISPATCH(return lopfast::pair_backward<S, ACC>((const S*)q_s, (const S*)q_t, b, d_s, d_t,
                                                            (const ACC*)grad_loss, (S*)dq_s, (ACC*)ws, stream));
}
