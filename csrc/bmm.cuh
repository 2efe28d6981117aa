// Shared device code: element conversions and a strided, batched, tap-aware matmul.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lopfast_cuda.h"

namespace lopfast {

// Explicit intrinsics: torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ (and the
// bf16 twin), which removes the implicit __half <-> float operators.
__device__ __forceinline__ float to_acc(float v, float) { return v; }
__device__ __forceinline__ float to_acc(__half v, float) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v, float) { return __bfloat162float(v); }
__device__ __forceinline__ double to_acc(double v, double) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

// Element (r, c) of tap t in group g sits at off + g*sg + r*sr + c*sc + t*st.
struct MatView {
  long long off, sg, sr, sc, st;
};

constexpr int kTile = 16;

// O[g, i, j (, t)] = sum over taps (one tap, or all when sum_taps) of sum_k X[g,i,k,t] Y[g,k,j,t].
// 16x16 shared-memory tiles; blockIdx.z strides over (group, output tap).
template <typename TX, typename TY, typename TO, typename ACC>
__global__ void strided_bmm_kernel(const TX* __restrict__ X, MatView x, const TY* __restrict__ Y, MatView y,
                                   TO* __restrict__ O, MatView o, int G, int I, int J, long long K, int T,
                                   int sum_taps) {
  __shared__ ACC xs[kTile][kTile + 1];
  __shared__ ACC ys[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int i = blockIdx.y * kTile + ty;
  const int j = blockIdx.x * kTile + tx;
  const int t_out = sum_taps ? 1 : T;
  for (long long z = blockIdx.z; z < (long long)G * t_out; z += gridDim.z) {
    const long long g = z / t_out;
    const int tz = (int)(z % t_out);
    const int t0 = sum_taps ? 0 : tz, t1 = sum_taps ? T : tz + 1;
    ACC acc = 0;
    for (int t = t0; t < t1; ++t) {
      const long long xb = x.off + g * x.sg + t * x.st;
      const long long yb = y.off + g * y.sg + t * y.st;
      for (long long k0 = 0; k0 < K; k0 += kTile) {
        const long long kx = k0 + tx, ky = k0 + ty;
        xs[ty][tx] = (i < I && kx < K) ? to_acc(X[xb + i * x.sr + kx * x.sc], ACC(0)) : ACC(0);
        ys[ty][tx] = (ky < K && j < J) ? to_acc(Y[yb + ky * y.sr + j * y.sc], ACC(0)) : ACC(0);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTile; ++kk) acc += xs[ty][kk] * ys[kk][tx];
        __syncthreads();
      }
    }
    if (i < I && j < J) O[o.off + g * o.sg + (long long)tz * o.st + i * o.sr + j * o.sc] = from_acc<TO>(acc);
  }
}

template <typename TX, typename TY, typename TO, typename ACC>
cudaError_t strided_bmm(const TX* X, MatView x, const TY* Y, MatView y, TO* O, MatView o, int G, int I, int J,
                        long long K, int T, bool sum_taps, cudaStream_t stream) {
  if (G <= 0 || I <= 0 || J <= 0) return cudaSuccess;
  const long long zs = (long long)G * (sum_taps ? 1 : T);
  dim3 block(kTile, kTile);
  dim3 grid((J + kTile - 1) / kTile, (I + kTile - 1) / kTile, (unsigned)(zs < 65535 ? zs : 65535));
  strided_bmm_kernel<TX, TY, TO, ACC><<<grid, block, 0, stream>>>(X, x, Y, y, O, o, G, I, J, K, T, sum_taps ? 1 : 0);
  return cudaGetLastError();
}

}  // namespace lopfast
