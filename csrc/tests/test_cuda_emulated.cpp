// The CUDA kernels of csrc/cuda/fast_weight_unroll.cu run on the host through the emulation of
// cuda_emulation.h (blocks in order, a block's 256 threads as fibers switched at barriers, WMMA
// tiles computed whole, TF32 rounding emulated), against the CPU backend in double (itself checked
// against finite differences by test_unroll.cpp / test_linear_hvp.cpp). Covers every input form
// (mse/ce, 3-D/4-D x, shared/per-task weight and bias, no bias, lr_scale, bias_lr_scale, readout,
// first/second order, each gradient wanted or not), float32/bfloat16/float16, the FMA kernels on
// odd shapes, the tensor-core (WMMA) kernels on 16-aligned shapes with and without the column
// split, the global-memory workspace path, a GPU without TF32 tensor cores, n = 1, T = 1, B = 0.
// Every output starts NaN-filled with guard elements after it.
#include "cuda_emulation.h"

#include "../cuda/fast_weight_unroll.cu"

#include <array>
#include <cstring>
#include <string>
#include <vector>

#include "check.h"
#include "metakernels/fast_weight.h"

namespace {

using metakernels::Loss;
using metakernels::UnrollDims;
namespace mkc = metakernels::cuda;
using mkc::DType;

size_t element_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// A device buffer of `size` elements of dtype, NaN-filled, then kGuard guard elements.
struct Buffer {
  DType dtype = DType::kFloat32;
  int64_t size = 0;
  std::vector<unsigned char> bytes;
  std::vector<unsigned char> guard;

  Buffer() = default;
  Buffer(DType d, int64_t n) : dtype(d), size(n) {
    bytes.assign(static_cast<size_t>(n + mk_test::kGuard) * element_bytes(d), 0);
    for (int64_t i = 0; i < n + mk_test::kGuard; ++i)
      set(i, i < n ? mk_test::nan_value<double>() : mk_test::kSentinel + double(i));
    guard.assign(bytes.begin() + static_cast<size_t>(n) * element_bytes(d), bytes.end());
  }
  void* data() { return bytes.data(); }
  void set(int64_t i, double v) {
    unsigned char* p = bytes.data() + static_cast<size_t>(i) * element_bytes(dtype);
    if (dtype == DType::kFloat32) {
      const float f = float(v);
      std::memcpy(p, &f, 4);
    } else if (dtype == DType::kBFloat16) {
      const __nv_bfloat16 h = __float2bfloat16_rn(float(v));
      std::memcpy(p, &h, 2);
    } else {
      const __half h = __float2half_rn(float(v));
      std::memcpy(p, &h, 2);
    }
  }
  double get(int64_t i) const {
    const unsigned char* p = bytes.data() + static_cast<size_t>(i) * element_bytes(dtype);
    if (dtype == DType::kFloat32) {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    if (dtype == DType::kBFloat16) {
      __nv_bfloat16 h;
      std::memcpy(&h, p, 2);
      return __bfloat162float(h);
    }
    __half h;
    std::memcpy(&h, p, 2);
    return __half2float(h);
  }
  std::vector<double> values() const {
    std::vector<double> out(static_cast<size_t>(size));
    for (int64_t i = 0; i < size; ++i) out[static_cast<size_t>(i)] = get(i);
    return out;
  }
  bool guards_intact() const {
    return std::equal(guard.begin(), guard.end(), bytes.begin() + static_cast<size_t>(size) * element_bytes(dtype));
  }
};

// An input: random values rounded to dtype, and the same values in double for the CPU backend.
struct Input {
  Buffer device;
  std::vector<double> host;
  Input() = default;
  Input(DType d, std::vector<double> v) : device(d, int64_t(v.size())) {
    for (size_t i = 0; i < v.size(); ++i) device.set(int64_t(i), v[i]);
    host = device.values();
  }
};

const char* dtype_name(DType d) {
  return d == DType::kFloat32 ? "float32" : d == DType::kBFloat16 ? "bfloat16" : "float16";
}

// Gradients of the backward, as bits of Case::wanted.
enum Grad { kGW = 1, kGB = 2, kGX = 4, kGY = 8, kGLr = 16, kGLrScale = 32, kGBLrScale = 64, kGQ = 128 };
constexpr unsigned kAllGrads = 255;

// Points a backward's gradient outputs (the CPU reference's or the emulated kernels') at outs,
// given in the order of the Grad bits, each one only where `wanted` has its bit (else null).
template <typename P, typename Args>
void set_grad_outputs(Args& a, unsigned wanted, const std::array<P, 8>& outs) {
  const auto pick = [&](Grad g, size_t i) -> P { return (wanted & g) ? outs[i] : nullptr; };
  a.grad_weight = pick(kGW, 0);
  a.grad_bias = pick(kGB, 1);
  a.grad_x = pick(kGX, 2);
  a.grad_y = pick(kGY, 3);
  a.grad_lr = pick(kGLr, 4);
  a.grad_lr_scale = pick(kGLrScale, 5);
  a.grad_bias_lr_scale = pick(kGBLrScale, 6);
  a.grad_queries = pick(kGQ, 7);
}

struct Case {
  std::string name;
  DType dtype = DType::kFloat32;
  int64_t B = 3, T = 3, n = 5, d_in = 7, d_out = 6, m = 0;
  Loss loss = Loss::kMse;
  bool x_per_step = true, shared_weight = false, has_bias = true, shared_bias = false;
  bool lr_scale = false, bias_lr_scale = false, first_order = false;
  unsigned wanted = kAllGrads;
  bool grad_bias_final = true, grad_readout = true;  // incoming adjoints given (else null)
  // grad_lr_scale (grad_bias_lr_scale) is wanted only with lr_scale (bias_lr_scale), as from
  // autograd, unless this is set.
  bool scale_grads_without_scales = false;
  bool mma = true;
  int splits = 0;  // set_mma_splits
};

double tolerance(const Case& c, bool mma_path) {
  if (c.dtype != DType::kFloat32) return 2e-2;
  return mma_path ? 1e-4 : 2e-5;
}

void compare(const char* what, Buffer& got, const std::vector<double>& expected, double tol) {
  CHECK_MSG(got.guards_intact(), std::string(what) + ": write past the end");
  const double err = mk_test::rel_error(got.values(), expected);
  CHECK_MSG(err <= tol, std::string(what) + mk_test::fmt(": relative error %.3g > %.3g", err, tol));
}

void run_case(const Case& c) {
  mk_test::current_context() = c.name + " (" + dtype_name(c.dtype) + ")";
  mkc::set_mma_enabled(c.mma);
  mkc::set_mma_splits(c.splits);
  const DType dt = c.dtype;
  const int64_t B = c.B, T = c.T, n = c.n, d_in = c.d_in, d_out = c.d_out, m = c.m;
  const int64_t w_size = d_in * d_out, steps_x = c.x_per_step ? T : 1;
  const bool ce = c.loss == Loss::kCrossEntropy, queries = m > 0;

  UnrollDims dims;
  dims.tasks = B;
  dims.steps = T;
  dims.support = n;
  dims.d_in = d_in;
  dims.d_out = d_out;
  dims.queries = m;
  dims.loss = c.loss;

  // ---- inputs ----
  Input weight(dt, mk_test::randn<double>(static_cast<size_t>((c.shared_weight ? 1 : B) * w_size), 0.4));
  Input bias(dt, c.has_bias ? mk_test::randn<double>(static_cast<size_t>((c.shared_bias ? 1 : B) * d_out), 0.3)
                            : std::vector<double>());
  Input x(dt, mk_test::randn<double>(static_cast<size_t>(B * steps_x * n * d_in)));
  Input y(dt, ce ? std::vector<double>() : mk_test::randn<double>(static_cast<size_t>(B * steps_x * n * d_out)));
  const std::vector<int64_t> labels = ce ? mk_test::randint(static_cast<size_t>(B * steps_x * n), d_out)
                                         : std::vector<int64_t>();
  Input lr(dt, mk_test::uniform<double>(static_cast<size_t>(B * T), 0.1, 0.6));
  Input lr_scale(dt, c.lr_scale ? mk_test::uniform<double>(static_cast<size_t>(w_size), 0.5, 1.5)
                                : std::vector<double>());
  Input bias_lr_scale(dt, c.bias_lr_scale ? mk_test::uniform<double>(static_cast<size_t>(d_out), 0.5, 1.5)
                                          : std::vector<double>());
  Input q(dt, queries ? mk_test::randn<double>(static_cast<size_t>(B * T * m * d_in)) : std::vector<double>());

  metakernels::UnrollInputs<void> in;
  metakernels::UnrollInputs<double> hin;
  in.weight = weight.device.data();
  hin.weight = weight.host.data();
  in.weight_task_stride = hin.weight_task_stride = c.shared_weight ? 0 : w_size;
  if (c.has_bias) {
    in.bias = bias.device.data();
    hin.bias = bias.host.data();
    in.bias_task_stride = hin.bias_task_stride = c.shared_bias ? 0 : d_out;
  }
  in.x = x.device.data();
  hin.x = x.host.data();
  in.x_task_stride = hin.x_task_stride = steps_x * n * d_in;
  in.x_step_stride = hin.x_step_stride = c.x_per_step ? n * d_in : 0;
  if (ce) {
    in.labels = hin.labels = labels.data();
    in.labels_task_stride = hin.labels_task_stride = steps_x * n;
    in.labels_step_stride = hin.labels_step_stride = c.x_per_step ? n : 0;
  } else {
    in.y = y.device.data();
    hin.y = y.host.data();
    in.y_task_stride = hin.y_task_stride = steps_x * n * d_out;
    in.y_step_stride = hin.y_step_stride = c.x_per_step ? n * d_out : 0;
  }
  in.lr = lr.device.data();
  hin.lr = lr.host.data();
  if (c.lr_scale) {
    in.lr_scale = lr_scale.device.data();
    hin.lr_scale = lr_scale.host.data();
  }
  if (c.bias_lr_scale) {
    in.bias_lr_scale = bias_lr_scale.device.data();
    hin.bias_lr_scale = bias_lr_scale.host.data();
  }
  if (queries) {
    in.queries = q.device.data();
    hin.queries = q.host.data();
  }

  const unsigned wanted = c.wanted & (ce ? ~unsigned(kGY) : kAllGrads) &
                          (queries ? kAllGrads : ~unsigned(kGQ)) &
                          (c.has_bias ? kAllGrads : ~unsigned(kGB | kGBLrScale)) &
                          (c.lr_scale || c.scale_grads_without_scales ? kAllGrads : ~unsigned(kGLrScale)) &
                          (c.bias_lr_scale || c.scale_grads_without_scales ? kAllGrads
                                                                           : ~unsigned(kGBLrScale));
  const bool need_states = (!c.first_order && (wanted & kGX)) || (wanted & kGQ);

  // ---- forward: CPU (double) and emulated CUDA ----
  std::vector<double> h_weight(static_cast<size_t>(B * w_size)), h_bias(static_cast<size_t>(B * d_out)), h_losses(static_cast<size_t>(B * T)),
      h_readout(static_cast<size_t>(B * T * m * d_out)), h_residual(static_cast<size_t>(B * T * n * d_out)),
      h_states(static_cast<size_t>(B * T * w_size));
  metakernels::UnrollForwardOutputs<double> hout;
  hout.weight = h_weight.data();
  hout.bias = c.has_bias ? h_bias.data() : nullptr;
  hout.losses = h_losses.data();
  hout.readout = queries ? h_readout.data() : nullptr;
  hout.residual = h_residual.data();
  hout.states = h_states.data();
  metakernels::fast_weight_unroll_forward<double>(dims, hin, hout, 0, B);

  Buffer o_weight(dt, B * w_size), o_bias(dt, B * d_out), o_losses(dt, B * T),
      o_readout(dt, B * T * m * d_out), o_residual(DType::kFloat32, B * T * n * d_out),
      o_states(DType::kFloat32, B * T * w_size);
  metakernels::UnrollForwardOutputs<void> out;
  out.weight = o_weight.data();
  out.bias = c.has_bias ? o_bias.data() : nullptr;
  out.losses = o_losses.data();
  out.readout = queries ? o_readout.data() : nullptr;
  out.residual = o_residual.data();
  out.states = need_states ? o_states.data() : nullptr;

  const mk_emu::DeviceProps& dev = mk_emu::device();
  const bool aligned = n % 16 == 0 && d_in % 16 == 0 && d_out % 16 == 0 && m % 16 == 0 && n > 0;
  const bool mma_forward = c.mma && dev.major >= 8 && aligned && B > 0 &&
                           dev.max_smem_optin >= 64 * 1024;  // every aligned test shape fits
  const bool mma_backward = mma_forward && !c.lr_scale && !(wanted & kGLrScale);
  const double tol_fwd = tolerance(c, mma_forward), tol_bwd = tolerance(c, mma_backward);

  const int64_t launches_before = mk_emu::counters().launches;
  int64_t mma_before = mkc::mma_launches();
  mkc::unroll_forward(dt, dims, in, out, nullptr);
  CHECK(mkc::mma_launches() - mma_before == (mma_forward ? 1 : 0));

  compare("forward weight", o_weight, h_weight, tol_fwd);
  if (c.has_bias) compare("forward bias", o_bias, h_bias, tol_fwd);
  compare("forward losses", o_losses, h_losses, tol_fwd);
  if (queries) compare("forward readout", o_readout, h_readout, tol_fwd);
  compare("forward residual", o_residual, h_residual, tol_fwd);
  if (need_states) compare("forward states", o_states, h_states, tol_fwd);

  // ---- backward ----
  Input gw_final(dt, mk_test::randn<double>(static_cast<size_t>(B * w_size)));
  Input gb_final(dt, c.has_bias ? mk_test::randn<double>(static_cast<size_t>(B * d_out)) : std::vector<double>());
  Input g_readout(dt, queries ? mk_test::randn<double>(static_cast<size_t>(B * T * m * d_out))
                              : std::vector<double>());

  const int64_t gx_size = B * steps_x * n * d_in, gy_size = B * steps_x * n * d_out;
  std::vector<double> hg_w(static_cast<size_t>(B * w_size)), hg_b(static_cast<size_t>(B * d_out)), hg_x(static_cast<size_t>(gx_size)),
      hg_y(static_cast<size_t>(gy_size)), hg_lr(static_cast<size_t>(B * T)), hg_lrs(static_cast<size_t>(B * w_size)), hg_blrs(static_cast<size_t>(B * d_out)),
      hg_q(static_cast<size_t>(B * T * m * d_in));
  metakernels::UnrollBackwardArgs<double> hargs;
  hargs.residual = h_residual.data();
  hargs.states = h_states.data();
  hargs.weight_final = h_weight.data();
  hargs.grad_weight_final = gw_final.host.data();
  hargs.grad_bias_final = c.has_bias && c.grad_bias_final ? gb_final.host.data() : nullptr;
  hargs.grad_readout = queries && c.grad_readout ? g_readout.host.data() : nullptr;
  hargs.first_order = c.first_order;
  set_grad_outputs<double*>(hargs, wanted, {hg_w.data(), hg_b.data(), hg_x.data(), hg_y.data(),
                                            hg_lr.data(), hg_lrs.data(), hg_blrs.data(), hg_q.data()});
  metakernels::fast_weight_unroll_backward<double>(dims, hin, hargs, 0, B);

  const DType f32 = DType::kFloat32;
  Buffer g_w(f32, B * w_size), g_b(f32, B * d_out), g_x(f32, gx_size), g_y(f32, gy_size),
      g_lr(f32, B * T), g_lrs(f32, B * w_size), g_blrs(f32, B * d_out), g_q(f32, B * T * m * d_in);
  metakernels::UnrollBackwardArgs<void> args;
  args.residual = o_residual.data();
  args.states = need_states ? o_states.data() : nullptr;
  args.weight_final = o_weight.data();
  args.grad_weight_final = gw_final.device.data();
  args.grad_bias_final = c.has_bias && c.grad_bias_final ? gb_final.device.data() : nullptr;
  args.grad_readout = queries && c.grad_readout ? g_readout.device.data() : nullptr;
  args.first_order = c.first_order;
  set_grad_outputs<void*>(args, wanted, {g_w.data(), g_b.data(), g_x.data(), g_y.data(), g_lr.data(),
                                         g_lrs.data(), g_blrs.data(), g_q.data()});

  mma_before = mkc::mma_launches();
  mkc::unroll_backward(dt, dims, in, args, nullptr);
  CHECK(mkc::mma_launches() - mma_before == (mma_backward ? 1 : 0));

  if (wanted & kGW) compare("grad_weight", g_w, hg_w, tol_bwd);
  if (wanted & kGB) compare("grad_bias", g_b, hg_b, tol_bwd);
  if (wanted & kGX) compare("grad_x", g_x, hg_x, tol_bwd);
  if (wanted & kGY) compare("grad_y", g_y, hg_y, tol_bwd);
  if (wanted & kGLr) compare("grad_lr", g_lr, hg_lr, tol_bwd);
  if (wanted & kGLrScale) compare("grad_lr_scale", g_lrs, hg_lrs, tol_bwd);
  if (wanted & kGBLrScale) compare("grad_bias_lr_scale", g_blrs, hg_blrs, tol_bwd);
  if (wanted & kGQ) compare("grad_queries", g_q, hg_q, tol_bwd);
  // Unwanted gradients stay untouched.
  if (!(wanted & kGW)) CHECK(!std::isfinite(g_w.get(0)));
  if (!(wanted & kGX)) CHECK(!std::isfinite(g_x.get(0)));
  CHECK(mk_emu::counters().live_allocations == 0);
  if (B == 0) CHECK(mk_emu::counters().launches == launches_before);  // nothing to run
}

void run_hvp(DType dt, int64_t B, int64_t n, int64_t d_in, int64_t d_out, Loss loss, bool has_bias,
             bool has_v_bias, bool shared_weight) {
  mk_test::current_context() = std::string("linear_hvp ") + (loss == Loss::kMse ? "mse" : "ce") +
                               " B=" + std::to_string(B) + " n=" + std::to_string(n) + " (" +
                               dtype_name(dt) + ")";
  const int64_t w_size = d_in * d_out;
  Input weight(dt, mk_test::randn<double>(static_cast<size_t>((shared_weight ? 1 : B) * w_size), 0.5));
  Input bias(dt, has_bias ? mk_test::randn<double>(static_cast<size_t>(B * d_out)) : std::vector<double>());
  Input x(dt, mk_test::randn<double>(static_cast<size_t>(B * n * d_in)));
  Input v(dt, mk_test::randn<double>(static_cast<size_t>(B * w_size)));
  Input v_bias(dt, has_v_bias ? mk_test::randn<double>(static_cast<size_t>(d_out)) : std::vector<double>());

  metakernels::HvpArgs<double> h;
  metakernels::HvpArgs<void> a;
  a.tasks = h.tasks = B;
  a.support = h.support = n;
  a.d_in = h.d_in = d_in;
  a.d_out = h.d_out = d_out;
  a.loss = h.loss = loss;
  a.weight = weight.device.data();
  h.weight = weight.host.data();
  a.weight_task_stride = h.weight_task_stride = shared_weight ? 0 : w_size;
  if (has_bias) {
    a.bias = bias.device.data();
    h.bias = bias.host.data();
    a.bias_task_stride = h.bias_task_stride = d_out;
  }
  a.x = x.device.data();
  h.x = x.host.data();
  a.v = v.device.data();
  h.v = v.host.data();
  if (has_v_bias) {
    a.v_bias = v_bias.device.data();
    h.v_bias = v_bias.host.data();
    a.v_bias_task_stride = h.v_bias_task_stride = 0;
  }
  std::vector<double> hv_w(static_cast<size_t>(B * w_size)), hv_b(static_cast<size_t>(B * d_out));
  h.hv_weight = hv_w.data();
  h.hv_bias = hv_b.data();
  metakernels::linear_hvp_forward<double>(h, 0, B);
  Buffer o_w(dt, B * w_size), o_b(dt, B * d_out);
  a.hv_weight = o_w.data();
  a.hv_bias = o_b.data();
  mkc::linear_hvp(dt, a, nullptr);
  const double tol = dt == DType::kFloat32 ? 2e-5 : 2e-2;
  compare("hv_weight", o_w, hv_w, tol);
  compare("hv_bias", o_b, hv_b, tol);
}

// The 16-bit conversions of the emulation round to nearest even, like cuda_fp16.h/cuda_bf16.h.
void test_conversions() {
  mk_test::current_context() = "16-bit conversions";
  CHECK(__half2float(__float2half_rn(1.f + 1.f / 2048.f)) == 1.f);  // tie to even
  CHECK(__half2float(__float2half_rn(1.f + 3.f / 2048.f)) == 1.f + 2.f / 1024.f);
  CHECK(__half2float(__float2half_rn(65519.f)) == 65504.f);
  CHECK(std::isinf(__half2float(__float2half_rn(65520.f))));
  CHECK(__half2float(__float2half_rn(std::ldexp(3.f, -26))) == std::ldexp(1.f, -24));  // subnormal
  CHECK(__half2float(__float2half_rn(-2.5f)) == -2.5f);
  CHECK(std::isnan(__half2float(__float2half_rn(NAN))));
  CHECK(__bfloat162float(__float2bfloat16_rn(1.f + 1.f / 256.f)) == 1.f);  // tie to even
  CHECK(__bfloat162float(__float2bfloat16_rn(1.f + 3.f / 256.f)) == 1.f + 1.f / 64.f);
  CHECK(std::isnan(__bfloat162float(__float2bfloat16_rn(NAN))));
  CHECK(nvcuda::wmma::__float_to_tf32(1.f + 1.f / 2048.f) == 1.f + 1.f / 1024.f);  // ties away
  CHECK(nvcuda::wmma::__float_to_tf32(1.f + 1.f / 4096.f) == 1.f);
}

}  // namespace

int main() {
  // The emulated threads' schedule is random from a fixed seed; MK_CUDA_EMULATION_SEED changes it.
  if (const char* seed = std::getenv("MK_CUDA_EMULATION_SEED"))
    mk_emu::set_schedule_seed(unsigned(std::strtoul(seed, nullptr, 10)));
  test_conversions();

  const DType kDtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  std::vector<Case> cases;
  // FMA kernels, odd sizes: every input form.
  for (DType dt : kDtypes) {
    Case c;
    c.dtype = dt;
    c.name = "fma mse 4-D x, per-task weight and bias";
    cases.push_back(c);
    Case ce = c;
    ce.name = "fma ce 3-D x, shared weight and bias, readout";
    ce.loss = Loss::kCrossEntropy;
    ce.x_per_step = false;
    ce.shared_weight = ce.shared_bias = true;
    ce.m = 4;
    cases.push_back(ce);
  }
  {
    Case c;
    c.name = "fma mse 3-D x, lr_scale, bias_lr_scale, readout";
    c.x_per_step = false;
    c.lr_scale = c.bias_lr_scale = true;
    c.m = 3;
    cases.push_back(c);
    c.name = "fma ce 4-D x, lr_scale, bias_lr_scale, readout";
    c.loss = Loss::kCrossEntropy;
    c.x_per_step = true;
    cases.push_back(c);
    c.name = "fma ce first order";
    c.first_order = true;
    cases.push_back(c);
    c.name = "fma mse first order, no bias";
    c.loss = Loss::kMse;
    c.has_bias = false;
    cases.push_back(c);
    c.name = "fma mse no bias, only grad_weight";
    c.first_order = false;
    c.wanted = kGW;
    cases.push_back(c);
    c.name = "fma mse only grad_x and grad_queries";
    c.has_bias = true;
    c.wanted = kGX | kGQ;
    cases.push_back(c);
    c.name = "fma mse grad_lr, grad_y, grad_bias_lr_scale only";
    c.wanted = kGLr | kGY | kGBLrScale;
    cases.push_back(c);
    c.name = "fma grad_lr_scale and grad_bias_lr_scale without the scales";
    c.lr_scale = c.bias_lr_scale = false;
    c.scale_grads_without_scales = true;
    c.wanted = kGLrScale | kGBLrScale | kGW;
    cases.push_back(c);
    c.scale_grads_without_scales = false;
    c.name = "fma readout without grad_readout, bias without grad_bias_final";
    c.wanted = kAllGrads;
    c.grad_readout = c.grad_bias_final = false;
    cases.push_back(c);
  }
  {
    Case c;  // columns beyond one warp's share: warps finish the X̂ product at different times
    c.name = "fma wide d_out";
    c.B = 2, c.T = 2, c.d_in = 13, c.d_out = 33, c.m = 3;
    c.lr_scale = c.bias_lr_scale = true;
    cases.push_back(c);
  }
  {
    Case c;
    c.name = "fma n=1";
    c.n = 1;
    cases.push_back(c);
    c.name = "fma T=1, readout";
    c.n = 5;
    c.T = 1;
    c.m = 2;
    cases.push_back(c);
    c.name = "fma B=0";
    c.B = 0;
    cases.push_back(c);
    c.name = "fma d_out=1 ce";
    c.B = 2;
    c.T = 2;
    c.d_out = 1;
    c.loss = Loss::kCrossEntropy;
    cases.push_back(c);
  }
  // Tensor-core kernels on 16-aligned shapes, and the same shapes forced onto the FMA kernels.
  for (DType dt : kDtypes) {
    for (bool mma : {true, false}) {
      Case c;
      c.dtype = dt;
      c.mma = mma;
      c.B = 2, c.T = 2, c.n = 16, c.d_in = 16, c.d_out = 32, c.m = 16;
      c.name = std::string(mma ? "mma" : "fma(forced)") + " mse 4-D, readout, coupled";
      cases.push_back(c);
      c.name = std::string(mma ? "mma" : "fma(forced)") + " ce 3-D, shared weight";
      c.loss = Loss::kCrossEntropy;
      c.x_per_step = false;
      c.shared_weight = c.shared_bias = true;
      c.m = 0;
      cases.push_back(c);
      if (dt != DType::kFloat32) continue;
      c.name = std::string(mma ? "mma" : "fma(forced)") + " mse split columns (backward too)";
      c.loss = Loss::kMse;
      c.x_per_step = true;
      c.shared_weight = c.shared_bias = false;
      c.d_in = 32;
      c.d_out = 64;
      c.m = 16;
      c.bias_lr_scale = true;
      c.wanted = kGW | kGB | kGY | kGBLrScale;
      cases.push_back(c);
      c.name = std::string(mma ? "mma" : "fma(forced)") + " mse splits forced to 1";
      c.splits = 1;
      cases.push_back(c);
      c.name = std::string(mma ? "mma" : "fma(forced)") + " mse splits forced to 2, first order";
      c.splits = 2;
      c.first_order = true;
      cases.push_back(c);
      c.name = std::string(mma ? "mma" : "fma") + " forward, lr_scale (backward on FMA)";
      c.splits = 0;
      c.first_order = false;
      c.lr_scale = true;
      c.wanted = kAllGrads;
      cases.push_back(c);
    }
  }
  {
    Case c;  // 16 output tiles: the two-tile strips of mma_gemm
    c.name = "mma strips of two tiles, one split";
    c.B = 1, c.T = 2, c.n = 16, c.d_in = 64, c.d_out = 64;
    c.splits = 1;
    cases.push_back(c);
    // Every product with more tiles than warps take half: warp strips everywhere, no K split.
    for (DType dt : {DType::kFloat32, DType::kBFloat16})
      for (Loss loss : {Loss::kMse, Loss::kCrossEntropy}) {
        Case many = c;
        many.name = "mma many tiles (strips in every product)";
        many.dtype = dt;
        many.loss = loss;
        many.B = 1, many.T = 2, many.n = 48, many.d_in = 48, many.d_out = 48, many.m = 48;
        cases.push_back(many);
      }
    c.name = "mma ce n=32, readout";
    c.loss = Loss::kCrossEntropy;
    c.n = 32, c.d_in = 16, c.m = 16;
    c.splits = 0;
    cases.push_back(c);
    c.name = "mma T=1";
    c.T = 1, c.B = 3, c.d_out = 16;
    cases.push_back(c);
    c.name = "mma mse 3-D x split columns, grad_y summed over steps";
    c.loss = Loss::kMse;
    c.T = 3, c.B = 2, c.d_out = 64, c.m = 0, c.n = 16;
    c.x_per_step = false;
    c.wanted = kGW | kGB | kGY;
    cases.push_back(c);
    c.name = "mma readout without grad_readout, bias without grad_bias_final";
    c.m = 16;
    c.wanted = kAllGrads;
    c.grad_readout = c.grad_bias_final = false;
    cases.push_back(c);
  }
  for (const Case& c : cases) run_case(c);

  // A GPU without TF32 tensor cores takes the FMA kernels on aligned shapes.
  {
    mk_emu::device().major = 7;
    Case c;
    c.name = "sm_75: aligned shape on FMA kernels";
    c.B = 2, c.T = 2, c.n = 16, c.d_in = 16, c.d_out = 32, c.m = 16;
    run_case(c);
    mk_emu::device().major = 9;
  }
  // Shared memory for the FMA kernels' working set but not for the tensor-core layout (staged
  // X, Q and per-warp tiles): aligned shapes fall back to the FMA kernels.
  {
    mk_emu::device().max_smem_optin = 12000;
    Case c;
    c.name = "aligned shape, tensor-core layout too big for shared memory";
    c.B = 2, c.T = 2, c.n = 16, c.d_in = 16, c.d_out = 32, c.m = 16;
    run_case(c);
    mk_emu::device().max_smem_optin = 232448;
  }
  // A working set beyond shared memory: the global-memory workspace (and no tensor cores).
  {
    mk_emu::device().max_smem_optin = 256;  // only the static shared memory fits
    mk_emu::device().sms = 1;               // 4 CTAs: a grid-stride loop over the 6 tasks
    const int64_t allocations = mk_emu::counters().allocations;
    Case c;
    c.name = "global-memory workspace, mse";
    c.B = 6;
    c.m = 3;
    run_case(c);
    c.name = "global-memory workspace, ce, aligned";
    c.loss = Loss::kCrossEntropy;
    c.B = 2, c.T = 2, c.n = 16, c.d_in = 16, c.d_out = 32, c.m = 16;
    run_case(c);
    run_hvp(DType::kFloat32, 6, 5, 7, 6, Loss::kCrossEntropy, true, true, false);
    mk_test::current_context() = "global-memory workspace";
    CHECK_MSG(mk_emu::counters().allocations - allocations == 5,
              std::to_string(mk_emu::counters().allocations - allocations));
    mk_emu::device().max_smem_optin = 232448;
    mk_emu::device().sms = 132;
  }
  // More than 48 KB of dynamic shared memory: the launch needs cudaFuncSetAttribute.
  {
    Case c;
    c.name = "fma > 48 KB shared memory";
    c.B = 1, c.T = 1, c.n = 3, c.d_in = 113, c.d_out = 110;
    c.wanted = kGW | kGB | kGLr;
    run_case(c);
  }

  for (DType dt : kDtypes)
    for (Loss loss : {Loss::kMse, Loss::kCrossEntropy}) {
      run_hvp(dt, 3, 5, 7, 6, loss, true, true, false);
      run_hvp(dt, 2, 1, 4, 3, loss, false, false, true);
    }
  mk_test::current_context() = "linear_hvp B=0";
  const int64_t launches = mk_emu::counters().launches;
  metakernels::HvpArgs<void> empty;
  mkc::linear_hvp(DType::kFloat32, empty, nullptr);
  CHECK(mk_emu::counters().launches == launches);

  return mk_test::report("test_cuda_emulated");
}
