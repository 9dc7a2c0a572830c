// One Llama-family decoder layer for a step of several rows (batch-1 decoding, batched decoding,
// prefills of up to a few hundred tokens), fp32 throughout, writing K/V into FastLM's slotted cache.
//
// Why it exists: at batch 1 a 135M-parameter LM on a 2-core CPU is bound by reading its weights, and
// with ~15 torch ops per layer the time between ops (dispatch, thread fork/join, small allocations)
// cost as much as a third of a token. Here a layer is 4 parallel regions (q/k/v, attention, o_proj,
// gate/up + down), each product reads its weights once for all the step's rows, and the small ops
// (RMSNorm, RoPE, SiLU, residuals) run inline. Weights come packed in panels of 16 output columns
// (`pack_panels`, the fast layout) or as nn.Linear's own [out, in] rows (no copy). Threads come from
// ATen's pool (at::parallel_for), so the extension never starts a second OpenMP runtime beside torch's.
//
// Numerics follow transformers' LlamaDecoderLayer op for op in fp32; only summation order differs
// (8-lane partial sums) and exp is a ~1 ulp polynomial, so logits agree to ~1e-5 and greedy tokens
// match (tests/test_runtime.py, bench/generate.py).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VP_AVX2 1
#endif
// AVX-512 (built with -mavx512f where the CPU has it): a 16-column panel row is one register, so the
// panel micro-kernel below takes one vector per row and twice the rows per block. The other loops
// keep their AVX2 form (AVX-512 CPUs run it too).
#if defined(VP_AVX2) && defined(__AVX512F__)
#define VP_AVX512 1
#endif

namespace {

#ifdef VP_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// out[r * C + c] = sum_k X[r * ldx + k] * W[c][k], for R input rows and C weight rows.
template <int R, int C>
inline void dot_block(const float* X, int64_t ldx, const float* const* W, int64_t K, float* out) {
  int64_t k = 0;
#ifdef VP_AVX2
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 w[C];
    for (int c = 0; c < C; ++c) w[c] = _mm256_loadu_ps(W[c] + k);
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_loadu_ps(X + r * ldx + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(x, w[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * C + c] = hsum(acc[r][c]);
#else
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * C + c] = 0.f;
#endif
  for (; k < K; ++k)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) out[r * C + c] += X[r * ldx + k] * W[c][k];
}

// Y[m, y0 + j] = X[m] . W[n0 + j] (+ bias) for j < C, all M rows; rows go two at a time so each
// weight row loaded from memory feeds two FMAs (prefill and batched decoding are compute-heavier).
template <int C>
inline void rows_block(const float* X, int64_t M, int64_t ldx, const float* const* W, int64_t K, float* Y, int64_t ldy) {
  float out[3 * C];
  int64_t m = 0;
  for (; C == 4 && m + 3 <= M; m += 3) {
    dot_block<3, C>(X + m * ldx, ldx, W, K, out);
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < C; ++c) Y[(m + r) * ldy + c] = out[r * C + c];
  }
  for (; m + 2 <= M; m += 2) {
    dot_block<2, C>(X + m * ldx, ldx, W, K, out);
    for (int c = 0; c < C; ++c) {
      Y[m * ldy + c] = out[c];
      Y[(m + 1) * ldy + c] = out[C + c];
    }
  }
  if (m < M) {
    dot_block<1, C>(X + m * ldx, ldx, W, K, out);
    for (int c = 0; c < C; ++c) Y[m * ldy + c] = out[c];
  }
}

// Y[:, 0:n] = X @ W[0:n]^T for n weight rows of K floats each (W and Y already offset to the block).
void gemm_range(const float* X, int64_t M, int64_t ldx, const float* W, int64_t K, float* Y, int64_t ldy, int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* w[4] = {W + j * K, W + (j + 1) * K, W + (j + 2) * K, W + (j + 3) * K};
    rows_block<4>(X, M, ldx, w, K, Y + j, ldy);
  }
  for (; j < n; ++j) {
    const float* w[1] = {W + j * K};
    rows_block<1>(X, M, ldx, w, K, Y + j, ldy);
  }
}

// A product whose output columns are the concatenation of several [out_i, K] weights (q|k|v).
struct Segments {
  std::vector<const float*> w;
  std::vector<int64_t> start;  // first output column of each weight; start.back() = total
};

void gemm_segments(const float* X, int64_t M, int64_t ldx, const Segments& s, int64_t K, float* Y, int64_t ldy, int64_t n0, int64_t n1) {
  for (size_t i = 0; i + 1 < s.start.size(); ++i) {
    const int64_t a = std::max(n0, s.start[i]), b = std::min(n1, s.start[i + 1]);
    if (a < b) gemm_range(X, M, ldx, s.w[i] + (a - s.start[i]) * K, K, Y + a, ldy, b - a);
  }
}

#ifdef VP_AVX2
// exp of 8 floats (Cephes' expf: Cody-Waite reduction, degree-6 polynomial; ~1 ulp, as torch's own
// vectorized exp is): softmax and SiLU call it per score / per MLP unit.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365447f)), _mm256_set1_ps(88.3762626f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// v[i] = exp(v[i] - shift), returns the sum
inline float exp_shift_sum(float* v, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef VP_AVX2
  __m256 acc = _mm256_setzero_ps();
  const __m256 sh = _mm256_set1_ps(shift);
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(v + i), sh));
    _mm256_storeu_ps(v + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; i < n; ++i) {
    v[i] = std::exp(v[i] - shift);
    sum += v[i];
  }
  return sum;
}

// out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u
inline void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
#ifdef VP_AVX2
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef VP_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += p * v
inline void axpy(float p, const float* v, float* y, int64_t n) {
  int64_t i = 0;
#ifdef VP_AVX2
  const __m256 pp = _mm256_set1_ps(p);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pp, _mm256_loadu_ps(v + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += p * v[i];
}

#ifdef VP_AVX2
// The 8 sums of 8 vectors' lanes, as one vector: [sum(a0), ..., sum(a7)]
inline __m256 hsum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// o[0 : 8 NV] = sum_j p[j] * V[j, 0 : 8 NV], the output kept in registers over all j
template <int NV>
inline void weighted_rows(const float* p, const float* v, int64_t ldv, int64_t n, float* o) {
  __m256 acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 pj = _mm256_broadcast_ss(p + j);
    for (int i = 0; i < NV; ++i) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * ldv + 8 * i), acc[i]);
  }
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(o + 8 * i, acc[i]);
}
#endif

// One query head against n cached positions: o = softmax(q K^T * scale) V. K and V rows are ld
// floats apart; score is scratch of n floats.
void attend(const float* q, const float* K, const float* V, int64_t ld, int64_t n, int64_t hd, float scale, float* score, float* o) {
  int64_t j = 0;
#ifdef VP_AVX2
  if (hd % 8 == 0) {
    // 8 keys at a time: 8 accumulators, one transposing reduction instead of 8 horizontal sums
    const __m256 sc = _mm256_set1_ps(scale);
    for (; j + 8 <= n; j += 8) {
      __m256 acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
      for (int64_t i = 0; i < hd; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + (j + c) * ld + i), acc[c]);
      }
      _mm256_storeu_ps(score + j, _mm256_mul_ps(hsum8(acc), sc));
    }
  }
#endif
  for (; j < n; ++j) score[j] = dot(q, K + j * ld, hd) * scale;
  const float mx = *std::max_element(score, score + n);
  const float inv = 1.0f / exp_shift_sum(score, n, mx);
  for (int64_t i = 0; i < n; ++i) score[i] *= inv;
  int64_t c = 0;
#ifdef VP_AVX2
  for (; c + 64 <= hd; c += 64) weighted_rows<8>(score, V + c, ld, n, o + c);
  for (; c + 8 <= hd; c += 8) weighted_rows<1>(score, V + c, ld, n, o + c);
#endif
  if (c < hd) {
    std::fill(o + c, o + hd, 0.f);
    for (int64_t jj = 0; jj < n; ++jj)
      for (int64_t i = c; i < hd; ++i) o[i] += score[jj] * V[jj * ld + i];
  }
}

void rms_norm(const float* x, const float* w, float* y, int64_t D, float eps) {
  // transformers' LlamaRMSNorm in fp32: w * (x * rsqrt(mean(x^2) + eps))
  double ss = 0.0;
  for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / D) + eps);
  for (int64_t i = 0; i < D; ++i) y[i] = w[i] * (x[i] * inv);
}

void rope(float* v, const float* cos, const float* sin_signed, int64_t hd) {
  // x * cos + roll(x, hd/2) * sin_signed (the sign of rotate_half folded into the table)
  const int64_t half = hd / 2;
  float tmp[512];
  for (int64_t i = 0; i < hd; ++i) tmp[i] = v[i] * cos[i] + v[(i + half) % hd] * sin_signed[i];
  std::copy(tmp, tmp + hd, v);
}

// Split [0, n) into contiguous pieces of multiples of `unit`, one per chunk of at::parallel_for.
template <typename F>
void parallel_cols(int64_t n, int64_t unit, F&& body) {
  const int64_t blocks = (n + unit - 1) / unit;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) { body(b0 * unit, std::min(n, b1 * unit)); });
}

// ---- several rows: weights packed in panels of 16 output columns -----------------------------------
// Panel p of a [N, K] weight is W[16p : 16p + 16] transposed, [K, 16] contiguous (zero rows past N).
// With several input rows the product is compute-heavy: an outer-product kernel over a panel (two
// vector loads of weights per k feed 2 x R FMAs, the x values broadcast) does ~1.4x the FLOPs of
// the dot-product form, and reads the panel as one sequential stream.
constexpr int64_t PANEL = 16;
// Panel rows fetched ahead (one 64-byte line per k): the hardware prefetcher alone left a 12-row
// product ~15% slower (a 12-token prefill: 31.4 -> 26.6 ms; 16, 32, 64 and 128 lines ahead alike).
constexpr int64_t PREFETCH = 32;

// Rows per block: accumulators for ROWS x 16 columns, the panel row and a broadcast x fit the vector
// registers (AVX2: 6 x 2 + 3 of 16; AVX-512: 12 x 1 + 2 of 32).
#ifdef VP_AVX512
constexpr int ROWS = 12;
#else
constexpr int ROWS = 6;
#endif

// out[r][0..15] (+)= X[r, 0:K] . panel columns, for R <= ROWS rows
template <int R>
inline void panel_block(const float* X, int64_t ldx, const float* P, int64_t K, float (*out)[PANEL], bool add) {
#if defined(VP_AVX512)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = add ? _mm512_loadu_ps(out[r]) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(P + (k + PREFETCH) * PANEL), _MM_HINT_T0);
    const __m512 w = _mm512_loadu_ps(P + k * PANEL);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(X[r * ldx + k]), w, acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[r], acc[r]);
#elif defined(VP_AVX2)
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = add ? _mm256_loadu_ps(out[r]) : _mm256_setzero_ps();
    acc[r][1] = add ? _mm256_loadu_ps(out[r] + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    if (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(P + (k + PREFETCH) * PANEL), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(P + k * PANEL), w1 = _mm256_loadu_ps(P + k * PANEL + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(X + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(out[r], acc[r][0]);
    _mm256_storeu_ps(out[r] + 8, acc[r][1]);
  }
#else
  if (!add)
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < PANEL; ++j) out[r][j] = 0.f;
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < PANEL; ++j) out[r][j] += X[r * ldx + k] * P[k * PANEL + j];
#endif
}

// panel_block<r> for a run-time r in 1..R
template <int R>
inline void panel_block_n(int64_t r, const float* X, int64_t ldx, const float* P, int64_t K, float (*out)[PANEL]) {
  if constexpr (R > 1) {
    if (r < R) return panel_block_n<R - 1>(r, X, ldx, P, K, out);
  }
  panel_block<R>(X, ldx, P, K, out, false);
}

// epilogue(m, out_row) for every row m of X against panel P. Blocks of ROWS rows after the
// first read the panel from L2 (a panel is 36-96 KB here); cutting K into L1-sized chunks was slower.
template <typename E>
inline void panel_rows(const float* X, int64_t M, int64_t ldx, const float* P, int64_t K, E&& epilogue) {
  float out[ROWS][PANEL];
  for (int64_t m = 0; m < M;) {
    const int64_t r = std::min<int64_t>(ROWS, M - m);
    panel_block_n<ROWS>(r, X + m * ldx, ldx, P, K, out);
    for (int64_t i = 0; i < r; ++i) epilogue(m + i, out[i]);
    m += r;
  }
}

}  // namespace

torch::Tensor pack_panels(torch::Tensor w) {
  // [N, K] -> [ceil(N / 16), K, 16]
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "fp32 [N, K] expected");
  auto wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1), np = (N + PANEL - 1) / PANEL;
  auto out = torch::zeros({np, K, PANEL}, wc.options());
  const float* src = wc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t j = 0; j < PANEL && p * PANEL + j < N; ++j)
        for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * PANEL + j] = src[(p * PANEL + j) * K + k];
  });
  return out;
}

// y [M, N] = x [M, K] @ W^T with W given as panels (tests and measurements)
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels, int64_t N) {
  TORCH_CHECK(x.is_contiguous() && panels.is_contiguous(), "contiguous inputs expected");
  const int64_t M = x.size(0), K = x.size(1), np = panels.size(0);
  TORCH_CHECK(panels.size(1) == K && np * PANEL >= N, "panels do not match x");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* pp = panels.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = std::min(PANEL, N - p * PANEL);
      panel_rows(xp, M, K, pp + p * K * PANEL, K, [&](int64_t m, const float* o) { std::copy(o, o + c, yp + m * N + p * PANEL); });
    }
  });
  return y;
}

// x [M, D] is updated in place: x = x + attn(norm1(x)); x = x + mlp(norm2(x)), for rows out_from..M-1
// (rows before out_from only get their K/V written: a prefill's last layer needs no more for them).
// Row m writes its K/V at kv[layer, :, slot[m], pos[m]] and attends to positions 0..pos[m] of its slot.
void layer_forward(torch::Tensor x, torch::Tensor ln1, torch::Tensor ln2, std::vector<torch::Tensor> qkv_w,
                   c10::optional<torch::Tensor> qkv_bias, torch::Tensor wo, torch::Tensor wgate, torch::Tensor wup,
                   torch::Tensor wdown, torch::Tensor kv, int64_t layer, torch::Tensor slot, torch::Tensor pos,
                   torch::Tensor cos, torch::Tensor sin, double eps, double scale, int64_t n_heads, int64_t n_kv,
                   int64_t out_from, std::vector<torch::Tensor> panels) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x must be a contiguous fp32 [M, D]");
  TORCH_CHECK(kv.dim() == 6 && kv.is_contiguous(), "kv must be FastLM's [layers, 2, rows, len, kv_heads, head_dim]");
  const int64_t M = x.size(0), D = x.size(1);
  const int64_t hd = kv.size(5), rows_cap = kv.size(2), len_cap = kv.size(3);
  const int64_t nq = n_heads * hd, nk = n_kv * hd, nqkv = nq + 2 * nk;
  const int64_t inter = wgate.size(0), group = n_heads / n_kv;
  TORCH_CHECK(hd <= 512 && hd % 2 == 0 && kv.size(4) == n_kv, "unexpected head layout");
  TORCH_CHECK(qkv_w.size() == 3, "q, k and v weights expected");
  for (auto* t : {&ln1, &ln2, &wo, &wgate, &wup, &wdown, &cos, &sin})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat, "weights must be contiguous fp32");
  const float feps = static_cast<float>(eps), fscale = static_cast<float>(scale);
  const int64_t* slot_p = slot.data_ptr<int64_t>();
  const int64_t* pos_p = pos.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(slot_p[m] >= 0 && slot_p[m] < rows_cap && pos_p[m] >= 0 && pos_p[m] < len_cap && pos_p[m] < cos.size(0),
                "slot or position out of the cache");

  Segments seg;
  int64_t off = 0;
  for (auto& w : qkv_w) {
    TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kFloat && w.size(1) == D, "q/k/v weight layout");
    seg.w.push_back(w.data_ptr<float>());
    seg.start.push_back(off);
    off += w.size(0);
  }
  seg.start.push_back(off);
  TORCH_CHECK(off == nqkv, "q/k/v sizes do not match the heads");

  auto opts = x.options();
  auto h = torch::empty({M, D}, opts);
  auto qkv = torch::empty({M, nqkv}, opts);
  auto att = torch::empty({M, nq}, opts);
  auto act = torch::empty({M, inter}, opts);
  float* xp = x.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  float* qkvp = qkv.data_ptr<float>();
  float* attp = att.data_ptr<float>();
  float* actp = act.data_ptr<float>();
  float* kvp = kv.data_ptr<float>();
  const int64_t kv_row = len_cap * n_kv * hd;                   // one slot of one of K/V
  float* kbase = kvp + (layer * 2 + 0) * rows_cap * kv_row;
  float* vbase = kvp + (layer * 2 + 1) * rows_cap * kv_row;

  // 1. q/k/v of every row
  for (int64_t m = 0; m < M; ++m) rms_norm(xp + m * D, ln1.data_ptr<float>(), hp + m * D, D, feps);
  // With panels (packed by the caller: q|k|v, o, gate, up, down) every product streams them; without,
  // the modules' own [out, in] rows are read in the dot-product form (~1.15x slower at one row,
  // ~1.4x at 12: bench/kernel_rows.py)
  const bool use_panels = panels.size() == 5;
  if (use_panels) {
    TORCH_CHECK(panels[0].size(1) == D && panels[0].size(0) * PANEL >= nqkv && panels[2].size(0) == panels[3].size(0),
                "panels do not match the layer");
    for (auto& t : panels) TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat, "panels must be contiguous fp32");
    const float* pq = panels[0].data_ptr<float>();
    at::parallel_for(0, panels[0].size(0), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = std::min(PANEL, nqkv - p * PANEL);
        panel_rows(hp, M, D, pq + p * D * PANEL, D, [&](int64_t m, const float* o) { std::copy(o, o + c, qkvp + m * nqkv + p * PANEL); });
      }
    });
  } else {
    parallel_cols(nqkv, 16, [&](int64_t n0, int64_t n1) { gemm_segments(hp, M, D, seg, D, qkvp, nqkv, n0, n1); });
  }
  const float* cosp = cos.data_ptr<float>();
  const float* sinp = sin.data_ptr<float>();
  const float* biasp = (qkv_bias.has_value() && qkv_bias->defined()) ? qkv_bias->data_ptr<float>() : nullptr;
  for (int64_t m = 0; m < M; ++m) {
    float* r = qkvp + m * nqkv;
    if (biasp)
      for (int64_t i = 0; i < nqkv; ++i) r[i] += biasp[i];
    const float* c = cosp + pos_p[m] * hd;
    const float* s = sinp + pos_p[m] * hd;
    for (int64_t hh = 0; hh < n_heads + n_kv; ++hh) rope(r + hh * hd, c, s, hd);
    const int64_t at_pos = (slot_p[m] * len_cap + pos_p[m]) * n_kv * hd;
    std::copy(r + nq, r + nq + nk, kbase + at_pos);
    std::copy(r + nq + nk, r + nqkv, vbase + at_pos);
  }

  // 2. attention of rows out_from..M-1, one (row, head) per task
  const int64_t Mo = M - out_from;
  at::parallel_for(0, Mo * n_heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> score;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = out_from + t / n_heads, hh = t % n_heads, g = hh / group;
      const int64_t n = pos_p[m] + 1;
      score.resize(n);
      attend(qkvp + m * nqkv + hh * hd, kbase + slot_p[m] * kv_row + g * hd, vbase + slot_p[m] * kv_row + g * hd,
             n_kv * hd, n, hd, fscale, score.data(), attp + m * nq + hh * hd);
    }
  });

  // 3. x += o_proj(att)
  float* xo = xp + out_from * D;
  float* ho = hp + out_from * D;
  float* ao = attp + out_from * nq;
  const float* wop = wo.data_ptr<float>();
  // x[rows, cols of panel p] += X @ panel p
  auto residual_panels = [&](const float* X, int64_t K, const torch::Tensor& P) {
    const float* pp = P.data_ptr<float>();
    at::parallel_for(0, P.size(0), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = std::min(PANEL, D - p * PANEL);
        panel_rows(X, Mo, K, pp + p * K * PANEL, K, [&](int64_t m, const float* o) {
          float* xr = xo + m * D + p * PANEL;
          for (int64_t j = 0; j < c; ++j) xr[j] += o[j];
        });
      }
    });
  };
  if (use_panels) residual_panels(ao, nq, panels[1]);
  else parallel_cols(D, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> y(Mo * (n1 - n0));
    gemm_range(ao, Mo, nq, wop + n0 * nq, nq, y.data(), n1 - n0, n1 - n0);
    for (int64_t m = 0; m < Mo; ++m)
      for (int64_t n = n0; n < n1; ++n) xo[m * D + n] += y[m * (n1 - n0) + (n - n0)];
  });

  // 4. x += down(silu(gate(h)) * up(h)), h = norm2(x); gate and up rows of one block run together
  for (int64_t m = 0; m < Mo; ++m) rms_norm(xo + m * D, ln2.data_ptr<float>(), ho + m * D, D, feps);
  const float* wg = wgate.data_ptr<float>();
  const float* wu = wup.data_ptr<float>();
  float* acto = actp + out_from * inter;
  if (use_panels) {
    const float* pg = panels[2].data_ptr<float>();
    const float* pu = panels[3].data_ptr<float>();
    at::parallel_for(0, panels[2].size(0), 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> g(Mo * PANEL);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = std::min(PANEL, inter - p * PANEL);
        panel_rows(ho, Mo, D, pg + p * D * PANEL, D, [&](int64_t m, const float* o) { std::copy(o, o + PANEL, g.data() + m * PANEL); });
        panel_rows(ho, Mo, D, pu + p * D * PANEL, D, [&](int64_t m, const float* o) {
          float* a = acto + m * inter + p * PANEL;
          const float* gm = g.data() + m * PANEL;
          silu_mul(gm, o, a, c);
        });
      }
    });
    residual_panels(acto, inter, panels[4]);
    return;
  }
  parallel_cols(inter, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i += 4) {
      const int64_t c = std::min<int64_t>(4, i1 - i);
      float out[2 * 8];
      if (c == 4) {
        const float* w[8] = {wg + i * D, wg + (i + 1) * D, wg + (i + 2) * D, wg + (i + 3) * D,
                             wu + i * D, wu + (i + 1) * D, wu + (i + 2) * D, wu + (i + 3) * D};
        for (int64_t m = 0; m < Mo; ++m) {
          dot_block<1, 8>(ho + m * D, D, w, D, out);
          silu_mul(out, out + 4, acto + m * inter + i, 4);
        }
      } else {
        for (int64_t j = 0; j < c; ++j) {
          const float* w[2] = {wg + (i + j) * D, wu + (i + j) * D};
          for (int64_t m = 0; m < Mo; ++m) {
            dot_block<1, 2>(ho + m * D, D, w, D, out);
            silu_mul(out, out + 1, acto + m * inter + i + j, 1);
          }
        }
      }
    }
  });
  const float* wdp = wdown.data_ptr<float>();
  parallel_cols(D, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> y(Mo * (n1 - n0));
    gemm_range(acto, Mo, inter, wdp + n0 * inter, inter, y.data(), n1 - n0, n1 - n0);
    for (int64_t m = 0; m < Mo; ++m)
      for (int64_t n = n0; n < n1; ++n) xo[m * D + n] += y[m * (n1 - n0) + (n - n0)];
  });
}

// logits [M, V] = norm(x) @ W^T, W [V, D] (lm_head's own weight)
torch::Tensor head_forward(torch::Tensor x, torch::Tensor norm_w, torch::Tensor w, double eps, c10::optional<torch::Tensor> panels) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && norm_w.is_contiguous(), "contiguous inputs expected");
  const int64_t M = x.size(0), D = x.size(1), V = w.size(0);
  auto h = torch::empty({M, D}, x.options());
  for (int64_t m = 0; m < M; ++m)
    rms_norm(x.data_ptr<float>() + m * D, norm_w.data_ptr<float>(), h.data_ptr<float>() + m * D, D, static_cast<float>(eps));
  auto out = torch::empty({M, V}, x.options());
  const float* hp = h.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (panels.has_value() && panels->defined()) {
    TORCH_CHECK(panels->is_contiguous() && panels->size(1) == D && panels->size(0) * PANEL >= V, "head panels do not match");
    const float* pp = panels->data_ptr<float>();
    at::parallel_for(0, panels->size(0), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = std::min(PANEL, V - p * PANEL);
        panel_rows(hp, M, D, pp + p * D * PANEL, D, [&](int64_t m, const float* o) { std::copy(o, o + c, op + m * V + p * PANEL); });
      }
    });
    return out;
  }
  parallel_cols(V, 64, [&](int64_t n0, int64_t n1) { gemm_range(hp, M, D, wp + n0 * D, D, op + n0, V, n1 - n0); });
  return out;
}

// The vector code this build runs (reported by the kernel plan)
std::string simd() {
#if defined(VP_AVX512)
  return "avx512";
#elif defined(VP_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("simd", &simd, "the micro-kernels' vector width: avx512, avx2 or scalar");
  m.def("layer_forward", &layer_forward, "one Llama decoder layer for a few rows, in place");
  m.def("head_forward", &head_forward, "final RMSNorm + lm_head");
  m.def("pack_panels", &pack_panels, "[N, K] weight -> [N/16, K, 16] panels");
  m.def("panel_linear", &panel_linear, "x @ W^T from panels");
}
