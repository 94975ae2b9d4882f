// Batch-small linears for decoding on CPU: y (M, N) = x (M, K) @ W (N, K)^T for any M rows,
// W float32, bfloat16, int8 (a scale per row) or int4 (groups of 32: a scale and a min each).
//
// One token streams every weight from memory once, so a decode step is memory-bound: these
// kernels read each weight row once for all M inputs (the rows of x stay in L1), convert it in
// registers and accumulate in float32. Activations stay float32 (a bfloat16 input is widened),
// so a quantized weight is the only approximation.
//
// Every output (m, n) is accumulated in the same order whatever M is and however the rows are
// blocked (two 16-lane accumulators over alternate 16-wide chunks of k, a masked last chunk, a
// fixed horizontal sum; int4: per group then in group order), so one token's row is
// bit-identical whether it runs alone or in a window of M tokens (speculative verification).
//
// AVX-512 (F, BW, VL) when the compiler targets it; otherwise a portable loop of the same
// arithmetic that the compiler vectorizes (outputs then differ in rounding from the AVX-512
// build, never between M).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define P2P_AVX512 1
#include <immintrin.h>
#else
#define P2P_AVX512 0
#endif

namespace {

constexpr int64_t kGroup = 32;

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// -- weight formats: how 16 weights of a row load as float32 --------------------------------

struct F32W {
  const float* w;
  int64_t ld;
  const float* row(int64_t n) const { return w + n * ld; }
#if P2P_AVX512
  static __m512 load(const float* r, int64_t k) { return _mm512_loadu_ps(r + k); }
  static __m512 load_mask(const float* r, int64_t k, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, r + k);
  }
#endif
  static float at(const float* r, int64_t k) { return r[k]; }
};

struct BF16W {
  const uint16_t* w;
  int64_t ld;
  const uint16_t* row(int64_t n) const { return w + n * ld; }
#if P2P_AVX512
  static __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static __m512 load(const uint16_t* r, int64_t k) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k)));
  }
  static __m512 load_mask(const uint16_t* r, int64_t k, __mmask16 m) {
    return widen(_mm256_maskz_loadu_epi16(m, r + k));
  }
#endif
  static float at(const uint16_t* r, int64_t k) { return bf16_to_f32(r[k]); }
};

struct I8W {
  const int8_t* w;
  int64_t ld;
  const int8_t* row(int64_t n) const { return w + n * ld; }
#if P2P_AVX512
  static __m512 load(const int8_t* r, int64_t k) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + k))));
  }
  static __m512 load_mask(const int8_t* r, int64_t k, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, r + k)));
  }
#endif
  static float at(const int8_t* r, int64_t k) { return static_cast<float>(r[k]); }
};

// -- dense micro-kernel: MB inputs x NB weight rows --------------------------------------------

template <class W, int MB, int NB>
inline void dot_block(const W& f, const float* x, int64_t ldx, int64_t n0, int64_t K,
                      float* out /* MB x NB */) {
#if P2P_AVX512
  __m512 acc[MB][NB][2];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j][0] = acc[m][j][1] = _mm512_setzero_ps();
  decltype(f.row(0)) r[NB];
  for (int j = 0; j < NB; ++j) r[j] = f.row(n0 + j);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    for (int j = 0; j < NB; ++j) {
      __m512 w0 = W::load(r[j], k), w1 = W::load(r[j], k + 16);
      for (int m = 0; m < MB; ++m) {
        acc[m][j][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * ldx + k), acc[m][j][0]);
        acc[m][j][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * ldx + k + 16), acc[m][j][1]);
      }
    }
  }
  if (k < K) {  // a last chunk of 1..31 values: into the first accumulator, then the second
    int64_t rest = K - k;
    __mmask16 m0 = rest >= 16 ? static_cast<__mmask16>(0xffff)
                              : static_cast<__mmask16>((1u << rest) - 1);
    __mmask16 m1 = rest > 16 ? static_cast<__mmask16>((1u << (rest - 16)) - 1) : 0;
    for (int j = 0; j < NB; ++j) {
      __m512 w0 = W::load_mask(r[j], k, m0);
      __m512 w1 = m1 ? W::load_mask(r[j], k + 16, m1) : _mm512_setzero_ps();
      for (int m = 0; m < MB; ++m) {
        acc[m][j][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, x + m * ldx + k),
                                       acc[m][j][0]);
        if (m1)
          acc[m][j][1] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m1, x + m * ldx + k + 16),
                                         acc[m][j][1]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j)
      out[m * NB + j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][j][0], acc[m][j][1]));
#else
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) {
      auto r = f.row(n0 + j);
      const float* xm = x + m * ldx;
      float lanes[32] = {0};
      int64_t k = 0;
      for (; k + 32 <= K; k += 32)
        for (int l = 0; l < 32; ++l) lanes[l] += W::at(r, k + l) * xm[k + l];
      for (int l = 0; k + l < K; ++l) lanes[l] += W::at(r, k + l) * xm[k + l];
      float s = 0.f;
      for (int l = 0; l < 16; ++l) s += lanes[l] + lanes[l + 16];
      out[m * NB + j] = s;
    }
#endif
}

// -- int4 micro-kernel: groups of 32, w = d * q + mn (q in 0..15) ------------------------------
// Row layout: per group 16 bytes, byte j = q[j] | q[j + 16] << 4 (GGUF's Q4 order).

struct Q4W {
  const uint8_t* q;   // (N, K / 2)
  const float* dm;    // (N, G, 2): scale d, min mn
  int64_t G;
};

template <int MB, int NB>
inline void q4_block(const Q4W& f, const float* x, int64_t ldx,
                     int64_t n0, float* out) {
  const int64_t G = f.G;
#if P2P_AVX512
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi32(0x0f);
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g = 0; g < G; ++g) {
    for (int j = 0; j < NB; ++j) {
      const int64_t n = n0 + j;
      // the 16 bytes widened to 32-bit lanes; the group's 16 weight values d * q + mn in
      // one register, looked up by both nibbles of each lane: the weights themselves, once
      // for all MB rows, then 2 FMAs a row per 32 weights
      __m512i b = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(f.q + n * G * 16 + g * 16)));
      const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(f.dm[(n * G + g) * 2]),
                                           _mm512_set1_ps(f.dm[(n * G + g) * 2 + 1]));
      const __m512 w0 = _mm512_permutexvar_ps(_mm512_and_si512(b, low), table);
      const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
      for (int m = 0; m < MB; ++m) {
        const float* xm = x + m * ldx + g * kGroup;
        acc[m][j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m][j]);
        acc[m][j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) out[m * NB + j] = _mm512_reduce_add_ps(acc[m][j]);
#else
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) {
      const int64_t n = n0 + j;
      float lanes[16] = {0};
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* b = f.q + n * G * 16 + g * 16;
        const float* xm = x + m * ldx + g * kGroup;
        const float dg = f.dm[(n * G + g) * 2], mg = f.dm[(n * G + g) * 2 + 1];
        for (int l = 0; l < 16; ++l) {
          lanes[l] = std::fma(std::fma(static_cast<float>(b[l] & 0x0f), dg, mg), xm[l], lanes[l]);
          lanes[l] = std::fma(std::fma(static_cast<float>(b[l] >> 4), dg, mg), xm[l + 16],
                              lanes[l]);
        }
      }
      float s = 0.f;
      for (int l = 0; l < 16; ++l) s += lanes[l];
      out[m * NB + j] = s;
    }
#endif
}

// -- drivers --------------------------------------------------------------------------------

struct Out {
  float* f32 = nullptr;
  uint16_t* bf16 = nullptr;
  int64_t ld = 0;
  void store(int64_t m, int64_t n, float v) const {
    if (f32) f32[m * ld + n] = v;
    else bf16[m * ld + n] = f32_to_bf16(v);
  }
};

// Calls blk.go<MB, NB>(m0, n0, tmp) over all (m, n) blocks: threads split the rows of W in
// blocks of 64 (a block stays in L2 while every chunk of x's rows passes over it, so W is
// read from memory once whatever M is).
template <int MB, int NB, class Blk>
inline void run_rows(int64_t m0, int64_t n_lo, int64_t n_hi, const Blk& blk) {
  float tmp[MB * NB];
  int64_t n = n_lo;
  for (; n + NB <= n_hi; n += NB) blk.template go<MB, NB>(m0, n, tmp);
  for (; n < n_hi; ++n) blk.template go<MB, 1>(m0, n, tmp);
}

template <class Blk>
void drive(int64_t M, int64_t N, const Blk& blk) {
  const int64_t grain = 64;
  at::parallel_for(0, (N + grain - 1) / grain, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * grain, hi = std::min(N, lo + grain);
      int64_t m = 0;
      for (; m + 8 <= M; m += 8) run_rows<8, 1>(m, lo, hi, blk);
      for (; m + 4 <= M; m += 4) run_rows<4, 2>(m, lo, hi, blk);
      for (; m + 2 <= M; m += 2) run_rows<2, 4>(m, lo, hi, blk);
      for (; m < M; ++m) run_rows<1, 1>(m, lo, hi, blk);
    }
  });
}

template <class W>
struct DenseBlk {
  const W& f;
  const float* x;
  int64_t ldx, K;
  const float* scale;  // per row, or null
  const Out& out;
  template <int MB, int NB>
  void go(int64_t m0, int64_t n0, float* tmp) const {
    dot_block<W, MB, NB>(f, x + m0 * ldx, ldx, n0, K, tmp);
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < NB; ++j) {
        float v = tmp[m * NB + j];
        if (scale) v *= scale[n0 + j];
        out.store(m0 + m, n0 + j, v);
      }
  }
};

struct Q4Blk {
  const Q4W& f;
  const float* x;
  int64_t ldx;
  const Out& out;
  template <int MB, int NB>
  void go(int64_t m0, int64_t n0, float* tmp) const {
    q4_block<MB, NB>(f, x + m0 * ldx, ldx, n0, tmp);
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < NB; ++j) out.store(m0 + m, n0 + j, tmp[m * NB + j]);
  }
};

struct Lin {  // one linear's weight, any format
  int kind = 0;  // 0 dense f32, 1 dense bf16, 2 int8, 3 int4
  int64_t N = 0, K = 0;
  const void* w = nullptr;
  const float* aux = nullptr;  // int8: scale (N,); int4: dm (N, G, 2)

  void run(const float* x, int64_t M, const Out& o) const {
    switch (kind) {
      case 0: {
        F32W f{static_cast<const float*>(w), K};
        drive(M, N, DenseBlk<F32W>{f, x, K, K, nullptr, o});
        break;
      }
      case 1: {
        BF16W f{static_cast<const uint16_t*>(w), K};
        drive(M, N, DenseBlk<BF16W>{f, x, K, K, nullptr, o});
        break;
      }
      case 2: {
        I8W f{static_cast<const int8_t*>(w), K};
        drive(M, N, DenseBlk<I8W>{f, x, K, K, aux, o});
        break;
      }
      default: {
        const int64_t G = K / kGroup;
        Q4W f{static_cast<const uint8_t*>(w), aux, G};
        drive(M, N, Q4Blk{f, x, K, o});
      }
    }
  }
  void run(const float* x, int64_t M, float* y) const {  // float32 (M, N) out
    Out o;
    o.f32 = y;
    o.ld = N;
    run(x, M, o);
  }
};


// x as float32 (M, K) contiguous: itself, or a widened copy of a bfloat16 input.
const float* input_f32(const torch::Tensor& x, std::vector<float>& buf) {
  if (x.scalar_type() == torch::kFloat32) return x.data_ptr<float>();
  const int64_t n = x.numel();
  buf.resize(n);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_f32(src[i]);
  return buf.data();
}

torch::Tensor make_out(const torch::Tensor& x, int64_t N, Out& o) {
  auto y = torch::empty({x.size(0), N}, x.options());
  o.ld = N;
  if (y.scalar_type() == torch::kFloat32) o.f32 = y.data_ptr<float>();
  else o.bf16 = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  return y;
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous CPU (M, K) tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "x must be float32 or bfloat16");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
  TORCH_CHECK(x.size(0) >= 1, "x must have rows");
}

// x (M, K) through one linear: y (M, N) in x's dtype.
torch::Tensor apply(const torch::Tensor& x, const Lin& l) {
  check_x(x, l.K);
  std::vector<float> buf;
  const float* xf = input_f32(x, buf);
  Out o;
  auto y = make_out(x, l.N, o);
  l.run(xf, x.size(0), o);
  return y;
}

}  // namespace

// y = x @ w.T, w float32 or bfloat16 (N, K); y in x's dtype.
torch::Tensor linear_dense(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(),
              "w must be a contiguous CPU (N, K) tensor");
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16,
              "w must be float32 or bfloat16");
  const int kind = w.scalar_type() == torch::kBFloat16 ? 1 : 0;
  return apply(x, Lin{kind, w.size(0), w.size(1), w.data_ptr(), nullptr});
}

// y = (x @ q.T) * scale, q int8 (N, K), scale float32 (N,).
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& q,
                          const torch::Tensor& scale) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kInt8 &&
                  q.device().is_cpu() && scale.device().is_cpu(), "q must be CPU int8 (N, K)");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() &&
                  scale.numel() == N, "scale must be float32 (N,)");
  return apply(x, Lin{2, N, K, q.data_ptr(), scale.data_ptr<float>()});
}

// y = x @ w.T with w[n, 32g + j] = dm[n, g, 0] * code + dm[n, g, 1]; q uint8 (N, K / 2) in
// Q4 order (per group 16 bytes: byte j holds code j in its low nibble, code j + 16 high).
torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& q,
                          const torch::Tensor& dm) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kUInt8 &&
                  q.device().is_cpu() && dm.device().is_cpu(), "q must be CPU uint8 (N, K / 2)");
  const int64_t N = q.size(0), K = q.size(1) * 2, G = K / kGroup;
  TORCH_CHECK(K % kGroup == 0, "int4 input width must be a multiple of 32");
  TORCH_CHECK(dm.scalar_type() == torch::kFloat32 && dm.is_contiguous() && dm.dim() == 3 &&
                  dm.size(0) == N && dm.size(1) == G && dm.size(2) == 2,
              "dm must be float32 (N, K / 32, 2)");
  return apply(x, Lin{3, N, K, q.data_ptr(), dm.data_ptr<float>()});
}

// -- one decoder layer for a few new tokens of one cache row ---------------------------------
//
// What DecoderLayer.forward computes for T (<= 16) new tokens of one cache row whose blocks
// are one run, in one call: RMSNorm, fused q/k/v, rotary, the cache write, attention (GQA,
// causal within the T tokens, an optional sliding window), output projection, residual,
// RMSNorm, fused gate/up, SiLU * up, down projection, residual. Activations stay float32
// inside the layer (a bfloat16 model's hidden state and cache are rounded where they are
// stored); each query's attention and each linear row are computed the same way whatever T
// is, so a token gets the same bits alone or in a window.

namespace {

Lin make_lin(const std::vector<torch::Tensor>& t, int64_t kind, int64_t K) {
  Lin l;
  l.kind = static_cast<int>(kind);
  TORCH_CHECK(!t.empty() && t[0].is_contiguous() && t[0].dim() == 2, "bad weight");
  l.N = t[0].size(0);
  l.K = K;
  switch (kind) {
    case 0:
      TORCH_CHECK(t[0].scalar_type() == torch::kFloat32 && t[0].size(1) == K, "f32 weight");
      l.w = t[0].data_ptr<float>();
      break;
    case 1:
      TORCH_CHECK(t[0].scalar_type() == torch::kBFloat16 && t[0].size(1) == K, "bf16 weight");
      l.w = t[0].data_ptr<at::BFloat16>();
      break;
    case 2:
      TORCH_CHECK(t.size() == 2 && t[0].scalar_type() == torch::kInt8 && t[0].size(1) == K &&
                      t[1].scalar_type() == torch::kFloat32 && t[1].numel() == l.N,
                  "int8 weight");
      l.w = t[0].data_ptr<int8_t>();
      l.aux = t[1].data_ptr<float>();
      break;
    case 3:
      TORCH_CHECK(t.size() == 2 && t[0].scalar_type() == torch::kUInt8 && t[0].size(1) * 2 == K &&
                      K % kGroup == 0 && t[1].scalar_type() == torch::kFloat32 &&
                      t[1].is_contiguous() && t[1].numel() == l.N * (K / kGroup) * 2,
                  "int4 weight");
      l.w = t[0].data_ptr<uint8_t>();
      l.aux = t[1].data_ptr<float>();
      break;
    default:
      TORCH_CHECK(false, "unknown weight kind ", kind);
  }
  return l;
}

struct AnyF {  // a float32 or bfloat16 buffer, read/written as float32
  void* p = nullptr;
  bool bf16 = false;
  float get(int64_t i) const {
    return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
  }
  void set(int64_t i, float v) const {
    if (bf16) static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
    else static_cast<float*>(p)[i] = v;
  }
};

AnyF any_of(const torch::Tensor& t) {
  AnyF a;
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16,
              "tensors must be float32 or bfloat16");
  a.p = t.data_ptr();
  a.bf16 = t.scalar_type() == torch::kBFloat16;
  return a;
}

// y[m] = x[m] * rsqrt(mean(x[m]^2) + eps) * w, x float32 (M, H)
void rms_norm(const float* x, int64_t M, int64_t H, const AnyF& w, float eps, float* y) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * H;
    double ss = 0.0;
    for (int64_t i = 0; i < H; ++i) ss += static_cast<double>(xm[i]) * xm[i];
    const float r = 1.0f / std::sqrt(static_cast<float>(ss / H) + eps);
    for (int64_t i = 0; i < H; ++i) y[m * H + i] = xm[i] * r * w.get(i);
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
#if P2P_AVX512
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s = std::fma(a[i], b[i], s);
  return s;
#else
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s = std::fma(a[i], b[i], s);
  return s;
#endif
}

// exp(x) for n floats in place: Cephes' expf (x = k ln2 + r, |r| <= ln2 / 2, degree-5
// polynomial, 2^k from the exponent bits), within ~2 ulp of std::exp; the portable build
// calls std::exp.
void exp_inplace(float* v, int64_t n) {
  int64_t i = 0;
#if P2P_AVX512
  const __m512 hi = _mm512_set1_ps(88.3762626647949f), lo = _mm512_set1_ps(-87.3365447505531f);
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 c1 = _mm512_set1_ps(0.693359375f), c2 = _mm512_set1_ps(-2.12194440e-4f);
  const __m512 p0 = _mm512_set1_ps(1.9875691500e-4f), p1 = _mm512_set1_ps(1.3981999507e-3f),
               p2 = _mm512_set1_ps(8.3334519073e-3f), p3 = _mm512_set1_ps(4.1665795894e-2f),
               p4 = _mm512_set1_ps(1.6666665459e-1f), p5 = _mm512_set1_ps(5.0000001201e-1f);
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 x0 = _mm512_loadu_ps(v + i);
    __mmask16 under = _mm512_cmp_ps_mask(x0, lo, _CMP_LT_OQ);
    __mmask16 nan = _mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q);
    __m512 x = x0;
    x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(k, c1, x);
    r = _mm512_fnmadd_ps(k, c2, r);
    __m512 r2 = _mm512_mul_ps(r, r);
    __m512 y = _mm512_fmadd_ps(p0, r, p1);
    y = _mm512_fmadd_ps(y, r, p2);
    y = _mm512_fmadd_ps(y, r, p3);
    y = _mm512_fmadd_ps(y, r, p4);
    y = _mm512_fmadd_ps(y, r, p5);
    y = _mm512_fmadd_ps(y, r2, _mm512_add_ps(r, one));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
    y = _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), y);
    _mm512_storeu_ps(v + i, _mm512_mask_mov_ps(y, nan, x0));
  }
#endif
  for (; i < n; ++i) v[i] = std::exp(v[i]);
}

// n values of a float32 or bfloat16 buffer from element `base`, as float32: a pointer into
// the buffer itself (float32) or into `tmp` (widened).
const float* row_f32(const AnyF& a, int64_t base, int64_t n, float* tmp) {
  if (!a.bf16) return static_cast<const float*>(a.p) + base;
  const uint16_t* src = static_cast<const uint16_t*>(a.p) + base;
  int64_t i = 0;
#if P2P_AVX512
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(tmp + i, BF16W::load(src, i));
#endif
  for (; i < n; ++i) tmp[i] = bf16_to_f32(src[i]);
  return tmp;
}

}  // namespace

torch::Tensor decoder_layer(
    const torch::Tensor& h, const torch::Tensor& w_in, const torch::Tensor& w_post, double eps,
    const std::vector<torch::Tensor>& qkv, int64_t qkv_kind,
    const std::vector<torch::Tensor>& o_w, int64_t o_kind,
    const std::vector<torch::Tensor>& gu, int64_t gu_kind,
    const std::vector<torch::Tensor>& down, int64_t down_kind,
    const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& kc,
    const torch::Tensor& vc, int64_t write, int64_t first, int64_t s, int64_t window,
    int64_t nh, int64_t nkv, int64_t hd, double scale) {
  TORCH_CHECK(h.is_contiguous() && h.dim() == 3 && h.size(0) == 1, "h must be (1, T, H)");
  const int64_t T = h.size(1), H = h.size(2);
  const int64_t nq = nh * hd, nk = nkv * hd, nqkv = nq + 2 * nk;
  TORCH_CHECK(T >= 1 && s >= T && nh % nkv == 0 && hd % 2 == 0, "bad layer geometry");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * hd &&
                  sin.numel() == T * hd, "cos/sin must hold (T, head_dim)");
  TORCH_CHECK(kc.dim() == 4 && vc.dim() == 4 && kc.size(1) == nkv && kc.size(3) == hd &&
                  kc.stride(3) == 1 && vc.stride(3) == 1 && kc.scalar_type() == vc.scalar_type(),
              "kc/vc must be (1, kv_heads, slots, head_dim) views");
  TORCH_CHECK(write >= 0 && first >= 0 && write + T <= kc.size(2) && first + s <= kc.size(2),
              "cache slots out of range");
  const Lin lqkv = make_lin(qkv, qkv_kind, H), lo = make_lin(o_w, o_kind, nq),
            lgu = make_lin(gu, gu_kind, H);
  TORCH_CHECK(lqkv.N == nqkv && lo.N == H && lgu.N % 2 == 0, "projection shapes");
  const int64_t inter = lgu.N / 2;
  const Lin ld = make_lin(down, down_kind, inter);
  TORCH_CHECK(ld.N == H, "down projection shape");
  const AnyF hin = any_of(h), win = any_of(w_in), wpost = any_of(w_post), cs = any_of(cos),
             sn = any_of(sin), kca = any_of(kc), vca = any_of(vc);
  TORCH_CHECK(w_in.numel() == H && w_post.numel() == H, "norm weights");
  const float feps = static_cast<float>(eps), fscale = static_cast<float>(scale);

  std::vector<float> x(T * H), x1(T * H), buf(T * std::max(nqkv, 2 * inter)), att(T * nq);
  for (int64_t i = 0; i < T * H; ++i) x[i] = hin.get(i);
  // 1. q/k/v and rotary
  rms_norm(x.data(), T, H, win, feps, x1.data());
  lqkv.run(x1.data(), T, buf.data());
  const int64_t half = hd / 2;
  std::vector<float> tmp(hd);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t head = 0; head < nh + nkv; ++head) {
      float* v = buf.data() + t * nqkv + head * hd;
      for (int64_t i = 0; i < hd; ++i)
        tmp[i] = v[i] * cs.get(t * hd + i) + v[(i + half) % hd] * sn.get(t * hd + i);
      std::memcpy(v, tmp.data(), hd * sizeof(float));
    }
  // 2. the cache: this window's keys/values
  const int64_t ks0 = kc.stride(1), ks2 = kc.stride(2), vs0 = vc.stride(1), vs2 = vc.stride(2);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < nkv; ++g) {
      const float* kv = buf.data() + t * nqkv + nq + g * hd;
      const float* vv = buf.data() + t * nqkv + nq + nk + g * hd;
      for (int64_t i = 0; i < hd; ++i) {
        kca.set(g * ks0 + (write + t) * ks2 + i, kv[i]);
        vca.set(g * vs0 + (write + t) * vs2 + i, vv[i]);
      }
    }
  // 3. attention: query t sees slots [first + lo_t, first + s - T + t + 1)
  const int64_t rep = nh / nkv;
  // a short context is a few microseconds of attention: threads only from ~100k products
  // a thread (waking one costs more than that, and under load much more)
  const int64_t att_grain = std::max<int64_t>(1, 200000 / std::max<int64_t>(1, 2 * s * hd));
  at::parallel_for(0, T * nh, att_grain, [&](int64_t a0, int64_t a1) {
    std::vector<float> kf(hd), sc(s);
    std::vector<float> acc(hd);
    for (int64_t a = a0; a < a1; ++a) {
      const int64_t t = a / nh, head = a % nh, g = head / rep;
      const int64_t end = s - T + t + 1;
      const int64_t lo_t = (window > 0 && end > window) ? end - window : 0;
      const float* q = buf.data() + t * nqkv + head * hd;
      float mx = -INFINITY;
      for (int64_t j = lo_t; j < end; ++j) {
        const float* kr = row_f32(kca, g * ks0 + (first + j) * ks2, hd, kf.data());
        sc[j - lo_t] = dot(q, kr, hd) * fscale;
        mx = std::max(mx, sc[j - lo_t]);
      }
      const int64_t nk_t = end - lo_t;
      for (int64_t j = 0; j < nk_t; ++j) sc[j] -= mx;
      exp_inplace(sc.data(), nk_t);
      float sum = 0.f;
      for (int64_t j = 0; j < nk_t; ++j) sum += sc[j];
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = lo_t; j < end; ++j) {
        const float p = sc[j - lo_t];
        const float* vr = row_f32(vca, g * vs0 + (first + j) * vs2, hd, kf.data());
        for (int64_t i = 0; i < hd; ++i) acc[i] = std::fma(p, vr[i], acc[i]);
      }
      const float inv = 1.0f / sum;
      float* out = att.data() + t * nq + head * hd;
      for (int64_t i = 0; i < hd; ++i) out[i] = acc[i] * inv;
    }
  });
  // 4. output projection, residual
  lo.run(att.data(), T, x1.data());
  for (int64_t i = 0; i < T * H; ++i) x[i] += x1[i];
  // 5. MLP, residual
  rms_norm(x.data(), T, H, wpost, feps, x1.data());
  lgu.run(x1.data(), T, buf.data());
  std::vector<float> act(T * inter);
  for (int64_t t = 0; t < T; ++t) {  // SiLU(gate) * up
    const float* gt = buf.data() + t * 2 * inter;
    float* a = act.data() + t * inter;
    for (int64_t i = 0; i < inter; ++i) a[i] = -gt[i];
    exp_inplace(a, inter);
    for (int64_t i = 0; i < inter; ++i) a[i] = gt[i] / (1.0f + a[i]) * gt[inter + i];
  }
  ld.run(act.data(), T, x1.data());
  auto out = torch::empty_like(h);
  const AnyF ho = any_of(out);
  for (int64_t i = 0; i < T * H; ++i) ho.set(i, x[i] + x1[i]);
  return out;
}

// One new query per cache row, attending to that row's cached keys where they lie: the
// paged cache's chunks are read in place (no gather of every key per layer and step).
// q (B, nh, hd), float32 or bfloat16, stride(2) == 1; kcs/vcs: this layer's keys/values of
// every chunk, each (1, nkv, slots, hd) with stride(3) == 1 (an unallocated chunk: any
// tensor with no slots); slot (B, S) int64: the global slot (chunk * chunk_slots + local
// slot) of every key position of every row; lens (B) int64: row b attends to its positions
// [lo_b, lens[b]), lo_b = lens[b] - window when a window is given and shorter. Returns
// (B, nh, hd) float32: softmax(q k^T * scale) v per head, query head h on kv head h / (nh / nkv).
torch::Tensor paged_attention(const torch::Tensor& q, const std::vector<torch::Tensor>& kcs,
                              const std::vector<torch::Tensor>& vcs, const torch::Tensor& slot,
                              const torch::Tensor& lens, int64_t chunk_slots, int64_t window,
                              double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be (B, heads, head_dim), rows contiguous");
  const int64_t B = q.size(0), nh = q.size(1), hd = q.size(2);
  TORCH_CHECK(!kcs.empty() && kcs.size() == vcs.size(), "one key and one value view per chunk");
  int64_t nkv = 0;
  for (const auto& kc : kcs)
    if (kc.dim() == 4 && kc.size(2) > 0) {
      nkv = kc.size(1);
      break;
    }
  TORCH_CHECK(nkv > 0 && nh % nkv == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(slot.dim() == 2 && slot.size(0) == B && slot.scalar_type() == torch::kInt64 &&
                  slot.is_contiguous(), "slot must be contiguous int64 (B, S)");
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == B && lens.scalar_type() == torch::kInt64 &&
                  lens.is_contiguous(), "lens must be contiguous int64 (B,)");
  const int64_t S = slot.size(1), nc = static_cast<int64_t>(kcs.size());
  std::vector<AnyF> ka(nc), va(nc);
  std::vector<int64_t> ks1(nc), ks2(nc), vs1(nc), vs2(nc);
  std::vector<bool> live(nc, false);
  for (int64_t c = 0; c < nc; ++c) {
    const auto &kc = kcs[c], &vc = vcs[c];
    if (kc.dim() != 4 || kc.size(2) == 0) continue;
    TORCH_CHECK(kc.size(1) == nkv && kc.size(2) == chunk_slots && kc.size(3) == hd &&
                    kc.stride(3) == 1 && vc.dim() == 4 && vc.sizes() == kc.sizes() &&
                    vc.stride(3) == 1, "chunk views must be (1, kv_heads, chunk_slots, head_dim)");
    ka[c] = any_of(kc);
    va[c] = any_of(vc);
    ks1[c] = kc.stride(1), ks2[c] = kc.stride(2), vs1[c] = vc.stride(1), vs2[c] = vc.stride(2);
    live[c] = true;
  }
  const int64_t* sl = slot.data_ptr<int64_t>();
  const int64_t* ln = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {  // every slot read must lie in an allocated chunk
    TORCH_CHECK(ln[b] >= 1 && ln[b] <= S, "row lengths out of range");
    for (int64_t j = 0; j < ln[b]; ++j) {
      const int64_t g = sl[b * S + j], c = g / chunk_slots;
      TORCH_CHECK(g >= 0 && c < nc && live[c], "slot outside the allocated chunks");
    }
  }
  const AnyF qa = any_of(q);
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), rep = nh / nkv;
  const float fscale = static_cast<float>(scale);
  auto out = torch::empty({B, nh, hd}, q.options().dtype(torch::kFloat32));
  float* o = out.data_ptr<float>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, ln[b]);
  const int64_t grain = std::max<int64_t>(1, 200000 / std::max<int64_t>(1, 4 * longest * hd * rep));
  at::parallel_for(0, B * nkv, grain, [&](int64_t a0, int64_t a1) {
    std::vector<float> qf(rep * hd), kf(hd), sc(rep * longest), acc(rep * hd);
    for (int64_t a = a0; a < a1; ++a) {
      const int64_t b = a / nkv, g = a % nkv, end = ln[b];
      const int64_t lo = (window > 0 && end > window) ? end - window : 0, n = end - lo;
      for (int64_t r = 0; r < rep; ++r)
        for (int64_t i = 0; i < hd; ++i) qf[r * hd + i] = qa.get(b * qs0 + (g * rep + r) * qs1 + i);
      const int64_t* srow = sl + b * S;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t gs = srow[lo + j], c = gs / chunk_slots, l = gs % chunk_slots;
        const float* kr = row_f32(ka[c], g * ks1[c] + l * ks2[c], hd, kf.data());
        for (int64_t r = 0; r < rep; ++r) sc[r * n + j] = dot(qf.data() + r * hd, kr, hd) * fscale;
      }
      for (int64_t r = 0; r < rep; ++r) {
        float* sr = sc.data() + r * n;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sr[j]);
        for (int64_t j = 0; j < n; ++j) sr[j] -= mx;
        exp_inplace(sr, n);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t gs = srow[lo + j], c = gs / chunk_slots, l = gs % chunk_slots;
        const float* vr = row_f32(va[c], g * vs1[c] + l * vs2[c], hd, kf.data());
        for (int64_t r = 0; r < rep; ++r) {
          const float p = sc[r * n + j];
          float* ar = acc.data() + r * hd;
          for (int64_t i = 0; i < hd; ++i) ar[i] = std::fma(p, vr[i], ar[i]);
        }
      }
      for (int64_t r = 0; r < rep; ++r) {
        const float* sr = sc.data() + r * n;
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += sr[j];
        const float inv = 1.0f / sum;
        float* orow = o + (b * nh + g * rep + r) * hd;
        for (int64_t i = 0; i < hd; ++i) orow[i] = acc[r * hd + i] * inv;
      }
    }
  });
  return out;
}

// exp of a contiguous float32 tensor, as the layer computes it (for tests)
torch::Tensor exp_f32(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.device().is_cpu(), "x must be float32");
  auto y = x.contiguous().clone();
  exp_inplace(y.data_ptr<float>(), y.numel());
  return y;
}

bool has_avx512() { return P2P_AVX512 != 0; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_dense", &linear_dense, "x @ w.T for a float32/bfloat16 w, any M");
  m.def("linear_int8", &linear_int8, "x @ (q * scale).T, any M");
  m.def("linear_int4", &linear_int4, "x @ w.T for groups-of-32 int4 w, any M");
  m.def("decoder_layer", &decoder_layer, "one decoder layer for few tokens of one cache row");
  m.def("paged_attention", &paged_attention, "one query per cache row over its paged keys, in place");
  m.def("exp_f32", &exp_f32, "the layer's exp (tests)");
  m.def("has_avx512", &has_avx512, "whether this build uses AVX-512");
}
