// Torch glue of lopfast._C: tensor checks, workspace allocation, the current stream, and the
// pybind11 module. Built only where a CUDA build of torch is installed (setup.py with
// LOPFAST_BUILD_CUDA=1, or torch.utils.cpp_extension.load on first use); the kernels
// themselves are plain CUDA in *.cu (see lopfast_cuda.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <climits>
#include <vector>

#include "lopfast_cuda.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return LOPFAST_F32;
    case at::kDouble: return LOPFAST_F64;
    case at::kHalf: return LOPFAST_F16;
    case at::kBFloat16: return LOPFAST_BF16;
    default: TORCH_CHECK(false, "lopfast._C: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lopfast._C: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "lopfast._C: ", name, " must be contiguous");
}

void check_status(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "lopfast._C ", what, " failed: ", cudaGetErrorString(e));
}

struct ChainDims {
  int64_t G, n_g, m_g, p_g, q_g, T, kh, kw;
};

ChainDims chain_dims(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3, int64_t groups) {
  check_cuda(w1, "w1"); check_cuda(w2, "w2"); check_cuda(w3, "w3");
  TORCH_CHECK(w1.dim() == 4 && w2.dim() == 4 && w3.dim() == 4, "lopfast._C collapse: 4-d factors expected");
  TORCH_CHECK(w1.scalar_type() == w2.scalar_type() && w2.scalar_type() == w3.scalar_type(),
              "lopfast._C collapse: factors must share a dtype");
  ChainDims d;
  d.G = groups;
  d.m_g = w1.size(1);
  d.p_g = w2.size(1);
  d.q_g = w3.size(1);
  d.kh = w2.size(2);
  d.kw = w2.size(3);
  d.T = d.kh * d.kw;
  TORCH_CHECK(groups >= 1 && w1.size(0) == groups * d.p_g && w2.size(0) == groups * d.q_g &&
                  w3.size(0) % groups == 0,
              "lopfast._C collapse: inconsistent chain shapes for groups=", groups);
  d.n_g = w3.size(0) / groups;
  return d;
}

at::Tensor collapse_forward(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3, int64_t groups) {
  const ChainDims d = chain_dims(w1, w2, w3, groups);
  const c10::cuda::CUDAGuard guard(w1.device());
  const int code = dtype_code(w1);
  auto out = at::empty({d.G * d.n_g, d.m_g, d.kh, d.kw}, w1.options());
  const size_t bytes = lopfast_collapse_workspace_bytes(code, d.G, d.n_g, d.m_g, d.p_g, d.q_g, d.T, 0);
  auto ws = at::empty({(int64_t)bytes}, w1.options().dtype(at::kByte));
  check_status(lopfast_collapse_forward(code, w1.data_ptr(), w2.data_ptr(), w3.data_ptr(), out.data_ptr(),
                                        ws.data_ptr(), d.G, d.n_g, d.m_g, d.p_g, d.q_g, d.T,
                                        at::cuda::getCurrentCUDAStream()),
               "collapse_forward");
  return out;
}

std::vector<at::Tensor> collapse_backward(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3,
                                          int64_t groups, const at::Tensor& grad) {
  const ChainDims d = chain_dims(w1, w2, w3, groups);
  check_cuda(grad, "grad");
  TORCH_CHECK(grad.scalar_type() == w1.scalar_type(), "lopfast._C collapse_backward: grad dtype mismatch");
  TORCH_CHECK(grad.numel() == d.G * d.n_g * d.m_g * d.T, "lopfast._C collapse_backward: grad shape mismatch");
  const c10::cuda::CUDAGuard guard(w1.device());
  const int code = dtype_code(w1);
  auto d1 = at::empty_like(w1), d2 = at::empty_like(w2), d3 = at::empty_like(w3);
  const size_t bytes = lopfast_collapse_workspace_bytes(code, d.G, d.n_g, d.m_g, d.p_g, d.q_g, d.T, 1);
  auto ws = at::empty({(int64_t)bytes}, w1.options().dtype(at::kByte));
  check_status(lopfast_collapse_backward(code, w1.data_ptr(), w2.data_ptr(), w3.data_ptr(), grad.data_ptr(),
                                         d1.data_ptr(), d2.data_ptr(), d3.data_ptr(), ws.data_ptr(), d.G, d.n_g,
                                         d.m_g, d.p_g, d.q_g, d.T, at::cuda::getCurrentCUDAStream()),
               "collapse_backward");
  return {d1, d2, d3};
}

void check_pairs(const std::vector<at::Tensor>& s, const std::vector<at::Tensor>& t) {
  TORCH_CHECK(!s.empty() && s.size() == t.size(), "lopfast._C sp_loss: need as many teacher as student features");
  for (size_t k = 0; k < s.size(); ++k) {
    check_cuda(s[k], "student feature");
    check_cuda(t[k], "teacher feature");
    TORCH_CHECK(s[k].size(0) == s[0].size(0) && t[k].size(0) == s[0].size(0),
                "lopfast._C sp_loss: every feature must have the same batch size");
    TORCH_CHECK(s[k].scalar_type() == s[0].scalar_type() && t[k].scalar_type() == s[0].scalar_type(),
                "lopfast._C sp_loss: every feature must share a dtype");
    // the backward's matmul takes the feature count as an int (the Gram's K is 64-bit)
    TORCH_CHECK(s[0].size(0) == 0 || s[k].numel() / s[0].size(0) <= INT_MAX,
                "lopfast._C sp_loss: more than 2**31 - 1 features per sample in student feature ", k);
  }
}

// Sum over pairs of |Gn_T - Gn_S|_F^2 / b^2, returned as a 0-d tensor in the accumulation
// dtype (float32; float64 for float64 features).
at::Tensor sp_loss_forward(const std::vector<at::Tensor>& students, const std::vector<at::Tensor>& teachers) {
  check_pairs(students, teachers);
  const c10::cuda::CUDAGuard guard(students[0].device());
  const int code = dtype_code(students[0]);
  const int64_t b = students[0].size(0);
  auto loss = at::zeros({}, students[0].options().dtype(acc_type(students[0])));
  auto ws = at::empty({(int64_t)lopfast_sp_pair_workspace_bytes(code, (int)b, 0)},
                      students[0].options().dtype(at::kByte));
  auto stream = at::cuda::getCurrentCUDAStream();
  for (size_t k = 0; k < students.size(); ++k) {
    check_status(lopfast_sp_pair_forward(code, students[k].data_ptr(), teachers[k].data_ptr(), (int)b,
                                         students[k].numel() / b, teachers[k].numel() / b, loss.data_ptr(),
                                         ws.data_ptr(), stream),
                 "sp_loss_forward");
  }
  return loss;
}

std::vector<at::Tensor> sp_loss_backward(const std::vector<at::Tensor>& students,
                                         const std::vector<at::Tensor>& teachers, const at::Tensor& grad) {
  check_pairs(students, teachers);
  const c10::cuda::CUDAGuard guard(students[0].device());
  const int code = dtype_code(students[0]);
  const int64_t b = students[0].size(0);
  auto go = grad.to(students[0].device(), acc_type(students[0])).contiguous();
  auto ws = at::empty({(int64_t)lopfast_sp_pair_workspace_bytes(code, (int)b, 1)},
                      students[0].options().dtype(at::kByte));
  auto stream = at::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> grads;
  for (size_t k = 0; k < students.size(); ++k) {
    auto dq = at::empty_like(students[k]);
    check_status(lopfast_sp_pair_backward(code, students[k].data_ptr(), teachers[k].data_ptr(), (int)b,
                                          students[k].numel() / b, teachers[k].numel() / b, go.data_ptr(),
                                          dq.data_ptr(), ws.data_ptr(), stream),
                 "sp_loss_backward");
    grads.push_back(dq);
  }
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lopfast CUDA C++ fallbacks: collapse and SP Gram loss (forward and backward)";
  m.def("collapse_forward", &collapse_forward, "W3.W2.W1 per tap and group (w1, w2, w3, groups)");
  m.def("collapse_backward", &collapse_backward, "(dw1, dw2, dw3) from dW (w1, w2, w3, groups, grad)");
  m.def("sp_loss_forward", &sp_loss_forward, "SP Gram loss over (student, teacher) pairs");
  m.def("sp_loss_backward", &sp_loss_backward, "student gradients of the SP Gram loss");
}
