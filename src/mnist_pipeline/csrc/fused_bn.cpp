// Fused CPU kernels for training: BatchNorm (batch statistics) + ReLU, and BatchNorm +
// 2x2/stride-2 max-pool + ReLU, forward and backward, on float32 channels-last tensors.
//
// Eager PyTorch runs these as 3-5 separate kernels, each a pass over tensors of 5-10 MB that
// do not fit in the caches: on a 2-core machine that memory traffic, not arithmetic, is most
// of a step outside the convolutions. Here each direction is two passes (statistics, then
// apply), the pool keeps an int32 argmax (0..3) instead of an int64 index, and the pool's
// input gradient is written once instead of zero-filled and then scattered.
//
// The arithmetic is eager PyTorch's (the same formulas; max-pool's first-maximum rule and
// NaN propagation); sums are accumulated in double over a fixed number of row chunks (the
// same whatever the thread count) combined in chunk order, so results are bit-identical with
// any number of threads for a given build and differ from eager only in rounding. The channel
// loop is compiled for C = 16, 32 and 64 (the model's widths) so that it vectorises, with a
// generic fallback. mnist_pipeline/fused.py wraps the kernels
// in autograd Functions.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace {

using Tensor = at::Tensor;

// Run the statement with a constexpr CT = C for the model's widths, else CT = 0 (C at run
// time): the kernels take `CT ? CT : C` as their channel count.
#define DISPATCH_C(C, ...)                         \
  switch (C) {                                     \
    case 16: { constexpr int CT = 16; __VA_ARGS__; break; } \
    case 32: { constexpr int CT = 32; __VA_ARGS__; break; } \
    case 64: { constexpr int CT = 64; __VA_ARGS__; break; } \
    default: { constexpr int CT = 0; __VA_ARGS__; break; }  \
  }

// Before each channel loop: keep it a loop. GCC would otherwise unroll a loop of 16 into
// scalar copies before vectorising, and selects (relu, argmax) in them stay scalar.
#if defined(__GNUC__) && !defined(__clang__)
#define VECTOR_LOOP _Pragma("GCC unroll 1")
#else
#define VECTOR_LOOP
#endif

// [0, rows) in `chunks` fixed ranges, run in parallel: f(chunk, begin, end).
template <typename F>
void for_chunks(int64_t rows, int64_t chunks, const F& f) {
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t k = c0; k < c1; ++k) f(k, rows * k / chunks, rows * (k + 1) / chunks);
  });
}

// Chunks per sum: enough to balance the load over the threads of most machines, and fixed, not
// derived from at::get_num_threads(), so that where a chunk starts (and hence every partial
// sum) does not depend on the thread count.
constexpr int64_t kChunks = 64;

int64_t chunk_count(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(kChunks, rows));
}

// Per-chunk [C] double partials summed in chunk order.
std::vector<double> combine(const std::vector<double>& parts, int64_t chunks, int64_t C) {
  std::vector<double> out(C, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    VECTOR_LOOP
    for (int64_t c = 0; c < C; ++c) out[c] += parts[k * C + c];
  return out;
}

Tensor channels_last(const Tensor& t) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kFloat && t.device().is_cpu(),
              "fused_bn: expected a 4-D float32 CPU tensor");
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

Tensor vec(const Tensor& t, int64_t C) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == C && t.scalar_type() == at::kFloat &&
                  t.device().is_cpu(),
              "fused_bn: expected a float32 CPU tensor of ", C, " channel values");
  return t.contiguous();
}

void check_shape(const Tensor& t, const Tensor& x, int64_t H, int64_t W, const char* what) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == x.size(0) && t.size(1) == x.size(1) &&
                  t.size(2) == H && t.size(3) == W,
              "fused_bn: ", what, " has shape ", t.sizes(), ", expected [", x.size(0), ", ",
              x.size(1), ", ", H, ", ", W, "]");
}

Tensor empty_nhwc(const Tensor& x, int64_t H, int64_t W, at::ScalarType dtype) {
  return at::empty({x.size(0), x.size(1), H, W},
                   x.options().dtype(dtype).memory_format(at::MemoryFormat::ChannelsLast));
}

inline float relu(float v) { return v > 0.f ? v : (v == v ? 0.f : v); }  // NaN stays NaN

constexpr int64_t kMaxC = 64;  // channel block of the generic (runtime C) loops

// Rows [r0, r1) of x [M, C]: s1 += x, s2 += x * x, in double.
template <int CT>
void row_moments(const float* __restrict xp, double* __restrict s1, double* __restrict s2,
                 int64_t r0, int64_t r1, int64_t C_) {
  const int64_t C = CT ? CT : C_;
  for (int64_t r = r0; r < r1; ++r)
    VECTOR_LOOP
    for (int64_t c = 0; c < C; ++c) {
      const double v = xp[r * C + c];
      s1[c] += v;
      s2[c] += v * v;
    }
}

// Per-channel sums of x and x^2 over x [M, C], in double (per-chunk partials in chunk order).
template <int CT>
std::pair<std::vector<double>, std::vector<double>> moments(const float* xp, int64_t M,
                                                            int64_t C_) {
  const int64_t C = CT ? CT : C_;
  const int64_t chunks = chunk_count(M);
  std::vector<double> p1(chunks * C, 0.0), p2(chunks * C, 0.0);
  for_chunks(M, chunks, [&](int64_t k, int64_t r0, int64_t r1) {
    row_moments<CT>(xp, &p1[k * C], &p2[k * C], r0, r1, C);
  });
  return {combine(p1, chunks, C), combine(p2, chunks, C)};
}

struct Stats {
  Tensor mean, invstd, var;  // var: unbiased, for the running estimate
  std::vector<float> alpha, beta;  // y = x * alpha + beta, as eager BatchNorm computes it
};

// Batch mean, 1/sqrt(biased var + eps), unbiased var and the affine map per channel from the
// sums of x and x^2 over M values (one pass over x). Eager makes two passes (the mean, then
// the squared deviations from it) to avoid cancellation in float; in double,
// sum(x^2) - sum(x) * mean has a relative error of about 1e-16 * (1 + mean^2 / var), far
// below float rounding unless |mean| / std exceeds ~1e4 (tests/test_fused.py compares
// against float64).
Stats stats_from_moments(const std::vector<double>& s1, const std::vector<double>& s2,
                         int64_t M, const Tensor& weight, const Tensor& bias, double eps) {
  const int64_t C = static_cast<int64_t>(s1.size());
  TORCH_CHECK(M > 1, "fused_bn: expected more than 1 value per channel when training");
  auto opts = at::TensorOptions().dtype(at::kFloat);
  Stats s{at::empty({C}, opts), at::empty({C}, opts), at::empty({C}, opts), {}, {}};
  float *mp = s.mean.data_ptr<float>(), *ip = s.invstd.data_ptr<float>();
  float* vp = s.var.data_ptr<float>();
  const Tensor w = vec(weight, C), b = vec(bias, C);
  s.alpha.resize(C);
  s.beta.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const double mean = s1[c] / static_cast<double>(M);
    const double d = s2[c] - s1[c] * mean;  // the sum of squared deviations
    const double sq = d < 0.0 ? 0.0 : d;     // (rounding can take it below 0; NaN stays NaN)
    mp[c] = static_cast<float>(mean);
    ip[c] = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(M) + eps));
    vp[c] = static_cast<float>(sq / static_cast<double>(M - 1));
    s.alpha[c] = ip[c] * w.data_ptr<float>()[c];
    s.beta[c] = b.data_ptr<float>()[c] - mp[c] * s.alpha[c];
  }
  return s;
}

Stats stats_and_affine(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
  const int64_t C = x.size(1), M = x.numel() / C;
  std::pair<std::vector<double>, std::vector<double>> sums;
  DISPATCH_C(C, sums = moments<CT>(x.data_ptr<float>(), M, C));
  return stats_from_moments(sums.first, sums.second, M, weight, bias, eps);
}

template <int CT>
void bn_relu_rows(const float* __restrict xp, float* __restrict yp,
                  const float* __restrict alpha, const float* __restrict beta, int64_t r0,
                  int64_t r1, int64_t C_) {
  const int64_t C = CT ? CT : C_;
  for (int64_t r = r0; r < r1; ++r)
    VECTOR_LOOP
    for (int64_t c = 0; c < C; ++c) yp[r * C + c] = relu(xp[r * C + c] * alpha[c] + beta[c]);
}

template <int CT>
void bn_relu_apply(const float* xp, float* yp, int64_t M, int64_t C, const float* alpha,
                   const float* beta) {
  for_chunks(M, chunk_count(M), [&](int64_t, int64_t r0, int64_t r1) {
    bn_relu_rows<CT>(xp, yp, alpha, beta, r0, r1, C);
  });
}

// relu(batch_norm(x)): returns (y, mean, invstd, var_unbiased).
std::vector<Tensor> bn_relu_forward(const Tensor& input, const Tensor& weight,
                                    const Tensor& bias, double eps) {
  Tensor x = channels_last(input);
  const int64_t C = x.size(1), M = x.numel() / C;
  Stats s = stats_and_affine(x, weight, bias, eps);
  Tensor y = empty_nhwc(x, x.size(2), x.size(3), at::kFloat);
  DISPATCH_C(C, bn_relu_apply<CT>(x.data_ptr<float>(), y.data_ptr<float>(), M, C,
                                  s.alpha.data(), s.beta.data()));
  return {y, s.mean, s.invstd, s.var};
}

// Output rows [r0, r1) (n, ho) of relu(max_pool2d(x * alpha + beta)) and the argmax.
template <int CT>
void pool_rows(const float* __restrict xp, float* __restrict op, int32_t* __restrict ap,
               const float* __restrict al, const float* __restrict be, int64_t r0,
               int64_t r1, int64_t C_, int64_t H, int64_t W) {
  const int64_t C = CT ? CT : C_, Ho = H / 2, Wo = W / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / Ho, ho = r % Ho;
    for (int64_t wo = 0; wo < Wo; ++wo) {
      const float* p0 = xp + ((n * H + 2 * ho) * W + 2 * wo) * C;
      const float* p1 = p0 + C;
      const float* p2 = p0 + W * C;
      const float* p3 = p2 + C;
      const int64_t o = ((n * Ho + ho) * Wo + wo) * C;
      VECTOR_LOOP
      for (int64_t c = 0; c < C; ++c) {
        // Scan order (0,0), (0,1), (1,0), (1,1); take v if v > best or v is NaN (eager).
        float best = p0[c] * al[c] + be[c];
        int32_t which = 0;
        const float v1 = p1[c] * al[c] + be[c];
        const bool t1 = v1 > best || v1 != v1;
        best = t1 ? v1 : best;
        which = t1 ? 1 : which;
        const float v2 = p2[c] * al[c] + be[c];
        const bool t2 = v2 > best || v2 != v2;
        best = t2 ? v2 : best;
        which = t2 ? 2 : which;
        const float v3 = p3[c] * al[c] + be[c];
        const bool t3 = v3 > best || v3 != v3;
        best = t3 ? v3 : best;
        which = t3 ? 3 : which;
        op[o + c] = relu(best);
        ap[o + c] = which;
      }
    }
  }
}

template <int CT>
void pool_apply(const float* xp, float* op, int32_t* ap, int64_t N, int64_t C, int64_t H,
                int64_t W, const float* alpha, const float* beta) {
  const int64_t rows = N * (H / 2);
  for_chunks(rows, chunk_count(rows), [&](int64_t, int64_t r0, int64_t r1) {
    pool_rows<CT>(xp, op, ap, alpha, beta, r0, r1, C, H, W);
  });
}

// relu(max_pool2d(batch_norm(x), 2, 2)): returns (out, argmax 0..3 as int32, mean, invstd,
// var_unbiased).
std::vector<Tensor> bn_pool_relu_forward(const Tensor& input, const Tensor& weight,
                                         const Tensor& bias, double eps) {
  Tensor x = channels_last(input);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H >= 2 && W >= 2, "fused_bn: the input is smaller than the 2x2 pool");
  Stats s = stats_and_affine(x, weight, bias, eps);
  Tensor out = empty_nhwc(x, H / 2, W / 2, at::kFloat);
  Tensor arg = empty_nhwc(x, H / 2, W / 2, at::kInt);
  DISPATCH_C(C, pool_apply<CT>(x.data_ptr<float>(), out.data_ptr<float>(),
                               arg.data_ptr<int32_t>(), N, C, H, W, s.alpha.data(),
                               s.beta.data()));
  return {out, arg, s.mean, s.invstd, s.var};
}

// Eager's formula: dx = (dy - (x - mean) * k - grad_mean) * invstd * w, with
// k = sum(dy * (x - mean)) * invstd^2 / M and grad_mean = sum(dy) / M.
struct Backward {
  std::vector<float> mean, k, grad_mean, scale;
  Tensor grad_weight, grad_bias;  // sum(dy * (x - mean)) * invstd and sum(dy)
  Backward(const Tensor& mean_t, const Tensor& invstd_t, const Tensor& weight,
           const std::vector<double>& sum, const std::vector<double>& dotp, int64_t M) {
    const int64_t C = mean_t.numel();
    const float *mp = mean_t.data_ptr<float>(), *ip = invstd_t.data_ptr<float>();
    const Tensor w = vec(weight, C);
    mean.assign(mp, mp + C);
    k.resize(C);
    grad_mean.resize(C);
    scale.resize(C);
    grad_weight = at::empty({C}, invstd_t.options());
    grad_bias = at::empty({C}, invstd_t.options());
    VECTOR_LOOP
    for (int64_t c = 0; c < C; ++c) {
      const double is = ip[c];
      k[c] = static_cast<float>(dotp[c] * is * is / static_cast<double>(M));
      grad_mean[c] = static_cast<float>(sum[c] / static_cast<double>(M));
      scale[c] = static_cast<float>(is * w.data_ptr<float>()[c]);
      grad_weight.data_ptr<float>()[c] = static_cast<float>(dotp[c] * is);
      grad_bias.data_ptr<float>()[c] = static_cast<float>(sum[c]);
    }
  }
};

// Rows [r0, r1) of x [M, C]: s += dy, d += dy * (x - m), with dy = g where y > 0.
template <int CT>
void relu_sums(const float* __restrict gp, const float* __restrict yp, const float* __restrict xp,
               const float* __restrict m, double* __restrict s, double* __restrict d,
               int64_t r0, int64_t r1, int64_t C_) {
  const int64_t C = CT ? CT : C_;
  float dy[CT ? CT : kMaxC];
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c0 = 0; c0 < C; c0 += kMaxC) {  // once for the compiled widths
      const int64_t len = std::min<int64_t>(kMaxC, C - c0);
      const float* g = gp + r * C + c0;
      const float* y = yp + r * C + c0;
      const float* x = xp + r * C + c0;
      // the select in a loop of its own (with the sums it would not vectorise)
      VECTOR_LOOP
      for (int64_t c = 0; c < len; ++c) dy[c] = y[c] > 0.f ? g[c] : 0.f;
      VECTOR_LOOP
      for (int64_t c = 0; c < len; ++c) {
        s[c0 + c] += dy[c];
        d[c0 + c] += static_cast<double>(dy[c]) * (x[c] - m[c0 + c]);
      }
    }
}

template <int CT>
void relu_dx(const float* __restrict gp, const float* __restrict yp, const float* __restrict xp,
             float* __restrict dp, const float* __restrict m, const float* __restrict k,
             const float* __restrict gm, const float* __restrict sc, int64_t r0, int64_t r1,
             int64_t C_) {
  const int64_t C = CT ? CT : C_;
  for (int64_t r = r0; r < r1; ++r)
    VECTOR_LOOP
    for (int64_t c = 0; c < C; ++c) {
      const float gv = gp[r * C + c];
      const float dy = yp[r * C + c] > 0.f ? gv : 0.f;
      dp[r * C + c] = (dy - (xp[r * C + c] - m[c]) * k[c] - gm[c]) * sc[c];
    }
}

template <int CT>
Backward bn_relu_grads(const float* gp, const float* yp, const float* xp, float* dp, int64_t M,
                       int64_t C_, const Tensor& mean, const Tensor& invstd,
                       const Tensor& weight) {
  const int64_t C = CT ? CT : C_;
  const float* mp = mean.data_ptr<float>();
  const int64_t chunks = chunk_count(M);
  std::vector<double> sums(chunks * C, 0.0), dots(chunks * C, 0.0);
  for_chunks(M, chunks, [&](int64_t k, int64_t r0, int64_t r1) {
    relu_sums<CT>(gp, yp, xp, mp, &sums[k * C], &dots[k * C], r0, r1, C);
  });
  Backward b(mean, invstd, weight, combine(sums, chunks, C), combine(dots, chunks, C), M);
  for_chunks(M, chunk_count(M), [&](int64_t, int64_t r0, int64_t r1) {
    relu_dx<CT>(gp, yp, xp, dp, b.mean.data(), b.k.data(), b.grad_mean.data(),
                b.scale.data(), r0, r1, C);
  });
  return b;
}

// Gradients of relu(batch_norm(x)) given dL/dy: returns (dx, dweight, dbias).
std::vector<Tensor> bn_relu_backward(const Tensor& grad_y, const Tensor& y_in,
                                     const Tensor& x_in, const Tensor& mean,
                                     const Tensor& invstd, const Tensor& weight) {
  Tensor g = channels_last(grad_y), y = channels_last(y_in), x = channels_last(x_in);
  const int64_t C = x.size(1), M = x.numel() / C;
  check_shape(g, x, x.size(2), x.size(3), "the gradient");
  check_shape(y, x, x.size(2), x.size(3), "the output");
  Tensor dx = empty_nhwc(x, x.size(2), x.size(3), at::kFloat);
  const float *gp = g.data_ptr<float>(), *yp = y.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  const Tensor m = vec(mean, C), is = vec(invstd, C);
  std::vector<Tensor> result;
  DISPATCH_C(C, {
    Backward b = bn_relu_grads<CT>(gp, yp, xp, dp, M, C, m, is, weight);
    result = {dx, b.grad_weight, b.grad_bias};
  });
  return result;
}

// Output rows [r0, r1) (n, ho): s += dy, d += dy * (x - m) at the selected positions, and
// gg = dL/d(pool output) through the ReLU, for pool_dx.
template <int CT>
void pool_sums(const float* __restrict gp, const float* __restrict op,
               const int32_t* __restrict ap, const float* __restrict xp,
               const float* __restrict m, float* __restrict gg, double* __restrict s,
               double* __restrict d, int64_t r0, int64_t r1, int64_t C_, int64_t H, int64_t W) {
  const int64_t C = CT ? CT : C_, Ho = H / 2, Wo = W / 2;
  float xs[CT ? CT : kMaxC];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / Ho, ho = r % Ho;
    for (int64_t wo = 0; wo < Wo; ++wo) {
      const int64_t o = ((n * Ho + ho) * Wo + wo) * C;
      const float* p0 = xp + ((n * H + 2 * ho) * W + 2 * wo) * C;
      const float* p1 = p0 + C;
      const float* p2 = p0 + W * C;
      const float* p3 = p2 + C;
      for (int64_t c0 = 0; c0 < C; c0 += kMaxC) {  // once for the compiled widths
        const int64_t len = std::min<int64_t>(kMaxC, C - c0);
        const int64_t oc = o + c0;
        // the selects in a loop of their own (with the sums they would not vectorise)
        VECTOR_LOOP
        for (int64_t c = 0; c < len; ++c) {  // (loads outside the selects: they vectorise)
          const int32_t j = ap[oc + c];
          const float x0 = p0[c0 + c], x1 = p1[c0 + c], x2 = p2[c0 + c], x3 = p3[c0 + c];
          const float gv = gp[oc + c];
          xs[c] = j == 0 ? x0 : j == 1 ? x1 : j == 2 ? x2 : x3;
          gg[oc + c] = op[oc + c] > 0.f ? gv : 0.f;
        }
        VECTOR_LOOP
        for (int64_t c = 0; c < len; ++c) {
          s[c0 + c] += gg[oc + c];
          d[c0 + c] += static_cast<double>(gg[oc + c]) * (xs[c] - m[c0 + c]);
        }
      }
    }
  }
}

// Input rows [r0, r1) (n, h): dx for every position (dy = 0 outside the pooled area).
template <int CT>
void pool_dx(const float* __restrict gg, const int32_t* __restrict ap,
             const float* __restrict xp, float* __restrict dp, const float* __restrict m,
             const float* __restrict k, const float* __restrict gm, const float* __restrict sc,
             int64_t r0, int64_t r1, int64_t C_, int64_t H, int64_t W) {
  const int64_t C = CT ? CT : C_, Ho = H / 2, Wo = W / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / H, h = r % H, ho = h / 2;
    for (int64_t w = 0; w < W; ++w) {
      const int64_t i = ((n * H + h) * W + w) * C, wo = w / 2;
      if (ho >= Ho || wo >= Wo) {
        VECTOR_LOOP
        for (int64_t c = 0; c < C; ++c)
          dp[i + c] = (0.f - (xp[i + c] - m[c]) * k[c] - gm[c]) * sc[c];
        continue;
      }
      const int32_t j = static_cast<int32_t>((h % 2) * 2 + w % 2);
      const int64_t o = ((n * Ho + ho) * Wo + wo) * C;
      VECTOR_LOOP
      for (int64_t c = 0; c < C; ++c) {
        const float gv = gg[o + c];
        const float dy = ap[o + c] == j ? gv : 0.f;
        dp[i + c] = (dy - (xp[i + c] - m[c]) * k[c] - gm[c]) * sc[c];
      }
    }
  }
}

template <int CT>
Backward pool_grads(const float* gp, const float* op, const int32_t* ap, const float* xp,
                    float* gg, float* dp, int64_t N, int64_t C_, int64_t H, int64_t W,
                    const Tensor& mean, const Tensor& invstd, const Tensor& weight) {
  const int64_t C = CT ? CT : C_, rows = N * (H / 2), chunks = chunk_count(rows);
  const float* mp = mean.data_ptr<float>();
  std::vector<double> sums(chunks * C, 0.0), dots(chunks * C, 0.0);
  for_chunks(rows, chunks, [&](int64_t k, int64_t r0, int64_t r1) {
    pool_sums<CT>(gp, op, ap, xp, mp, gg, &sums[k * C], &dots[k * C], r0, r1, C, H, W);
  });
  Backward b(mean, invstd, weight, combine(sums, chunks, C), combine(dots, chunks, C),
             N * H * W);
  for_chunks(N * H, chunk_count(N * H), [&](int64_t, int64_t r0, int64_t r1) {
    pool_dx<CT>(gg, ap, xp, dp, b.mean.data(), b.k.data(), b.grad_mean.data(), b.scale.data(),
                r0, r1, C, H, W);
  });
  return b;
}

// Gradients of relu(max_pool2d(batch_norm(x), 2, 2)) given dL/dout: (dx, dweight, dbias).
std::vector<Tensor> bn_pool_relu_backward(const Tensor& grad_out, const Tensor& out_in,
                                          const Tensor& arg_in, const Tensor& x_in,
                                          const Tensor& mean, const Tensor& invstd,
                                          const Tensor& weight) {
  Tensor g = channels_last(grad_out), out = channels_last(out_in), x = channels_last(x_in);
  TORCH_CHECK(arg_in.scalar_type() == at::kInt, "fused_bn: expected an int32 argmax");
  Tensor arg = arg_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H >= 2 && W >= 2, "fused_bn: the input is smaller than the 2x2 pool");
  check_shape(g, x, H / 2, W / 2, "the gradient");
  check_shape(out, x, H / 2, W / 2, "the output");
  check_shape(arg, x, H / 2, W / 2, "the argmax");
  Tensor gg = at::empty({g.numel()}, g.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dx = empty_nhwc(x, H, W, at::kFloat);
  const Tensor m = vec(mean, C), is = vec(invstd, C);
  std::vector<Tensor> result;
  DISPATCH_C(C, {
    Backward b = pool_grads<CT>(g.data_ptr<float>(), out.data_ptr<float>(),
                                arg.data_ptr<int32_t>(), x.data_ptr<float>(),
                                gg.data_ptr<float>(), dx.data_ptr<float>(), N, C, H, W, m, is,
                                weight);
    result = {dx, b.grad_weight, b.grad_bias};
  });
  return result;
}

// --- The first block: 3x3 convolution of a 1-channel image (padding 1) + BatchNorm + ReLU ---
// The convolution has 9 taps per output: cheap enough to compute twice. So its output z is
// never stored: the forward pass computes z for the statistics, then again to normalise it;
// the backward pass recomputes it from the (small) input. This saves writing and re-reading
// a [N, C, H, W] tensor each way, and the convolution's own weight-gradient pass.

// Rows h-1, h, h+1 of image xp [H, W], zero-padded to [3, W + 2] (zeros outside the image).
inline void padded_rows(const float* __restrict xp, int64_t h, int64_t H, int64_t W,
                        float* __restrict pad) {
  for (int64_t i = 0; i < 3; ++i) {
    float* row = pad + i * (W + 2);
    const int64_t hh = h + i - 1;
    row[0] = row[W + 1] = 0.f;
    for (int64_t w = 0; w < W; ++w) row[w + 1] = (hh >= 0 && hh < H) ? xp[hh * W + w] : 0.f;
  }
}

// z [W, C] of one output row from its padded input rows: bias + the 9 taps in row-major
// order; wt is [9, C].
template <int CT>
void conv_row(const float* __restrict pad, int64_t W, const float* __restrict wt,
              const float* __restrict bias, float* __restrict z, int64_t C_) {
  const int64_t C = CT ? CT : C_;
  for (int64_t w = 0; w < W; ++w) {
    float v[9];
    for (int k = 0; k < 9; ++k) v[k] = pad[(k / 3) * (W + 2) + w + k % 3];
    float* zr = z + w * C;
    VECTOR_LOOP
    for (int64_t c = 0; c < C; ++c) {
      float s = bias[c];
      for (int k = 0; k < 9; ++k) s += wt[k * C + c] * v[k];
      zr[c] = s;
    }
  }
}

// The convolution's weight and bias gradients of one output row, added to g [10, C] (9 taps,
// then the bias) from its padded input rows and dz [W, C]. Positions outside, the ten sums
// inside: ten independent accumulations per position (in the other order each position's add
// waits for the previous one's).
template <int CT>
void conv_grad_row(const float* __restrict pad, const float* __restrict dz,
                   float* __restrict g, int64_t W, int64_t C_) {
  const int64_t C = CT ? CT : C_;
  for (int64_t w = 0; w < W; ++w) {
    const float* d = dz + w * C;
    for (int t = 0; t < 9; ++t) {
      const float vw = pad[(t / 3) * (W + 2) + t % 3 + w];
      float* a = g + t * C;
      VECTOR_LOOP
      for (int64_t c = 0; c < C; ++c) a[c] += d[c] * vw;
    }
    float* a = g + 9 * C;
    VECTOR_LOOP
    for (int64_t c = 0; c < C; ++c) a[c] += d[c];
  }
}

struct Conv1 {
  Tensor x;  // [N, H, W] contiguous
  int64_t N, H, W, C;
  std::vector<float> wt, bias;  // [9, C] and [C]
  Conv1(const Tensor& input, const Tensor& weight, const Tensor& bias_t) {
    TORCH_CHECK(input.dim() == 4 && input.size(1) == 1 && input.scalar_type() == at::kFloat &&
                    input.device().is_cpu(),
                "fused_bn: expected a [N, 1, H, W] float32 CPU input");
    TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == 3 &&
                    weight.size(3) == 3 && weight.scalar_type() == at::kFloat &&
                    weight.device().is_cpu(),
                "fused_bn: expected a float32 CPU [C, 1, 3, 3] convolution weight");
    x = input.contiguous();
    N = x.size(0), H = x.size(2), W = x.size(3), C = weight.size(0);
    const Tensor wc = weight.contiguous(), b = vec(bias_t, C);
    wt.resize(9 * C);
    for (int64_t c = 0; c < C; ++c)
      for (int k = 0; k < 9; ++k) wt[k * C + c] = wc.data_ptr<float>()[c * 9 + k];
    bias.assign(b.data_ptr<float>(), b.data_ptr<float>() + C);
  }
  const float* image(int64_t n) const { return x.data_ptr<float>() + n * H * W; }
};

// For each output row r = (n, h) in chunks: f(chunk, r, pad, z, scratch) with pad = its
// padded input rows [3, W + 2], z = its convolution [W, C] and scratch = (W + 10) * C floats
// for f (per-chunk buffers).
template <int CT, typename F>
void conv_rows(const Conv1& cv, const F& f) {
  const int64_t rows = cv.N * cv.H, C = cv.C;
  for_chunks(rows, chunk_count(rows), [&](int64_t k, int64_t r0, int64_t r1) {
    std::vector<float> z(cv.W * C), pad(3 * (cv.W + 2)), scratch((cv.W + 10) * C);
    for (int64_t r = r0; r < r1; ++r) {
      padded_rows(cv.image(r / cv.H), r % cv.H, cv.H, cv.W, pad.data());
      conv_row<CT>(pad.data(), cv.W, cv.wt.data(), cv.bias.data(), z.data(), C);
      f(k, r, pad.data(), z.data(), scratch.data());
    }
  });
}

template <int CT>
std::vector<Tensor> conv_bn_relu_forward_impl(const Conv1& cv, const Tensor& bn_w,
                                              const Tensor& bn_b, double eps) {
  const int64_t C = CT ? CT : cv.C, M = cv.N * cv.H * cv.W, chunks = chunk_count(cv.N * cv.H);
  TORCH_CHECK(M > 1, "fused_bn: expected more than 1 value per channel when training");
  std::vector<double> p1(chunks * C, 0.0), p2(chunks * C, 0.0);
  conv_rows<CT>(cv, [&](int64_t k, int64_t, const float*, const float* z, float*) {
    row_moments<CT>(z, &p1[k * C], &p2[k * C], 0, cv.W, C);
  });
  const Stats s = stats_from_moments(combine(p1, chunks, C), combine(p2, chunks, C), M, bn_w,
                                     bn_b, eps);
  Tensor y = at::empty({cv.N, C, cv.H, cv.W},
                       cv.x.options().memory_format(at::MemoryFormat::ChannelsLast));
  float* yp = y.data_ptr<float>();
  conv_rows<CT>(cv, [&](int64_t, int64_t r, const float*, const float* z, float*) {
    bn_relu_rows<CT>(z, yp + r * cv.W * C, s.alpha.data(), s.beta.data(), 0, cv.W, C);
  });
  return {y, s.mean, s.invstd, s.var};
}

// relu(batch_norm(conv2d(x, weight, bias, padding=1))) for a 1-channel x and a 3x3 kernel:
// returns (y, mean, invstd, var_unbiased) of the convolution's output.
std::vector<Tensor> conv_bn_relu_forward(const Tensor& input, const Tensor& weight,
                                         const Tensor& bias, const Tensor& bn_w,
                                         const Tensor& bn_b, double eps) {
  const Conv1 cv(input, weight, bias);
  std::vector<Tensor> result;
  DISPATCH_C(cv.C, result = conv_bn_relu_forward_impl<CT>(cv, bn_w, bn_b, eps));
  return result;
}

template <int CT>
std::vector<Tensor> conv_bn_relu_backward_impl(const Conv1& cv, const float* gp,
                                               const float* yp, const Tensor& mean,
                                               const Tensor& invstd, const Tensor& bn_w) {
  const int64_t C = CT ? CT : cv.C, W = cv.W, M = cv.N * cv.H * W;
  const int64_t chunks = chunk_count(cv.N * cv.H);
  const float* mp = mean.data_ptr<float>();
  // pass 1: sum(dy) and sum(dy * (z - mean)), dy = g where y > 0 (as bn_relu_backward)
  std::vector<double> sums(chunks * C, 0.0), dots(chunks * C, 0.0);
  conv_rows<CT>(cv, [&](int64_t k, int64_t r, const float*, const float* z, float*) {
    relu_sums<CT>(gp + r * W * C, yp + r * W * C, z, mp, &sums[k * C], &dots[k * C], 0, W, C);
  });
  Backward b(mean, invstd, bn_w, combine(sums, chunks, C), combine(dots, chunks, C), M);
  // pass 2: dz as bn_relu_backward's dx, then the convolution's weight and bias gradients,
  // summed in float over a row (W values), then in double over the rows
  std::vector<double> gw(chunks * 10 * C, 0.0);  // per chunk: [9, C] taps, then [C] bias
  conv_rows<CT>(cv, [&](int64_t k, int64_t r, const float* pad, const float* z, float* buf) {
    float* dz = buf;  // [W, C]
    float* row = buf + W * C;  // [10, C]
    std::fill(row, row + 10 * C, 0.f);
    relu_dx<CT>(gp + r * W * C, yp + r * W * C, z, dz, b.mean.data(), b.k.data(),
                b.grad_mean.data(), b.scale.data(), 0, W, C);
    conv_grad_row<CT>(pad, dz, row, W, C);
    double* acc = &gw[k * 10 * C];
    VECTOR_LOOP
    for (int64_t i = 0; i < 10 * C; ++i) acc[i] += row[i];
  });
  const std::vector<double> total = combine(gw, chunks, 10 * C);
  Tensor dweight = at::empty({C, 1, 3, 3}, mean.options());
  Tensor dbias = at::empty({C}, mean.options());
  float *dw = dweight.data_ptr<float>(), *db = dbias.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    for (int t = 0; t < 9; ++t) dw[c * 9 + t] = static_cast<float>(total[t * C + c]);
    db[c] = static_cast<float>(total[9 * C + c]);
  }
  return {dweight, dbias, b.grad_weight, b.grad_bias};
}

// Gradients of conv_bn_relu_forward's y given dL/dy: (dweight, dbias, dbn_weight, dbn_bias)
// (not the input's: it is the data).
std::vector<Tensor> conv_bn_relu_backward(const Tensor& grad_y, const Tensor& y_in,
                                          const Tensor& input, const Tensor& weight,
                                          const Tensor& bias, const Tensor& mean,
                                          const Tensor& invstd, const Tensor& bn_w) {
  const Conv1 cv(input, weight, bias);
  Tensor g = channels_last(grad_y), y = channels_last(y_in);
  check_shape(g, y, cv.H, cv.W, "the gradient");
  TORCH_CHECK(y.size(0) == cv.N && y.size(1) == cv.C && y.size(2) == cv.H &&
                  y.size(3) == cv.W, "fused_bn: the output does not match the input");
  const Tensor m = vec(mean, cv.C), is = vec(invstd, cv.C);
  std::vector<Tensor> result;
  DISPATCH_C(cv.C, result = conv_bn_relu_backward_impl<CT>(cv, g.data_ptr<float>(),
                                                            y.data_ptr<float>(), m, is, bn_w));
  return result;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels touch no Python object: other Python threads may run meanwhile (as in eager).
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("bn_relu_forward", &bn_relu_forward, nogil);
  m.def("bn_relu_backward", &bn_relu_backward, nogil);
  m.def("bn_pool_relu_forward", &bn_pool_relu_forward, nogil);
  m.def("bn_pool_relu_backward", &bn_pool_relu_backward, nogil);
  m.def("conv_bn_relu_forward", &conv_bn_relu_forward, nogil);
  m.def("conv_bn_relu_backward", &conv_bn_relu_backward, nogil);
}
