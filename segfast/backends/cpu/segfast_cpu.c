/* segfast's CPU kernels: plain C99 + OpenMP, compiled on first use by
 * segfast/backends/cpu/native.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes with torch tensors' data pointers.
 *
 * OpenMP: the library links libgomp by its soname; loaded after torch, the
 * loader binds it to the libgomp torch already loaded, so these kernels and
 * torch's ops share one thread pool (native.py refuses the library when a
 * second OpenMP runtime would be mapped).
 *
 * Every tensor is fp32 NHWC with channel stride 1; the other strides are
 * passed in elements, so channel slices of a larger buffer can be read and
 * written. Activations: 0 none, 1 relu, 2 relu6, 3 leaky_relu (act_param is
 * the slope), 4 hardswish, 5 hardsigmoid, 6 silu, 7 sigmoid (the last two through
 * sf_exp_v, within 2 ulp of expf); anything else is applied by the caller.
 *
 * Kernels:
 *   sf_dwconv2d   depthwise KH×KW convolution, any stride/padding/dilation,
 *                 bias, residual (before or after the activation);
 *   sf_dwconv8    the same on 8-lane vectors, register-tiled along the row (CPUs
 *                 without AVX-512);
 *   sf_conv_few   dense KH×KW convolution (stride 1) with few output channels: vectors
 *                 over input channels, a horizontal sum per 8 output pixels;
 *   sf_wino_in    Winograd F(4×4, 3×3) input transform: NHWC tiles → V[36][T][C];
 *   sf_wino_out   Winograd F(4×4, 3×3) output transform: M[36][T][K] → NHWC,
 *                 with bias, residual and activation;
 *   sf_resize_dw  depthwise convolution of a bilinear upsample, the upsample
 *                 computed per band of rows and never written whole;
 *   sf_quantize_u8  fp32 → int8 at one scale (round half to even, saturating at
 *                 −128/127, as ONNX's QuantizeLinear), stored as uint8 + zp for
 *                 oneDNN's int8 convolutions (zp 128; zp 0 for inputs known to be
 *                 ≥ 0, where negative values clamp to 0);
 *   sf_resize_q8  a bilinear resize written as uint8 at one scale (the quantization of
 *                 an int8 conv that reads it), never as fp32;
 *   sf_se_gate    a squeeze-excitation gate: the mean over H×W of an NHWC fp32/bf16
 *                 map, a 1×1 conv + activation, optionally a second one, in one call;
 *   sf_to_nhwc    an engine's entry layout conversion, NCHW fp32 → NHWC fp32/bf16.
 * References: segfast/backends/cpu/depthwise.py, winograd.py and resize_dw.py.
 */
#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define SF_CB 16 /* channels per vector block: one AVX-512 register of fp32 */

static inline float sf_act(float v, int act, float p) {
  switch (act) {
    case 1: return v > 0.f ? v : 0.f;
    case 2: return v < 0.f ? 0.f : (v > 6.f ? 6.f : v);
    case 3: return v >= 0.f ? v : v * p;
    case 4: { const float r = v + 3.f; return v * (r < 0.f ? 0.f : (r > 6.f ? 6.f : r)) / 6.f; }
    case 5: { const float r = v + 3.f; return (r < 0.f ? 0.f : (r > 6.f ? 6.f : r)) / 6.f; }
    case 6: return v / (1.f + expf(-v));
    case 7: return 1.f / (1.f + expf(-v));
    default: return v;
  }
}

int sf_abi_version(void) { return 22; }

/* Per-thread scratch buffers that grow and are kept: a kernel's temporary memory
 * comes from here, not from malloc per call. Large mallocs are fresh mmaps whose
 * pages fault in (and are zeroed) on every call — 210 page faults per DeepLab v3+
 * frame before this. OpenMP's worker threads live as long as the process, so the
 * buffers do too (each at most the largest request made on that thread). */
enum { SF_SLOT_BAND, SF_SLOT_ROWS, SF_SLOT_TABLE0, SF_SLOT_TABLE1, SF_SLOT_TABLE2, SF_SLOT_TABLE3,
       SF_SLOT_RING, SF_SLOT_DWROW, SF_SLOT_TAGS, SF_SLOT_DW8, SF_SLOT_DW8TAG,
       SF_SLOTS };
static __thread void* sf_buf[SF_SLOTS];
static __thread size_t sf_cap[SF_SLOTS];

static void* sf_scratch(int slot, size_t bytes) {
  if (sf_cap[slot] < bytes) {
    void* p = 0;
    if (posix_memalign(&p, 64, bytes) != 0) return 0;
    free(sf_buf[slot]);
    sf_buf[slot] = p;
    sf_cap[slot] = bytes;
  }
  return sf_buf[slot];
}

/* 16 fp32 lanes; unaligned loads and stores (GCC vector extension: one AVX-512
 * register, two AVX2 registers on older CPUs). */
typedef float sf_v16 __attribute__((vector_size(64), aligned(4)));

typedef int32_t sf_i16 __attribute__((vector_size(64), aligned(4)));

/* a where m is set, else b (C has no vector ?: ; this compiles to a blend). */
static inline sf_v16 sf_select(sf_i16 m, sf_v16 a, sf_v16 b) {
  return (sf_v16)(((sf_i16)a & m) | ((sf_i16)b & ~m));
}

/* max(v, 0) and min(v, 6) as one instruction each where AVX-512 is there (GCC's
 * vector extension has no max; the select is compare + three logic ops). A NaN
 * becomes 0 either way, as with sf_select(v > 0, v, 0). */
#ifdef __AVX512F__
static inline __attribute__((always_inline)) sf_v16 sf_relu_v(sf_v16 v) {
  return (sf_v16)_mm512_max_ps((__m512)v, _mm512_setzero_ps());
}
static inline __attribute__((always_inline)) sf_v16 sf_min6_v(sf_v16 v) {
  return (sf_v16)_mm512_min_ps((__m512)v, _mm512_set1_ps(6.f));
}
#else
static inline sf_v16 sf_relu_v(sf_v16 v) {
  const sf_v16 zero = {0};
  return sf_select(v > zero, v, zero);
}
static inline sf_v16 sf_min6_v(sf_v16 v) {
  const sf_v16 six = (sf_v16){0} + 6.f;
  return sf_select(v < six, v, six);
}
#endif

/* exp(x) on a vector (sf_exp_v: 16 lanes, sf_exp8: 8): x = n·ln2 + r (n rounded to nearest, ln2 split in two parts so
 * n·ln2 is exact), exp(r) by the degree-6 minimax polynomial on |r| ≤ ln2/2 (Cephes'
 * expf coefficients), 2^n assembled in the exponent bits. Inputs are clamped to
 * [−87.3, 88.7], where the result stays a normal float: exp(−∞) gives 1.2e−38 (not 0),
 * which no caller here can tell apart (silu and sigmoid divide by 1 + exp). */
#define SF_EXP_BODY(V, I, SEL)                                                   \
  const V hi = (V){0} + 88.72283f, lo = (V){0} - 87.33654f;                      \
  x = SEL(x > hi, hi, x);                                                        \
  x = SEL(x < lo, lo, x);                                                        \
  const V magic = (V){0} + 12582912.f; /* 1.5·2^23: round to nearest integer */ \
  const V n = (x * 1.44269504088896341f + magic) - magic;                        \
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;                       \
  V q = (V){0} + 1.9875691500e-4f;                                               \
  q = q * r + 1.3981999507e-3f;                                                  \
  q = q * r + 8.3334519073e-3f;                                                  \
  q = q * r + 4.1665795894e-2f;                                                  \
  q = q * r + 1.6666665459e-1f;                                                  \
  q = q * r + 5.0000001201e-1f;                                                  \
  q = q * r * r + r + 1.f;                                                       \
  const I e = (__builtin_convertvector(n, I) + 127) << 23;                       \
  return q * (V)e

static inline __attribute__((always_inline)) sf_v16 sf_exp_v(sf_v16 x) {
  SF_EXP_BODY(sf_v16, sf_i16, sf_select);
}

static inline __attribute__((always_inline)) sf_v16 sf_act_v(sf_v16 v, int act, float p) {
  const sf_v16 zero = {0};
  switch (act) {
    case 1: return sf_relu_v(v);
    case 2: return sf_min6_v(sf_relu_v(v));
    case 3: return sf_select(v >= zero, v, v * p);
    case 4: return v * sf_min6_v(sf_relu_v(v + 3.f)) * (1.f / 6.f);
    case 5: return sf_min6_v(sf_relu_v(v + 3.f)) * (1.f / 6.f);
    case 6: return v / (1.f + sf_exp_v(-v));
    case 7: return 1.f / (1.f + sf_exp_v(-v));
    default: return v;
  }
}


/* One output pixel, channels [c0, c0 + 16·NV): acc = bias + Σ taps w·x. */
#define SF_DW_BLOCK(NV)                                                                   \
  do {                                                                                    \
    sf_v16 acc[NV];                                                                       \
    for (int v = 0; v < NV; ++v) acc[v] = bias ? *(const sf_v16*)(bias + c0 + 16 * v) : zero; \
    for (int64_t kh = 0; kh < KH; ++kh) {                                                 \
      const int64_t ih = oh * sh - ph + kh * dh;                                          \
      if (ih < 0 || ih >= H) continue;                                                    \
      for (int64_t kw = 0; kw < KW; ++kw) {                                               \
        const int64_t iw = ow * sw - pw + kw * dw;                                        \
        if (iw < 0 || iw >= W) continue;                                                  \
        const float* xp = x + n * xsn + ih * xsh + iw * xsw + c0;                         \
        const float* wp = w + (kh * KW + kw) * C + c0;                                    \
        for (int v = 0; v < NV; ++v)                                                      \
          acc[v] += *(const sf_v16*)(wp + 16 * v) * *(const sf_v16*)(xp + 16 * v);        \
      }                                                                                   \
    }                                                                                     \
    float* yp = y + n * ysn + oh * ysh + ow * ysw + c0;                                   \
    const float* rp = res ? res + n * rsn + oh * rsh + ow * rsw + c0 : 0;                 \
    for (int v = 0; v < NV; ++v) {                                                        \
      sf_v16 o = acc[v];                                                                  \
      if (rp && !res_after_act) o += *(const sf_v16*)(rp + 16 * v);                       \
      o = sf_act_v(o, act, act_param);                                                    \
      if (rp && res_after_act) o += *(const sf_v16*)(rp + 16 * v);                        \
      *(sf_v16*)(yp + 16 * v) = o;                                                        \
    }                                                                                     \
  } while (0)

/* y[n, oh, ow, c] = act(bias[c] + sum_{kh,kw} w[kh][kw][c] * x[n, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw, c] (+ res))
 * Taps that fall in the zero padding are skipped (atrous rates larger than the map
 * read mostly padding). Work item: one output row × one block of 64 channels, held
 * in four vector registers; channels past the last multiple of 16 take a scalar loop. */
void sf_dwconv2d(const float* restrict x, int64_t N, int64_t H, int64_t W, int64_t C,
                 int64_t xsn, int64_t xsh, int64_t xsw,
                 const float* restrict w, int64_t KH, int64_t KW, const float* restrict bias,
                 int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                 float* restrict y, int64_t Ho, int64_t Wo, int64_t ysn, int64_t ysh, int64_t ysw,
                 const float* restrict res, int64_t rsn, int64_t rsh, int64_t rsw, int res_after_act,
                 int act, float act_param) {
  const int64_t CBLK = 64;
  const int64_t ncb = (C + CBLK - 1) / CBLK;
  const int64_t rows = N * Ho;
  const sf_v16 zero = {0};
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t cb = 0; cb < ncb; ++cb) {
      const int64_t n = r / Ho, oh = r % Ho;
      const int64_t cstart = cb * CBLK;
      const int64_t cn = (C - cstart) < CBLK ? (C - cstart) : CBLK;
      for (int64_t ow = 0; ow < Wo; ++ow) {
        int64_t c0 = cstart;
        if (cn == 64) {
          SF_DW_BLOCK(4);
          continue;
        }
        for (; c0 + 16 <= cstart + cn; c0 += 16) SF_DW_BLOCK(1);
        for (; c0 < cstart + cn; ++c0) { /* the last C mod 16 channels */
          float acc = bias ? bias[c0] : 0.f;
          for (int64_t kh = 0; kh < KH; ++kh) {
            const int64_t ih = oh * sh - ph + kh * dh;
            if (ih < 0 || ih >= H) continue;
            for (int64_t kw = 0; kw < KW; ++kw) {
              const int64_t iw = ow * sw - pw + kw * dw;
              if (iw < 0 || iw >= W) continue;
              acc += w[(kh * KW + kw) * C + c0] * x[n * xsn + ih * xsh + iw * xsw + c0];
            }
          }
          float* yp = y + n * ysn + oh * ysh + ow * ysw + c0;
          if (res) {
            const float rv = res[n * rsn + oh * rsh + ow * rsw + c0];
            *yp = res_after_act ? sf_act(acc, act, act_param) + rv : sf_act(acc + rv, act, act_param);
          } else {
            *yp = sf_act(acc, act, act_param);
          }
        }
      }
    }
  }
}

/* 8 fp32 lanes (one AVX2 register): the vector of sf_dwconv8, for CPUs without
 * AVX-512 where a 16-lane vector is two registers and sf_dwconv2d runs out of them. */
typedef float sf_v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t sf_i8 __attribute__((vector_size(32), aligned(4)));

static inline __attribute__((always_inline)) sf_v8 sf_select8(sf_i8 m, sf_v8 a, sf_v8 b) {
  return (sf_v8)(((sf_i8)a & m) | ((sf_i8)b & ~m));
}

/* sf_exp_v on 8 lanes (same range reduction and polynomial). */
static inline __attribute__((always_inline)) sf_v8 sf_exp8(sf_v8 x) {
  SF_EXP_BODY(sf_v8, sf_i8, sf_select8);
}

static inline __attribute__((always_inline)) sf_v8 sf_act8(sf_v8 v, int act, float p) {
  const sf_v8 zero = {0}, six = zero + 6.f;
  switch (act) {
    case 1: return sf_select8(v > zero, v, zero);
    case 2: v = sf_select8(v > zero, v, zero); return sf_select8(v < six, v, six);
    case 3: return sf_select8(v >= zero, v, v * p);
    case 4: case 5: {
      sf_v8 r = v + 3.f;
      r = sf_select8(r > zero, r, zero);
      r = sf_select8(r < six, r, six) * (1.f / 6.f);
      return act == 4 ? v * r : r;
    }
    case 6: return v / (1.f + sf_exp8(-v));
    case 7: return 1.f / (1.f + sf_exp8(-v));
    default: return v;
  }
}

/* The first n ≤ 8 lanes (the rest of a load are zeros): AVX2 masked loads and stores. */
static inline __attribute__((always_inline)) sf_v8 sf_load8(const float* p, int n) {
  if (n == 8) return *(const sf_v8*)p;
#ifdef __AVX2__
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return (sf_v8)_mm256_maskload_ps(p, m);
#else
  sf_v8 v = {0};
  for (int c = 0; c < n; ++c) v[c] = p[c];
  return v;
#endif
}

static inline __attribute__((always_inline)) void sf_store8(float* p, sf_v8 v, int n) {
  if (n == 8) {
    *(sf_v8*)p = v;
    return;
  }
#ifdef __AVX2__
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  _mm256_maskstore_ps(p, m, (__m256)v);
#else
  for (int c = 0; c < n; ++c) p[c] = v[c];
#endif
}

/* Eight output pixels × 8 channels: acc[r] += Σ_kw w[kw] · b[(r·SW + kw·D)·8], b a
 * packed row (8 floats a column, zero-padded); the KW weights stay in registers and
 * every input operand is at a constant offset (SW, D, KW constants: 8 + KW ≤ 15
 * registers). */
static inline __attribute__((always_inline)) void sf_dw8_row(
    const float* b, const float* wk, const int KW, const int SW, const int D, sf_v8* acc) {
  sf_v8 wv[7];
  for (int kw = 0; kw < KW; ++kw) wv[kw] = *(const sf_v8*)(wk + kw * 8);
  for (int kw = 0; kw < KW; ++kw)
    for (int r = 0; r < 8; ++r) acc[r] += wv[kw] * *(const sf_v8*)(b + (r * SW + kw * D) * 8);
}

/* The same with KW, stride and dilation known only at run time. */
static inline void sf_dw8_row_any(const float* b, const float* wk, int64_t KW, int64_t SW,
                                  int64_t D, sf_v8* acc) {
  for (int64_t kw = 0; kw < KW; ++kw) {
    const sf_v8 wv = *(const sf_v8*)(wk + kw * 8);
    for (int r = 0; r < 8; ++r) acc[r] += wv * *(const sf_v8*)(b + (r * SW + kw * D) * 8);
  }
}

/* Pack one input row for the 8-lane kernels: bp[q·plane + j·8 + l] = xr[(j − pw)·xsw +
 * 8q + l] for channel 8q + l < nc and column j − pw inside [0, W), else 0 — the row
 * zero-padded left and right, 8 channels a column, sub-block q in its own plane. Each
 * pixel's channels are read once, front to back. */
static void sf_pack_row8(const float* xr, int64_t xsw, int64_t W, int64_t pw, int64_t cols,
                         int64_t nc, float* bp0, int64_t plane) {
  const int64_t nfull = nc / 8, nsub = (nc + 7) / 8;
  for (int64_t j = 0; j < cols; ++j) {
    const int64_t iw = j - pw;
    float* bp = bp0 + j * 8;
    if (iw < 0 || iw >= W) {
      for (int64_t q = 0; q < nsub; ++q) *(sf_v8*)(bp + q * plane) = (sf_v8){0};
      continue;
    }
    const float* xp = xr + iw * xsw;
    for (int64_t q = 0; q < nfull; ++q) *(sf_v8*)(bp + q * plane) = *(const sf_v8*)(xp + q * 8);
    if (nsub > nfull) {
      float* bt = bp + nfull * plane;
      for (int64_t l = 0; l < 8; ++l) bt[l] = nfull * 8 + l < nc ? xp[nfull * 8 + l] : 0.f;
    }
  }
}

/* The per-thread ring of packed input rows the 8-lane kernels read (sf_dwconv8,
 * sf_conv_few): `floats` floats of rows and `slots` tags, the tags cleared (a call's
 * rows never match a previous call's). Returns the rows, or 0 when memory ran out. */
static float* sf_ring(size_t floats, int64_t slots, int64_t** tag) {
  float* buf = (float*)sf_scratch(SF_SLOT_DW8, floats * sizeof(float));
  *tag = (int64_t*)sf_scratch(SF_SLOT_DW8TAG, (size_t)slots * sizeof(int64_t));
  if (!buf || !*tag) return 0;
  for (int64_t q = 0; q < slots; ++q) (*tag)[q] = -1;
  return buf;
}

/* Kernel rows kh0 ≤ kh < kh1 whose input row ih0 + kh·dh lies inside the image, each
 * packed into slot ih mod slots unless the ring holds it already (tag key0 + ih; key0
 * names the image and channel chunk). xn: the image's first row at the chunk's first
 * channel. */
static void sf_ring_fill(const float* xn, int64_t xsh, int64_t xsw, int64_t H, int64_t W,
                         int64_t pw, int64_t cols, int64_t nc, float* buf, int64_t plane,
                         int64_t* tag, int64_t slots, int64_t key0, int64_t ih0, int64_t dh,
                         int64_t KH, int64_t* kh0, int64_t* kh1) {
  *kh0 = 0;
  *kh1 = KH;
  while (*kh0 < KH && ih0 + *kh0 * dh < 0) ++*kh0;
  while (*kh1 > *kh0 && ih0 + (*kh1 - 1) * dh >= H) --*kh1;
  for (int64_t kh = *kh0; kh < *kh1; ++kh) {
    const int64_t ih = ih0 + kh * dh, slot = ih % slots;
    if (tag[slot] == key0 + ih) continue;
    tag[slot] = key0 + ih;
    sf_pack_row8(xn + ih * xsh, xsw, W, pw, cols, nc, buf + slot * cols * 8, plane);
  }
}

/* What one output row of one channel chunk needs (sf_dwconv8's work item). */
typedef struct {
  const float* buf; /* packed rows: [sub-block][slot][column][8] */
  int64_t plane, cols, slots, tiles, nsub, cstart, cend, KH, KW, sw, dw, kh0, kh1, ih0, dh, Wo;
  const float* wp;  /* packed weights [C/8][KH][KW][8] */
  const float* bias;
  float* yr;        /* the output row */
  int64_t ysw;
  const float* rr;  /* the residual row, or 0 */
  int64_t rsw;
  int res_after_act, act;
  float act_param;
} sf_dw8_work;

/* One output row of a chunk: 8 pixels at a time, every 8-channel sub-block of them
 * (so each output cache line is written whole), then bias, residual, activation.
 * Instantiated per (KW, SW) in its own function: the accumulators and weights keep
 * their registers (inlined into one body, GCC spilled them to the stack). */
static inline __attribute__((always_inline)) void sf_dw8_rowwork(const sf_dw8_work* a,
                                                                 const int KW, const int SW,
                                                                 const int fast) {
  for (int64_t t = 0; t < a->tiles; ++t) {
    const int64_t np = a->Wo - t * 8 < 8 ? a->Wo - t * 8 : 8;
    for (int64_t sb = 0; sb < a->nsub; ++sb) {
      const int64_t c0 = a->cstart + sb * 8;
      const int64_t nc = a->cend - c0 < 8 ? a->cend - c0 : 8;
      const float* bs = a->buf + sb * a->plane + t * 8 * a->sw * 8;
      const float* wc = a->wp + (c0 / 8) * a->KH * a->KW * 8;
      const sf_v8 b0 = a->bias ? *(const sf_v8*)(a->bias + c0) : (sf_v8){0};
      sf_v8 acc[8];
      for (int q = 0; q < 8; ++q) acc[q] = b0;
      for (int64_t kh = a->kh0; kh < a->kh1; ++kh) {
        const float* b = bs + ((a->ih0 + kh * a->dh) % a->slots) * a->cols * 8;
        if (fast) sf_dw8_row(b, wc + kh * KW * 8, KW, SW, 1, acc);
        else sf_dw8_row_any(b, wc + kh * a->KW * 8, a->KW, a->sw, a->dw, acc);
      }
      for (int64_t q = 0; q < np; ++q) {
        const int64_t ow = t * 8 + q;
        sf_v8 o = acc[q], rv = {0};
        if (a->rr) {
          if (nc == 8) rv = *(const sf_v8*)(a->rr + ow * a->rsw + c0);
          else for (int64_t l = 0; l < nc; ++l) rv[l] = a->rr[ow * a->rsw + c0 + l];
        }
        if (a->rr && !a->res_after_act) o += rv;
        o = sf_act8(o, a->act, a->act_param);
        if (a->rr && a->res_after_act) o += rv;
        if (nc == 8) {
          *(sf_v8*)(a->yr + ow * a->ysw + c0) = o;
        } else {
          for (int64_t l = 0; l < nc; ++l) a->yr[ow * a->ysw + c0 + l] = o[l];
        }
      }
    }
  }
}

#define SF_DW8_ROWWORK(KW_, SW_) \
  static __attribute__((noinline)) void sf_dw8_rowwork_##KW_##_##SW_(const sf_dw8_work* a) { \
    sf_dw8_rowwork(a, KW_, SW_, 1); \
  }
SF_DW8_ROWWORK(3, 1)
SF_DW8_ROWWORK(3, 2)
SF_DW8_ROWWORK(5, 1)
SF_DW8_ROWWORK(5, 2)
SF_DW8_ROWWORK(7, 1)
SF_DW8_ROWWORK(7, 2)
#undef SF_DW8_ROWWORK
static __attribute__((noinline)) void sf_dw8_rowwork_any(const sf_dw8_work* a) {
  sf_dw8_rowwork(a, 1, 1, 0);
}

/* sf_dwconv2d's computation on 8-lane vectors, for CPUs without AVX-512 (where a
 * 16-lane vector is two registers and sf_dwconv2d runs out of them). Work item: one
 * output row × 64 channels. For each 8 channels the kernel rows' input rows are first
 * copied into a per-thread buffer, 8 floats a column, zero-padded left, right and past
 * the row's end to a whole number of 8-pixel tiles — so no tap is bounds-checked and
 * every operand sits at a constant offset; then 8 output pixels at a time take
 * sf_dw8_row per kernel row (specialised for 3/5/7-wide kernels, strides 1 and 2,
 * dilation 1). wp: the weights packed [ceil(C/8)][KH][KW][8], bias [ceil(C/8)·8],
 * zero past C (channels past C compute zeros that are never stored). Returns 0, or
 * −1 when scratch memory ran out. */
int sf_dwconv8(const float* restrict x, int64_t N, int64_t H, int64_t W, int64_t C,
               int64_t xsn, int64_t xsh, int64_t xsw,
               const float* restrict wp, int64_t KH, int64_t KW, const float* restrict bias,
               int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
               float* restrict y, int64_t Ho, int64_t Wo, int64_t ysn, int64_t ysh, int64_t ysw,
               const float* restrict res, int64_t rsn, int64_t rsh, int64_t rsw, int res_after_act,
               int act, float act_param) {
  /* channel chunks of at most 64, as even as multiples of 8 allow (a thread takes
   * whole chunks when there are several: uneven ones would leave a core idle) */
  const int64_t ncb = (C + 63) / 64;
  const int64_t CBLK = ((C + ncb - 1) / ncb + 7) / 8 * 8;
  const int64_t rows = N * Ho;
  const int64_t tiles = (Wo + 7) / 8;
  const int64_t cols = ((tiles * 8 - 1) * sw + (KW - 1) * dw + 1); /* packed columns */
  const int64_t slots = (KH - 1) * dh + 1; /* input rows one output row's taps span */
  void (*rowwork)(const sf_dw8_work*) = sf_dw8_rowwork_any;
  if (dw == 1 && sw == 1 && KW == 3) rowwork = sf_dw8_rowwork_3_1;
  if (dw == 1 && sw == 2 && KW == 3) rowwork = sf_dw8_rowwork_3_2;
  if (dw == 1 && sw == 1 && KW == 5) rowwork = sf_dw8_rowwork_5_1;
  if (dw == 1 && sw == 2 && KW == 5) rowwork = sf_dw8_rowwork_5_2;
  if (dw == 1 && sw == 1 && KW == 7) rowwork = sf_dw8_rowwork_7_1;
  if (dw == 1 && sw == 2 && KW == 7) rowwork = sf_dw8_rowwork_7_2;
  /* Work items: a band of output rows × a channel chunk. One band per thread where
   * there are rows enough: threads that split a pixel's channels write into the same
   * cache lines (a pixel's C floats are not a whole number of lines) and fight over
   * them; small maps split channels too. */
  const int64_t nthr = omp_get_max_threads();
  const int64_t nb = rows >= 8 * nthr ? nthr : (rows / 8 > 1 ? rows / 8 : 1);
  int failed = 0;
#pragma omp parallel
  {
    /* buf[s][slot][j][8]: input row ih of channels cstart + 8s … packed in slot
     * ih mod slots (tag[slot] says which row of which chunk is there), column j
     * holding input column j − pw (zero outside) */
    int64_t* tag;
    float* buf = sf_ring((size_t)(CBLK * slots * cols), slots, &tag);
    if (!buf) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    if (!failed) {
#pragma omp for schedule(static)
      for (int64_t item = 0; item < nb * ncb; ++item) {
        const int64_t cb = item % ncb, band = item / ncb;
        const int64_t r_lo = rows * band / nb, r_hi = rows * (band + 1) / nb;
        for (int64_t r = r_lo; r < r_hi; ++r) { /* rows in order: each input row is packed
                                                    once per chunk */
          const int64_t n = r / Ho, oh = r % Ho;
          const int64_t ih0 = oh * sh - ph;
          const int64_t cstart = cb * CBLK;
          const int64_t cend = cstart + CBLK < C ? cstart + CBLK : C;
          const int64_t nsub = (cend - cstart + 7) / 8;
          const int64_t plane = slots * cols * 8; /* floats per 8-channel sub-block */
          int64_t kh0, kh1;
          sf_ring_fill(x + n * xsn + cstart, xsh, xsw, H, W, pw, cols, cend - cstart, buf,
                       plane, tag, slots, (cb * N + n) * H, ih0, dh, KH, &kh0, &kh1);
          const sf_dw8_work work = {
              buf, plane, cols, slots, tiles, nsub, cstart, cend, KH, KW, sw, dw, kh0, kh1, ih0,
              dh, Wo, wp, bias, y + n * ysn + oh * ysh, ysw, res ? res + n * rsn + oh * rsh : 0,
              rsw, res_after_act, act, act_param};
          rowwork(&work);
        }
      }
    }
  }
  return failed ? -1 : 0;
}


/* The lane sums of eight vectors: out[r] = Σ_l a[r][l]. */
static inline __attribute__((always_inline)) sf_v8 sf_hsum8(const sf_v8* a) {
#ifdef __AVX__
  const __m256 t0 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]);
  const __m256 t1 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
  const __m256 t2 = _mm256_hadd_ps((__m256)a[4], (__m256)a[5]);
  const __m256 t3 = _mm256_hadd_ps((__m256)a[6], (__m256)a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1); /* a0..a3 over lanes 0–3, then over 4–7 */
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return (sf_v8)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                              _mm256_permute2f128_ps(u0, u1, 0x31));
#else
  sf_v8 out;
  for (int r = 0; r < 8; ++r) {
    float t = 0.f;
    for (int l = 0; l < 8; ++l) t += a[r][l];
    out[r] = t;
  }
  return out;
#endif
}

/* One output row of sf_conv_few. */
typedef struct {
  const float* buf; /* packed rows: [sub-block][slot][column][8] */
  int64_t plane, cols, slots, tiles, nsub, KH, KW, kh0, kh1, ih0, K, Wo;
  const float* wp;  /* [K][KH][nsub][KW][8] */
  const float* bias;
  float* yr;
  int64_t ysw;
  int act;
  float act_param;
} sf_few_work;

static inline __attribute__((always_inline)) void sf_few_rowwork(const sf_few_work* a,
                                                                const int KW, const int fast) {
  for (int64_t t = 0; t < a->tiles; ++t) {
    const int64_t np = a->Wo - t * 8 < 8 ? a->Wo - t * 8 : 8;
    for (int64_t o = 0; o < a->K; ++o) {
      sf_v8 acc[8] = {{0}};
      for (int64_t kh = a->kh0; kh < a->kh1; ++kh) {
        const float* b = a->buf + ((a->ih0 + kh) % a->slots) * a->cols * 8 + t * 64;
        const float* wk = a->wp + ((o * a->KH + kh) * a->nsub) * a->KW * 8;
        for (int64_t q = 0; q < a->nsub; ++q) {
          if (fast) sf_dw8_row(b + q * a->plane, wk + q * KW * 8, KW, 1, 1, acc);
          else sf_dw8_row_any(b + q * a->plane, wk + q * a->KW * 8, a->KW, 1, 1, acc);
        }
      }
      sf_v8 v = sf_hsum8(acc) + (a->bias ? a->bias[o] : 0.f);
      v = sf_act8(v, a->act, a->act_param);
      float* yp = a->yr + t * 8 * a->ysw + o;
      if (np == 8 && a->ysw == 1) {
        *(sf_v8*)yp = v;
      } else {
        for (int64_t r = 0; r < np; ++r) yp[r * a->ysw] = v[r];
      }
    }
  }
}

#define SF_FEW_ROWWORK(KW_) \
  static __attribute__((noinline)) void sf_few_rowwork_##KW_(const sf_few_work* a) { \
    sf_few_rowwork(a, KW_, 1); \
  }
SF_FEW_ROWWORK(1)
SF_FEW_ROWWORK(3)
SF_FEW_ROWWORK(5)
SF_FEW_ROWWORK(7)
#undef SF_FEW_ROWWORK
static __attribute__((noinline)) void sf_few_rowwork_any(const sf_few_work* a) {
  sf_few_rowwork(a, 1, 0);
}

/* A dense KH×KW convolution, stride 1, dilation 1, with few output channels (a class
 * head's 1–4): y[n, oh, ow, o] = act(bias[o] + Σ_{kh,kw,c} w[o][kh][c][kw] ·
 * x[n, oh − ph + kh, ow − pw + kw, c]). oneDNN computes a whole vector of output
 * channels (8 on AVX2) however few there are; here the vectors run over input channels
 * instead: the input rows are packed as for sf_dwconv8 (every channel, 8 a column,
 * zero-padded, in a per-thread ring), 8 output pixels accumulate 8 lanes each, and one
 * horizontal sum gives the 8 outputs. wp: [K][KH][ceil(C/8)][KW][8], zero past C.
 * Work item: a band of output rows (one per thread). Returns 0, or −1 when scratch
 * memory ran out. */
int sf_conv_few(const float* restrict x, int64_t N, int64_t H, int64_t W, int64_t C,
                int64_t xsn, int64_t xsh, int64_t xsw,
                const float* restrict wp, int64_t KH, int64_t KW, int64_t K,
                const float* restrict bias, int64_t ph, int64_t pw,
                float* restrict y, int64_t Ho, int64_t Wo, int64_t ysn, int64_t ysh, int64_t ysw,
                int act, float act_param) {
  const int64_t rows = N * Ho;
  const int64_t tiles = (Wo + 7) / 8;
  const int64_t cols = tiles * 8 + KW - 1;
  const int64_t slots = KH;
  const int64_t nsub = (C + 7) / 8;
  const int64_t plane = slots * cols * 8;
  void (*rowwork)(const sf_few_work*) = sf_few_rowwork_any;
  if (KW == 1) rowwork = sf_few_rowwork_1;
  if (KW == 3) rowwork = sf_few_rowwork_3;
  if (KW == 5) rowwork = sf_few_rowwork_5;
  if (KW == 7) rowwork = sf_few_rowwork_7;
  const int64_t nthr = omp_get_max_threads();
  const int64_t nb = rows < nthr ? rows : nthr;
  int failed = 0;
#pragma omp parallel
  {
    int64_t* tag;
    float* buf = sf_ring((size_t)(nsub * plane), slots, &tag);
    if (!buf) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    if (!failed) {
#pragma omp for schedule(static)
      for (int64_t band = 0; band < nb; ++band) {
        for (int64_t r = rows * band / nb; r < rows * (band + 1) / nb; ++r) {
          const int64_t n = r / Ho, oh = r % Ho;
          const int64_t ih0 = oh - ph;
          int64_t kh0, kh1;
          sf_ring_fill(x + n * xsn, xsh, xsw, H, W, pw, cols, C, buf, plane, tag, slots, n * H,
                       ih0, 1, KH, &kh0, &kh1);
          const sf_few_work work = {buf, plane, cols, slots, tiles, nsub, KH, KW, kh0, kh1, ih0,
                                    K, Wo, wp, bias, y + n * ysn + oh * ysh, ysw, act,
                                    act_param};
          rowwork(&work);
        }
      }
    }
  }
  return failed ? -1 : 0;
}

/* Winograd F(4×4, 3×3), Lavin & Gray's points 0, ±1, ±2, ∞.
 * Tiles are numbered over tile rows r = n*nth + th in [r0, r1), then tile columns:
 * t = (r - r0)*ntw + tw. Tile (th, tw) reads input rows 4*th - ph + i and columns
 * 4*tw - pw + j, i, j in 0..5 (zero outside the image).
 * V[xi][t][c_off + c], xi = 6a + b, holds (Bᵀ d B)[a][b] for channel c; row length Ctot.
 * One work item: one tile × one register of channels (16 lanes with AVX-512, 8 on
 * AVX2), all in vector registers. */

/* Bᵀ applied to six vectors (one column or row of a tile). */
#define SF_BT(o, d0, d1, d2, d3, d4, d5)                     \
  do {                                                       \
    o[0] = 4.f * d0 - 5.f * d2 + d4;                         \
    o[1] = -4.f * d1 - 4.f * d2 + d3 + d4;                   \
    o[2] = 4.f * d1 - 4.f * d2 - d3 + d4;                    \
    o[3] = -2.f * d1 - d2 + 2.f * d3 + d4;                   \
    o[4] = 2.f * d1 - d2 - 2.f * d3 + d4;                    \
    o[5] = 4.f * d1 - 5.f * d3 + d5;                         \
  } while (0)

/* Aᵀ applied to six vectors. */
#define SF_AT(o, m0, m1, m2, m3, m4, m5)                     \
  do {                                                       \
    o[0] = m0 + m1 + m2 + m3 + m4;                           \
    o[1] = m1 - m2 + 2.f * m3 - 2.f * m4;                    \
    o[2] = m1 + m2 + 4.f * m3 + 4.f * m4;                    \
    o[3] = m1 - m2 + 8.f * m3 - 8.f * m4 + m5;               \
  } while (0)

/* The first n ≤ 16 lanes (the rest of a load are zeros): masked loads and stores
 * where AVX-512 is there. */
static inline __attribute__((always_inline)) sf_v16 sf_load(const float* p, int n) {
  if (n == 16) return *(const sf_v16*)p;
#ifdef __AVX512F__
  return (sf_v16)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
#else
  sf_v16 v = {0};
  for (int c = 0; c < n; ++c) v[c] = p[c];
  return v;
#endif
}

static inline __attribute__((always_inline)) void sf_store(float* p, sf_v16 v, int n) {
  if (n == 16) {
    *(sf_v16*)p = v;
  } else {
#ifdef __AVX512F__
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), (__m512)v);
#else
    for (int c = 0; c < n; ++c) p[c] = v[c];
#endif
  }
}

/* One register of fp32 lanes: 16 with AVX-512, 8 without (AVX2). Kernels whose
 * work is a few vectors at a time (the Winograd transforms, the SE gate) use it: on AVX2
 * a 16-lane vector is two registers, a tile of them spills, and GCC lowers some of its
 * unaligned loads through memcpy (measured on the AVX2 EPYC: the SE gate 2.5–5×
 * slower than PyTorch's composite; the Winograd transforms ~45–70 % of a layer). */
#ifdef __AVX512F__
typedef sf_v16 sf_vn;
typedef sf_i16 sf_in;
#define SF_NL 16
#define sf_load_n sf_load
#define sf_store_n sf_store
#define sf_act_n sf_act_v
#else
typedef sf_v8 sf_vn;
typedef sf_i8 sf_in;
#define SF_NL 8
#define sf_load_n sf_load8
#define sf_store_n sf_store8
#define sf_act_n sf_act8
#endif

/* The fp32 lanes of one register in this build (SF_NL): the width kernels that pad
 * channels to whole vectors (sf_invres) want their callers to pad to. */
int sf_lanes(void) { return SF_NL; }

/* bf16 <-> fp32 where a kernel reads or writes bf16 and computes in fp32: a bf16 is
 * the top half of an fp32; stores round to nearest even, NaN stays a quiet NaN. */
typedef uint16_t sf_h16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t sf_u32v __attribute__((vector_size(64), aligned(4)));

static inline float sf_bf16_load(const uint16_t* p) {
  union { uint32_t u; float f; } v;
  v.u = (uint32_t)(*p) << 16;
  return v.f;
}

static inline uint16_t sf_bf16_round(float f) {
  union { uint32_t u; float f; } v;
  v.f = f;
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u); /* quiet NaN */
  return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

static inline sf_v16 sf_bf16_load16(const uint16_t* p) {
  return (sf_v16)(__builtin_convertvector(*(const sf_h16*)p, sf_u32v) << 16);
}

static inline void sf_bf16_store16(uint16_t* p, sf_v16 v) {
  const sf_u32v u = (sf_u32v)v;
  const sf_u32v rne = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const sf_u32v nan = (sf_u32v)((u & 0x7fffffffu) > 0x7f800000u);
  const sf_u32v r = (rne & ~nan) | (((u >> 16) | 0x40u) & nan);
  *(sf_h16*)p = __builtin_convertvector(r, sf_h16);
}

/* n ≤ 16 lanes at element offset off of an fp32 tensor, or a bf16 one when bf16 is
 * set (a constant after inlining: no branch is left in the loops). */
static inline __attribute__((always_inline)) sf_v16 sf_load_any(const void* p, int bf16,
                                                               int64_t off, int n) {
  if (!bf16) return sf_load((const float*)p + off, n);
  if (n == 16) return sf_bf16_load16((const uint16_t*)p + off);
  sf_v16 v = {0};
  for (int c = 0; c < n; ++c) v[c] = sf_bf16_load((const uint16_t*)p + off + c);
  return v;
}

static inline __attribute__((always_inline)) void sf_store_any(void* p, int bf16, int64_t off,
                                                              sf_v16 v, int n) {
  if (!bf16) {
    sf_store((float*)p + off, v, n);
  } else if (n == 16) {
    sf_bf16_store16((uint16_t*)p + off, v);
  } else {
    for (int c = 0; c < n; ++c) ((uint16_t*)p)[off + c] = sf_bf16_round(v[c]);
  }
}

void sf_wino_in(const float* restrict x, int64_t N, int64_t H, int64_t W, int64_t C,
                int64_t xsn, int64_t xsh, int64_t xsw, int64_t c_off, int64_t Ctot,
                int64_t ph, int64_t pw, int64_t nth, int64_t ntw, int64_t r0, int64_t r1,
                float* restrict V) {
  const int64_t T = (r1 - r0) * ntw;
  const int64_t ncb = (C + SF_NL - 1) / SF_NL;
  (void)N;
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < T * ncb; ++job) {
    const int64_t t = job / ncb, cb = job % ncb;
    const int64_t gr = r0 + t / ntw, tw = t % ntw, n = gr / nth, th = gr % nth;
    const int64_t c0 = cb * SF_NL;
    const int cn = (int)((C - c0) < SF_NL ? (C - c0) : SF_NL);
    const sf_vn zero = {0};
    sf_vn d[6][6];
    for (int i = 0; i < 6; ++i) {
      const int64_t yy = th * 4 - ph + i;
      for (int j = 0; j < 6; ++j) {
        const int64_t xx = tw * 4 - pw + j;
        d[i][j] = (yy < 0 || yy >= H || xx < 0 || xx >= W)
                      ? zero
                      : sf_load_n(x + n * xsn + yy * xsh + xx * xsw + c0, cn);
      }
    }
    sf_vn s[6][6]; /* s = Bᵀ d, column by column */
    for (int j = 0; j < 6; ++j) {
      sf_vn o[6];
      SF_BT(o, d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j]);
      for (int a = 0; a < 6; ++a) s[a][j] = o[a];
    }
    for (int a = 0; a < 6; ++a) { /* (s B) row by row, stored per xi */
      sf_vn o[6];
      SF_BT(o, s[a][0], s[a][1], s[a][2], s[a][3], s[a][4], s[a][5]);
      for (int b = 0; b < 6; ++b)
        sf_store_n(V + ((int64_t)(a * 6 + b) * T + t) * Ctot + c_off + c0, o[b], cn);
    }
  }
}

/* y = act(Aᵀ M A + bias (+ res)): M[xi][t][k] for the tiles of rows [r0, r1);
 * outputs past Ho/Wo (the last tile row/column of odd sizes) are not written. */
void sf_wino_out(const float* restrict M, int64_t N, int64_t Ho, int64_t Wo, int64_t K,
                 int64_t nth, int64_t ntw, int64_t r0, int64_t r1, const float* restrict bias,
                 const float* restrict res, int64_t rsn, int64_t rsh, int64_t rsw, int res_after_act,
                 int act, float act_param,
                 float* restrict y, int64_t ysn, int64_t ysh, int64_t ysw) {
  const int64_t T = (r1 - r0) * ntw;
  const int64_t ncb = (K + SF_NL - 1) / SF_NL;
  (void)N;
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < T * ncb; ++job) {
    const int64_t t = job / ncb, cb = job % ncb;
    const int64_t gr = r0 + t / ntw, tw = t % ntw, n = gr / nth, th = gr % nth;
    const int64_t k0 = cb * SF_NL;
    const int kn = (int)((K - k0) < SF_NL ? (K - k0) : SF_NL);
    sf_vn s[4][6]; /* s = Aᵀ m, column by column */
    for (int b = 0; b < 6; ++b) {
      sf_vn m[6], o[4];
      for (int a = 0; a < 6; ++a) m[a] = sf_load_n(M + ((int64_t)(a * 6 + b) * T + t) * K + k0, kn);
      SF_AT(o, m[0], m[1], m[2], m[3], m[4], m[5]);
      for (int p = 0; p < 4; ++p) s[p][b] = o[p];
    }
    const sf_vn bb = bias ? sf_load_n(bias + k0, kn) : (sf_vn){0};
    for (int p = 0; p < 4; ++p) {
      const int64_t yy = th * 4 + p;
      if (yy >= Ho) break;
      sf_vn o[4]; /* (s A) row by row */
      SF_AT(o, s[p][0], s[p][1], s[p][2], s[p][3], s[p][4], s[p][5]);
      for (int q = 0; q < 4; ++q) {
        const int64_t xx = tw * 4 + q;
        if (xx >= Wo) break;
        sf_vn v = o[q] + bb;
        if (res && !res_after_act) v += sf_load_n(res + n * rsn + yy * rsh + xx * rsw + k0, kn);
        v = sf_act_n(v, act, act_param);
        if (res && res_after_act) v += sf_load_n(res + n * rsn + yy * rsh + xx * rsw + k0, kn);
        sf_store_n(y + n * ysn + yy * ysh + xx * ysw + k0, v, kn);
      }
    }
  }
}

/* ATen's linear source index for output index d (fp32, as upsample_bilinear2d computes). */
static inline void sf_linear_index(int64_t d, int64_t in, int64_t out, float scale, int align,
                                   int64_t* i0, int64_t* i1, float* l1) {
  if (in == out) { /* ATen's CPU kernel copies a dimension of equal size */
    *i0 = *i1 = d;
    *l1 = 0.f;
    return;
  }
  float src = align ? scale * (float)d : scale * ((float)d + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  int64_t a = (int64_t)src;
  if (a > in - 1) a = in - 1;
  *i0 = a;
  *i1 = a + (a < in - 1 ? 1 : 0);
  float l = src - (float)a;
  *l1 = l < 0.f ? 0.f : (l > 1.f ? 1.f : l);
}

/* Source columns and weights per output column, for one resize along W (built once
 * per call by the calling thread, read by all). */
typedef struct {
  int32_t *i0, *i1; /* source columns per output column */
  float* l1;        /* weight of i1 */
} sf_columns;

static int sf_columns_make(int64_t Wx, int64_t W, float scale_w, int align, sf_columns* t) {
  t->i0 = (int32_t*)sf_scratch(SF_SLOT_TABLE0, (size_t)W * sizeof(int32_t));
  t->i1 = (int32_t*)sf_scratch(SF_SLOT_TABLE1, (size_t)W * sizeof(int32_t));
  t->l1 = (float*)sf_scratch(SF_SLOT_TABLE2, (size_t)W * sizeof(float));
  if (!t->i0 || !t->i1 || !t->l1) return 1;
  for (int64_t w = 0; w < W; ++w) {
    int64_t a, b;
    sf_linear_index(w, Wx, W, scale_w, align, &a, &b, t->l1 + w);
    t->i0[w] = (int32_t)a;
    t->i1[w] = (int32_t)b;
  }
  return 0;
}


/* ---------------------------------------------------------------------------------
 * Depthwise convolution of a bilinear upsample, the upsample computed band by band:
 *   e = bilinear resize of x (Hx×Wx → H×W), ATen's index arithmetic (source =
 *       scale·(d + ½) − ½ clamped at 0, or scale·d with align_corners; a dimension
 *       of equal size is copied)
 *   y = act(b + sum_taps wd · e) with zero padding around e's H×W.
 * One work item: one band of output rows × one block of 64 channels; the rows of e
 * it reads live in a per-thread scratch buffer, so e is never written as a whole
 * (DeepLab v3+'s decoder: 256 channels upsampled ×4 to 128×128, 16 MB).
 * Weights come prepacked per 64-channel block, zero-padded: wdp[cb][KH·KW][64],
 * bp[cb][64]. Returns 0, or 1 when a thread's scratch buffer could not be
 * allocated (y is then incomplete and the caller raises).
 * ------------------------------------------------------------------------------- */
static void sf_produce_resize(const float* x, int64_t xsn, int64_t xsh, int64_t xsw, int64_t Hx,
                              int64_t c0, int cn, int64_t n, int64_t r, int64_t H, int64_t W,
                              float scale_h, int align, const sf_columns* cols,
                              float* row /* [W][64] */) {
  int64_t h0, h1;
  float lh;
  sf_linear_index(r, Hx, H, scale_h, align, &h0, &h1, &lh);
  const float lh0 = 1.f - lh;
  const float* r0 = x + n * xsn + h0 * xsh + c0;
  const float* r1 = x + n * xsn + h1 * xsh + c0;
  for (int64_t w = 0; w < W; ++w) {
    const int64_t w0 = cols->i0[w], w1 = cols->i1[w];
    const float lw = cols->l1[w], lw0 = 1.f - lw;
    for (int v = 0; v < 4; ++v) {
      const int m = cn - 16 * v;
      sf_v16 e = {0};
      if (m > 0) {
        const int k = m < 16 ? m : 16;
        const sf_v16 a = sf_load(r0 + w0 * xsw + 16 * v, k), b = sf_load(r0 + w1 * xsw + 16 * v, k);
        const sf_v16 c = sf_load(r1 + w0 * xsw + 16 * v, k), d = sf_load(r1 + w1 * xsw + 16 * v, k);
        e = lh0 * (lw0 * a + lw * b) + lh * (lw0 * c + lw * d);
      }
      *(sf_v16*)(row + w * 64 + 16 * v) = e;
    }
  }
}

int sf_resize_dw(const float* restrict x, int64_t N, int64_t Hx, int64_t Wx,
                 int64_t xsn, int64_t xsh, int64_t xsw, int64_t H, int64_t W, int64_t C,
                 float scale_h, float scale_w, int align_corners,
                 const float* restrict wdp, const float* restrict b2p, int64_t KH, int64_t KW,
                 int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                 int act2, float act2_param,
                 float* restrict y, int64_t Ho, int64_t Wo, int64_t ysn, int64_t ysh, int64_t ysw,
                 int64_t band_rows) {
  const int64_t ncb = (C + 63) / 64;
  const int64_t nbands = (Ho + band_rows - 1) / band_rows;
  const int64_t rows_max = (band_rows - 1) * sh + (KH - 1) * dh + 1;
  const int64_t jobs = N * nbands * ncb;
  sf_columns cols;
  int failed = sf_columns_make(Wx, W, scale_w, align_corners, &cols);
  if (failed) return failed;
#pragma omp parallel
  {
    float* scratch = (float*)sf_scratch(SF_SLOT_BAND, (size_t)(rows_max * W * 64) * sizeof(float));
    if (!scratch) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t job = 0; job < jobs; ++job) {
      if (!scratch) continue;
      const int64_t cb = job % ncb, nb = job / ncb;
      const int64_t n = nb / nbands, band = nb % nbands;
      const int64_t c0 = cb * 64;
      const int cn = (int)((C - c0) < 64 ? (C - c0) : 64);
      const int64_t oh0 = band * band_rows;
      const int64_t oh1 = (oh0 + band_rows) < Ho ? (oh0 + band_rows) : Ho;
      const int64_t ih_lo = oh0 * sh - ph;
      const int64_t ih_hi = (oh1 - 1) * sh - ph + (KH - 1) * dh;
      const int64_t r_lo = ih_lo > 0 ? ih_lo : 0;
      const int64_t r_hi = ih_hi < H - 1 ? ih_hi : H - 1;
      for (int64_t r = r_lo; r <= r_hi; ++r) {
        sf_produce_resize(x, xsn, xsh, xsw, Hx, c0, cn, n, r, H, W, scale_h, align_corners,
                          &cols, scratch + (r - ih_lo) * W * 64);
      }
      const float* wd = wdp + cb * KH * KW * 64;
      const sf_v16 bz0 = *(const sf_v16*)(b2p + cb * 64), bz1 = *(const sf_v16*)(b2p + cb * 64 + 16);
      const sf_v16 bz2 = *(const sf_v16*)(b2p + cb * 64 + 32), bz3 = *(const sf_v16*)(b2p + cb * 64 + 48);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        for (int64_t ow = 0; ow < Wo; ++ow) {
          sf_v16 a0 = bz0, a1 = bz1, a2 = bz2, a3 = bz3;
          for (int64_t kh = 0; kh < KH; ++kh) {
            const int64_t ih = oh * sh - ph + kh * dh;
            if (ih < 0 || ih >= H) continue;
            const float* srow = scratch + (ih - ih_lo) * W * 64;
            for (int64_t kw = 0; kw < KW; ++kw) {
              const int64_t iw = ow * sw - pw + kw * dw;
              if (iw < 0 || iw >= W) continue;
              const float* e = srow + iw * 64;
              const float* wt = wd + (kh * KW + kw) * 64;
              a0 += *(const sf_v16*)(wt) * *(const sf_v16*)(e);
              a1 += *(const sf_v16*)(wt + 16) * *(const sf_v16*)(e + 16);
              a2 += *(const sf_v16*)(wt + 32) * *(const sf_v16*)(e + 32);
              a3 += *(const sf_v16*)(wt + 48) * *(const sf_v16*)(e + 48);
            }
          }
          float* yp = y + n * ysn + oh * ysh + ow * ysw + c0;
          const sf_v16 o[4] = {sf_act_v(a0, act2, act2_param), sf_act_v(a1, act2, act2_param),
                               sf_act_v(a2, act2, act2_param), sf_act_v(a3, act2, act2_param)};
          for (int v = 0; v < 4; ++v) {
            const int m = cn - 16 * v;
            if (m <= 0) break;
            sf_store(yp + 16 * v, o[v], m < 16 ? m : 16);
          }
        }
      }
    }
  }
  return failed;
}

/* ---------------------------------------------------------------------------------
 * Bilinear resize of NHWC logits at the end of a network (ATen's index arithmetic,
 * as sf_linear_index), two ways out:
 *   sf_resize_nchw    the resized logits, written NCHW (one contiguous output row
 *                     per channel: the layout callers read logits in);
 *   sf_resize_argmax  the argmax over channels of the resized logits (torch's
 *                     semantics: the first maximum; the caller routes logits with
 *                     NaN elsewhere), written as a mask, without the full-resolution
 *                     logits.
 * x and y may be fp32 or bf16 (computed in fp32, bf16 stored round-to-nearest-even).
 * Separable: a source row is first resized along W into R[c][w] (channel-major, fp32),
 * once per thread and source row (a ×4 upsample reuses it for 4 output rows); each
 * output row then blends two such rows with contiguous vector loads. No vector
 * gathers: on Zen 4 a gather-based version took 3× longer.
 * Work item: one output row of one image. Return 0, or 1 when a buffer could not
 * be allocated.
 * ------------------------------------------------------------------------------- */

/* R[c][w] = source row h of image n resized along W; tmp holds [W][C]. Scalar
 * transposition (no vector gathers, which are slow on Zen 4). */
__attribute__((optimize("no-tree-vectorize"))) static void sf_transpose(const float* tmp,
                                                                          int64_t W, int64_t C,
                                                                          float* R) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t w = 0; w < W; ++w) R[c * W + w] = tmp[w * C + c];
}

static void sf_resize_row_w(const void* x, int x_bf16, int64_t base, int64_t xsw, int64_t C,
                            int64_t W, const sf_columns* cols, float* tmp, float* R) {
  for (int64_t w = 0; w < W; ++w) {
    const float l = cols->l1[w], l0 = 1.f - l;
    const int64_t a = base + cols->i0[w] * xsw, b = base + cols->i1[w] * xsw;
    float* dst = tmp + w * C;
    if (x_bf16) {
      const uint16_t* pa = (const uint16_t*)x + a;
      const uint16_t* pb = (const uint16_t*)x + b;
      for (int64_t c = 0; c < C; ++c) dst[c] = l0 * sf_bf16_load(pa + c) + l * sf_bf16_load(pb + c);
    } else {
      const float* pa = (const float*)x + a;
      const float* pb = (const float*)x + b;
      for (int64_t c = 0; c < C; ++c) dst[c] = l0 * pa[c] + l * pb[c];
    }
  }
  sf_transpose(tmp, W, C, R);
}

/* Per-thread cache of two resized source rows. */
typedef struct {
  float *tmp, *rows[2];
  int64_t key[2]; /* n * Hx + h, or -1 */
} sf_rowcache;

static int sf_rowcache_make(int64_t W, int64_t C, sf_rowcache* rc) {
  float* base = (float*)sf_scratch(SF_SLOT_ROWS, (size_t)(3 * W * C + 32) * sizeof(float));
  rc->tmp = base;
  rc->rows[0] = base ? base + W * C : 0;
  rc->rows[1] = base ? base + 2 * W * C + 16 : 0;
  rc->key[0] = rc->key[1] = -1;
  return !rc->tmp || !rc->rows[0] || !rc->rows[1];
}


/* The resized rows for source rows h0 and h1 of image n (computing what is missing). */
static void sf_rowcache_get(sf_rowcache* rc, const void* x, int x_bf16, int64_t xsn, int64_t xsh,
                            int64_t xsw, int64_t n, int64_t Hx, int64_t h0, int64_t h1, int64_t C,
                            int64_t W, const sf_columns* cols, const float** r0, const float** r1) {
  const int64_t k0 = n * Hx + h0, k1 = n * Hx + h1;
  int s0 = rc->key[0] == k0 ? 0 : (rc->key[1] == k0 ? 1 : -1);
  if (s0 < 0) {
    s0 = rc->key[0] == k1 ? 1 : 0; /* keep the slot that holds h1, if any */
    sf_resize_row_w(x, x_bf16, n * xsn + h0 * xsh, xsw, C, W, cols, rc->tmp, rc->rows[s0]);
    rc->key[s0] = k0;
  }
  int s1 = rc->key[0] == k1 ? 0 : (rc->key[1] == k1 ? 1 : -1);
  if (s1 < 0) {
    s1 = 1 - s0;
    sf_resize_row_w(x, x_bf16, n * xsn + h1 * xsh, xsw, C, W, cols, rc->tmp, rc->rows[s1]);
    rc->key[s1] = k1;
  }
  *r0 = rc->rows[s0];
  *r1 = rc->rows[s1];
}

/* What one output row does with its two resized source rows r0, r1 (channel-major,
 * W wide) and the vertical weights: write logits, or an argmax mask. */
typedef struct {
  void* y;
  int kind; /* sf_resize_nchw: 0 fp32, 1 bf16; sf_resize_argmax: 0 uint8, 1 int32, 2 int64 */
  int64_t C, H, W;
} sf_rowout;

typedef void (*sf_row_fn)(const sf_rowout* o, int64_t n, int64_t oh, const float* r0,
                          const float* r1, float lh0, float lh);

static void sf_row_logits(const sf_rowout* o, int64_t n, int64_t oh, const float* r0,
                          const float* r1, float lh0, float lh) {
  const int64_t C = o->C, H = o->H, W = o->W;
  for (int64_t c = 0; c < C; ++c) {
    const float* restrict a = r0 + c * W;
    const float* restrict b = r1 + c * W;
    const int64_t off = ((n * C + c) * H + oh) * W;
    if (o->kind == 1) {
      uint16_t* restrict dst = (uint16_t*)o->y + off;
      for (int64_t w = 0; w < W; ++w) dst[w] = sf_bf16_round(lh0 * a[w] + lh * b[w]);
    } else {
      float* restrict dst = (float*)o->y + off;
      for (int64_t w = 0; w < W; ++w) dst[w] = lh0 * a[w] + lh * b[w];
    }
  }
}

static void sf_row_argmax(const sf_rowout* o, int64_t n, int64_t oh, const float* r0,
                          const float* r1, float lh0, float lh) {
  const int64_t C = o->C, H = o->H, W = o->W;
  for (int64_t w0 = 0; w0 < W; w0 += SF_NL) { /* a register of pixels, channels in turn */
    const int m = (W - w0) < SF_NL ? (int)(W - w0) : SF_NL;
    sf_vn best = lh0 * *(const sf_vn*)(r0 + w0) + lh * *(const sf_vn*)(r1 + w0);
    sf_in arg = {0};
    for (int64_t c = 1; c < C; ++c) { /* reads up to 15 past a row: allocated slack */
      const sf_vn t = lh0 * *(const sf_vn*)(r0 + c * W + w0) +
                      lh * *(const sf_vn*)(r1 + c * W + w0);
      const sf_in gt = t > best;
      best = (sf_vn)(((sf_in)t & gt) | ((sf_in)best & ~gt));
      arg = (arg & ~gt) | (((sf_in){0} + (int32_t)c) & gt);
    }
    const int64_t at = (n * H + oh) * W + w0;
    for (int j = 0; j < m; ++j) {
      if (o->kind == 0)
        ((uint8_t*)o->y)[at + j] = (uint8_t)arg[j];
      else if (o->kind == 1)
        ((int32_t*)o->y)[at + j] = arg[j];
      else
        ((int64_t*)o->y)[at + j] = arg[j];
    }
  }
}

/* The shared driver: output rows in parallel, each with its resized source rows. */
static int sf_resize_rows(const void* x, int x_bf16, int64_t N, int64_t Hx, int64_t Wx, int64_t C,
                          int64_t xsn, int64_t xsh, int64_t xsw, int64_t H, int64_t W,
                          float scale_h, float scale_w, int align, sf_row_fn emit,
                          const sf_rowout* out) {
  sf_columns cols;
  int failed = sf_columns_make(Wx, W, scale_w, align, &cols);
  if (!failed) {
#pragma omp parallel
    {
      sf_rowcache rc;
      const int bad = sf_rowcache_make(W, C, &rc);
      if (bad) {
#pragma omp atomic write
        failed = 1;
      }
#pragma omp for schedule(static)
      for (int64_t r = 0; r < N * H; ++r) {
        if (bad) continue;
        const int64_t n = r / H, oh = r % H;
        int64_t h0, h1;
        float lh;
        sf_linear_index(oh, Hx, H, scale_h, align, &h0, &h1, &lh);
        const float *r0, *r1;
        sf_rowcache_get(&rc, x, x_bf16, xsn, xsh, xsw, n, Hx, h0, h1, C, W, &cols, &r0, &r1);
        emit(out, n, oh, r0, r1, 1.f - lh, lh);
      }
    }
  }
  return failed;
}

int sf_resize_nchw(const void* restrict x, int x_bf16, int64_t N, int64_t Hx, int64_t Wx,
                   int64_t C, int64_t xsn, int64_t xsh, int64_t xsw, void* restrict y, int y_bf16,
                   int64_t H, int64_t W, float scale_h, float scale_w, int align) {
  const sf_rowout out = {y, y_bf16, C, H, W};
  return sf_resize_rows(x, x_bf16, N, Hx, Wx, C, xsn, xsh, xsw, H, W, scale_h, scale_w, align,
                        sf_row_logits, &out);
}

/* Bilinear resize straight to uint8: y[n, oh, ow, c] = clamp(round_half_even(v / qscale),
 * −128, 127) + qzp (qzp 0: negative values clamp to 0), v the fp32 resize as ATen's
 * channels-last kernel computes it — h0λ·(w0λ·x00 + w1λ·x01) + h1λ·(w0λ·x10 + w1λ·x11),
 * ATen's source indices — i.e. sf_quantize_u8 of PyTorch's resize, never written in
 * fp32. x fp32 NHWC (channels contiguous, strides xsn, xsh, xsw), y uint8 NHWC (ysn,
 * ysh, ysw: a channel slice of a larger buffer is fine). Output rows in parallel, 16
 * channels on a vector. Rounding: adding and subtracting 1.5·2^23 rounds to nearest
 * even (default rounding mode) for |q| < 2^22; larger |q| clamp either way. */
int sf_resize_q8(const float* restrict x, int64_t N, int64_t Hx, int64_t Wx, int64_t C,
                 int64_t xsn, int64_t xsh, int64_t xsw, uint8_t* restrict y, int64_t ysn,
                 int64_t ysh, int64_t ysw, float qscale, int qzp, int64_t H, int64_t W,
                 float scale_h, float scale_w, int align) {
  sf_columns cols;
  if (sf_columns_make(Wx, W, scale_w, align, &cols)) return 1;
  const float lo = qzp == 0 ? 0.f : -128.f, z = (float)qzp, magic = 12582912.f;
  const sf_v16 vlo = (sf_v16){0.f} + lo, vhi = (sf_v16){0.f} + 127.f;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < N * H; ++r) {
    const int64_t n = r / H, oh = r % H;
    int64_t h0, h1;
    float lh;
    sf_linear_index(oh, Hx, H, scale_h, align, &h0, &h1, &lh);
    const float lh0 = 1.f - lh;
    const float* x0 = x + n * xsn + h0 * xsh;
    const float* x1 = x + n * xsn + h1 * xsh;
    uint8_t* restrict yr = y + n * ysn + oh * ysh;
    for (int64_t ow = 0; ow < W; ++ow) {
      const int64_t a = cols.i0[ow] * xsw, b = cols.i1[ow] * xsw;
      const float lw = cols.l1[ow], lw0 = 1.f - lw;
      uint8_t* restrict dst = yr + ow * ysw;
      int64_t c = 0;
      for (; c + 16 <= C; c += 16) {
        const sf_v16 t0 = lw0 * *(const sf_v16*)(x0 + a + c) + lw * *(const sf_v16*)(x0 + b + c);
        const sf_v16 t1 = lw0 * *(const sf_v16*)(x1 + a + c) + lw * *(const sf_v16*)(x1 + b + c);
        sf_v16 q = (lh0 * t0 + lh * t1) / qscale;
        q = (q + magic) - magic;
        q = sf_select(q < vlo, vlo, q);
        q = sf_select(q > vhi, vhi, q);
        const sf_i16 qi = __builtin_convertvector(q + z, sf_i16);
        for (int j = 0; j < 16; ++j) dst[c + j] = (uint8_t)qi[j];
      }
      for (; c < C; ++c) {
        const float t0 = lw0 * x0[a + c] + lw * x0[b + c];
        const float t1 = lw0 * x1[a + c] + lw * x1[b + c];
        float q = nearbyintf((lh0 * t0 + lh * t1) / qscale);
        q = q < lo ? lo : (q > 127.f ? 127.f : q);
        dst[c] = (uint8_t)(int32_t)(q + z);
      }
    }
  }
  return 0;
}

/* out_kind: 0 uint8, 1 int32, 2 int64 mask [N, H, W] contiguous. */
int sf_resize_argmax(const void* restrict x, int x_bf16, int64_t N, int64_t Hx, int64_t Wx,
                     int64_t C, int64_t xsn, int64_t xsh, int64_t xsw, void* restrict y,
                     int out_kind, int64_t H, int64_t W, float scale_h, float scale_w, int align) {
  const sf_rowout out = {y, out_kind, C, H, W};
  return sf_resize_rows(x, x_bf16, N, Hx, Wx, C, xsn, xsh, xsw, H, W, scale_h, scale_w, align,
                        sf_row_argmax, &out);
}

/* ---------------------------------------------------------------------------------
 * pointwise(depthwise(bilinear_upsample(a))) with the channel mixing done at the
 * low resolution. The depthwise taps t (KH·KW of them, stride 1) and the 1×1
 * conv W fold into per-tap matrices W_t = W·diag(w_t), and a 1×1 conv commutes
 * with shifts and with the resize, so
 *     y[p] = bias + sum_t up(Z_t)[p + off_t]      with  Z_t = W_t · a  (low resolution)
 * (zero where p + off_t leaves the H×W map, as the depthwise conv's padding).
 * The caller computes Z = [W_1; …; W_T] · a with one GEMM; this kernel does the
 * sum, 4 bilinear corners per tap, 64 output channels per work item.
 * Z: [N, h, w, T·K] (channel t·K + k), NHWC strides zsn, zsh, zsw.
 * ------------------------------------------------------------------------------- */
static inline __attribute__((always_inline)) int sf_up_taps_t(
    const void* restrict Z, int64_t N, int64_t h, int64_t w, int64_t zsn, int64_t zsh,
    int64_t zsw, int64_t K, int64_t KH, int64_t KW, int64_t ph, int64_t pw, int64_t dh,
    int64_t dw, int64_t H, int64_t W, float scale_h, float scale_w, int align,
    const float* restrict bias, int act, float act_param, void* restrict y, int64_t ysn,
    int64_t ysh, int64_t ysw, const float* restrict B, int64_t Cb, int64_t bsn, int64_t bsh,
    int64_t bsw, const float* restrict Wb, const int bf16) {
  /* Separable, with the depthwise rows summed before the horizontal blend: the
   * horizontal taps and weights depend on (ow, kw) only, so per output row
   *   U[x][kw][k] = Σ_kh  (1-ly)·Z[y0][x][(kh,kw), k] + ly·Z[y1][x][(kh,kw), k]
   * (vertical blends at the source width, Z's rows read contiguously), then
   *   y[ow][k] = Σ_kw  hw0·U[x0][kw][k] + hw1·U[x1][kw][k]
   * — KH times fewer horizontal blends than blending every (kh, kw) tap. U is a
   * per-thread buffer (w × KW × Kp floats, Kp = K rounded up to 64, then 64 zeros);
   * two output pixels at a time, one 64-channel block at a time (eight independent
   * accumulators). Horizontal taps outside the map read the zero block with weight
   * 0, so the inner loop has no branches. */
  int64_t* rows = (int64_t*)sf_scratch(SF_SLOT_TABLE0, (size_t)(2 * H) * sizeof(int64_t));
  float* rl = (float*)sf_scratch(SF_SLOT_TABLE1, (size_t)H * sizeof(float));
  int64_t* hoff = (int64_t*)sf_scratch(SF_SLOT_TABLE2, (size_t)(2 * W * KW) * sizeof(int64_t));
  float* hw = (float*)sf_scratch(SF_SLOT_TABLE3, (size_t)(2 * W * KW) * sizeof(float));
  int failed = !rows || !rl || !hoff || !hw;
  const int64_t ncb = (K + 63) / 64, Kp = ncb * 64;
  const int64_t zero_block = w * KW * Kp; /* offset of 64 zeros after U */
  if (!failed) {
    for (int64_t i = 0; i < H; ++i)
      sf_linear_index(i, h, H, scale_h, align, rows + 2 * i, rows + 2 * i + 1, rl + i);
    for (int64_t ow = 0; ow < W; ++ow) {
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t ix = ow - pw + kw * dw, e = 2 * (ow * KW + kw);
        if (ix < 0 || ix >= W) {
          hoff[e] = hoff[e + 1] = zero_block;
          hw[e] = hw[e + 1] = 0.f;
          continue;
        }
        int64_t x0, x1;
        float lx;
        sf_linear_index(ix, w, W, scale_w, align, &x0, &x1, &lx);
        hoff[e] = (x0 * KW + kw) * Kp;
        hoff[e + 1] = (x1 * KW + kw) * Kp;
        hw[e] = 1.f - lx;
        hw[e + 1] = lx;
      }
    }
  }
  if (!failed) {
#pragma omp parallel
    {
      float* U = (float*)sf_scratch(SF_SLOT_BAND, (size_t)(zero_block + 64) * sizeof(float));
      if (!U) {
#pragma omp atomic write
        failed = 1;
      } else {
        for (int c = 0; c < 64; ++c) U[zero_block + c] = 0.f;
      }
#pragma omp for schedule(static)
      for (int64_t r = 0; r < N * H; ++r) {
        if (!U) continue;
        const int64_t n = r / H, oh = r % H;
        int first = 1;
        for (int64_t kh = 0; kh < KH; ++kh) { /* vertical blends, summed over kh */
          const int64_t iy = oh - ph + kh * dh;
          if (iy < 0 || iy >= H) continue;
          const int64_t y0 = rows[2 * iy], y1 = rows[2 * iy + 1];
          const float ly = rl[iy], ly0 = 1.f - ly;
          for (int64_t x = 0; x < w; ++x) {
            for (int64_t kw = 0; kw < KW; ++kw) {
              const int64_t t = (kh * KW + kw) * K;
              const int64_t p0 = n * zsn + y0 * zsh + x * zsw + t;
              const int64_t p1 = n * zsn + y1 * zsh + x * zsw + t;
              float* dst = U + (x * KW + kw) * Kp;
              int64_t k = 0;
              for (; k + 16 <= K; k += 16) {
                const sf_v16 e = ly0 * sf_load_any(Z, bf16, p0 + k, 16) +
                                 ly * sf_load_any(Z, bf16, p1 + k, 16);
                *(sf_v16*)(dst + k) = first ? e : *(const sf_v16*)(dst + k) + e;
              }
              for (; k < Kp; k += 16) { /* the last K mod 16 channels, then zeros */
                const int64_t m = K - k;
                sf_v16 e = {0};
                if (m > 0) {
                  const int c = (int)m;
                  e = ly0 * sf_load_any(Z, bf16, p0 + k, c) + ly * sf_load_any(Z, bf16, p1 + k, c);
                }
                *(sf_v16*)(dst + k) = first ? e : *(const sf_v16*)(dst + k) + e;
              }
            }
          }
          first = 0;
        }
        if (first) /* no depthwise row inside the map */
          for (int64_t i = 0; i < zero_block; ++i) U[i] = 0.f;
        for (int64_t cb = 0; cb < ncb; ++cb) {
          const int64_t k0 = cb * 64;
          const int kn = (int)((K - k0) < 64 ? (K - k0) : 64);
          sf_v16 bz[4] = {{0}, {0}, {0}, {0}};
          for (int v = 0; v < 4 && bias; ++v) {
            const int m = kn - 16 * v;
            if (m > 0) bz[v] = sf_load(bias + k0 + 16 * v, m < 16 ? m : 16);
          }
          const float* Uk = U + k0;
          for (int64_t ow = 0; ow < W; ow += 2) { /* horizontal blends, summed over kw */
            const int two = ow + 1 < W;
            const int64_t ow1 = two ? ow + 1 : ow;
            sf_v16 a0[4], a1[4];
            for (int v = 0; v < 4; ++v) a0[v] = a1[v] = bz[v];
            for (int64_t kw = 0; kw < KW; ++kw) {
              const int64_t e0 = 2 * (ow * KW + kw), e1 = 2 * (ow1 * KW + kw);
              const float* q00 = hoff[e0] == zero_block ? U + zero_block : Uk + hoff[e0];
              const float* q01 = hoff[e0 + 1] == zero_block ? U + zero_block : Uk + hoff[e0 + 1];
              const float* q10 = hoff[e1] == zero_block ? U + zero_block : Uk + hoff[e1];
              const float* q11 = hoff[e1 + 1] == zero_block ? U + zero_block : Uk + hoff[e1 + 1];
              const float w00 = hw[e0], w01 = hw[e0 + 1], w10 = hw[e1], w11 = hw[e1 + 1];
              for (int v = 0; v < 4; ++v) {
                a0[v] += w00 * *(const sf_v16*)(q00 + 16 * v) + w01 * *(const sf_v16*)(q01 + 16 * v);
                a1[v] += w10 * *(const sf_v16*)(q10 + 16 * v) + w11 * *(const sf_v16*)(q11 + 16 * v);
              }
            }
            if (B) { /* the pointwise conv's other source, at the output resolution */
              const float* b0 = B + n * bsn + oh * bsh + ow * bsw;
              const float* b1 = B + n * bsn + oh * bsh + ow1 * bsw;
              const float* wq = Wb + k0;
              for (int64_t c = 0; c < Cb; ++c, wq += Kp) {
                const float x0 = b0[c], x1 = b1[c];
                for (int v = 0; v < 4; ++v) {
                  const sf_v16 wv = *(const sf_v16*)(wq + 16 * v);
                  a0[v] += x0 * wv;
                  a1[v] += x1 * wv;
                }
              }
            }
            const int64_t dst = n * ysn + oh * ysh + ow * ysw + k0;
            if (kn == 64 && two) { /* whole block: no data-dependent control flow, so the
                                    * accumulators stay in registers */
              for (int v = 0; v < 4; ++v) {
                const sf_v16 o0 = sf_act_v(a0[v], act, act_param);
                const sf_v16 o1 = sf_act_v(a1[v], act, act_param);
                if (bf16) {
                  sf_bf16_store16((uint16_t*)y + dst + 16 * v, o0);
                  sf_bf16_store16((uint16_t*)y + dst + ysw + 16 * v, o1);
                } else {
                  *(sf_v16*)((float*)y + dst + 16 * v) = o0;
                  *(sf_v16*)((float*)y + dst + ysw + 16 * v) = o1;
                }
              }
              continue;
            }
            for (int v = 0; v < 4; ++v) {
              const int m = kn - 16 * v;
              if (m <= 0) break;
              sf_store_any(y, bf16, dst + 16 * v, sf_act_v(a0[v], act, act_param),
                           m < 16 ? m : 16);
              if (two)
                sf_store_any(y, bf16, dst + ysw + 16 * v, sf_act_v(a1[v], act, act_param),
                             m < 16 ? m : 16);
            }
          }
        }
      }
    }
  }
  return failed;
}

/* Z and y fp32, or bf16 when bf16 is set (blends and sums in fp32; bias fp32).
 * B (fp32 only, NULL for none): the pointwise conv's other source [N][H][W][Cb] at the
 * output resolution, mixed by Wb [Cb][Kp] (Kp = K rounded up to 64, zero-padded) into
 * the same accumulators, before the activation. */
int sf_up_taps(const void* restrict Z, int64_t N, int64_t h, int64_t w, int64_t zsn,
               int64_t zsh, int64_t zsw, int64_t K, int64_t KH, int64_t KW, int64_t ph,
               int64_t pw, int64_t dh, int64_t dw, int64_t H, int64_t W, float scale_h,
               float scale_w, int align, const float* restrict bias, int act, float act_param,
               void* restrict y, int64_t ysn, int64_t ysh, int64_t ysw,
               const float* restrict B, int64_t Cb, int64_t bsn, int64_t bsh, int64_t bsw,
               const float* restrict Wb, int bf16) {
  if (bf16) {
    if (B) return -2; /* the other source is fp32 only */
    return sf_up_taps_t(Z, N, h, w, zsn, zsh, zsw, K, KH, KW, ph, pw, dh, dw, H, W, scale_h,
                        scale_w, align, bias, act, act_param, y, ysn, ysh, ysw, 0, 0, 0, 0, 0,
                        0, 1);
  }
  return sf_up_taps_t(Z, N, h, w, zsn, zsh, zsw, K, KH, KW, ph, pw, dh, dw, H, W, scale_h,
                      scale_w, align, bias, act, act_param, y, ysn, ysh, ysw, B, Cb, bsn, bsh,
                      bsw, Wb, 0);
}

/* ---- Inverted residual block: [1×1 expand →] depthwise KH×KW → 1×1 project (+ residual) ----
 * MobileNetV2's blocks at high resolution write an expanded tensor 4–6× the size of
 * their input and read it back (96 channels at 256×256: 25 MB each way), then write
 * and read the depthwise output. Here each thread walks a contiguous run of output
 * rows keeping a ring of the R = (KH-1)·dh + 1 expanded rows its taps reach (in L2);
 * only the block's input and output touch memory. Internal rows have Cp channels
 * (the expanded width rounded up to a multiple of the vector width SF_NL — 16 lanes
 * with AVX-512, 8 on AVX2 — weights and biases zero-padded).
 * Reference: segfast/backends/cpu/invres.py. */

/* out[m][n] = act(bias[n] + Σ_k a[m·as + k]·B[k·Np + n]) (+ res), n in [n0, n0 + SF_NL·NV) ∩ [0, N):
 * MR pixels × NV vectors of accumulators in registers; B's rows are zero-padded to Np. */
/* Bias + accumulators → act → (+ residual) → out, all NV vectors inside [0, N). */
#define SF_GEMM_EPI(MR, NV, ACT)                                                                  \
  do {                                                                                            \
    int cn[NV];                                                                                   \
    for (int v = 0; v < NV; ++v) cn[v] = N - n0 - SF_NL * v >= SF_NL ? SF_NL : (int)(N - n0 - SF_NL * v); \
    if (res) {                                                                                    \
      for (int m = 0; m < MR; ++m)                                                                \
        for (int v = 0; v < NV; ++v) {                                                            \
          const sf_vn r = sf_load_n(res + m * rs + n0 + SF_NL * v, cn[v]);                        \
          sf_vn o = res_after_act ? acc[m][v] : acc[m][v] + r;                                    \
          o = ACT;                                                                                \
          sf_store_n(out + m * os + n0 + SF_NL * v, res_after_act ? o + r : o, cn[v]);            \
        }                                                                                         \
    } else {                                                                                      \
      for (int m = 0; m < MR; ++m)                                                                \
        for (int v = 0; v < NV; ++v) {                                                            \
          sf_vn o = acc[m][v];                                                                    \
          sf_store_n(out + m * os + n0 + SF_NL * v, ACT, cn[v]);                                  \
        }                                                                                         \
    }                                                                                             \
  } while (0)

#define SF_GEMM_TILE(MR, NV)                                                                      \
  static void sf_gemm_tile_##MR##_##NV(                                                           \
      const float* restrict a, int64_t as, int64_t K, const float* restrict B, int64_t Np,        \
      const float* restrict bias, int64_t n0, int64_t N, float* restrict out, int64_t os,         \
      const float* restrict res, int64_t rs, int res_after_act, int act, float ap) {              \
    sf_vn acc[MR][NV];                                                                            \
    for (int v = 0; v < NV; ++v) {                                                                \
      const sf_vn b = *(const sf_vn*)(bias + n0 + SF_NL * v);                                     \
      for (int m = 0; m < MR; ++m) acc[m][v] = b;                                                 \
    }                                                                                             \
    const float* bp = B + n0;                                                                     \
    for (int64_t k = 0; k < K; ++k, bp += Np) {                                                   \
      sf_vn bv[NV];                                                                               \
      for (int v = 0; v < NV; ++v) bv[v] = *(const sf_vn*)(bp + SF_NL * v);                       \
      for (int m = 0; m < MR; ++m) {                                                              \
        const float am = a[m * as + k]; /* splat by the vector extension */                       \
        for (int v = 0; v < NV; ++v) acc[m][v] += am * bv[v];                                     \
      }                                                                                           \
    }                                                                                             \
    if (act <= 2) { /* one epilogue per activation (the last vector may be partial) */            \
      switch (act) {                                                                              \
        case 1: SF_GEMM_EPI(MR, NV, sf_act_n(o, 1, 0.f)); return;                                 \
        case 2: SF_GEMM_EPI(MR, NV, sf_act_n(o, 2, 0.f)); return;                                 \
        default: SF_GEMM_EPI(MR, NV, o); return;                                                  \
      }                                                                                           \
    }                                                                                             \
    for (int m = 0; m < MR; ++m) {                                                                \
      for (int v = 0; v < NV; ++v) {                                                              \
        const int64_t c = n0 + SF_NL * v;                                                         \
        if (c >= N) break;                                                                        \
        const int cn = N - c < SF_NL ? (int)(N - c) : SF_NL;                                      \
        sf_vn o = acc[m][v];                                                                      \
        if (res && !res_after_act) o += sf_load_n(res + m * rs + c, cn);                          \
        o = sf_act_n(o, act, ap);                                                                 \
        if (res && res_after_act) o += sf_load_n(res + m * rs + c, cn);                           \
        sf_store_n(out + m * os + c, o, cn);                                                      \
      }                                                                                           \
    }                                                                                             \
  }
#ifdef __AVX512F__
SF_GEMM_TILE(6, 4)
SF_GEMM_TILE(8, 3)
SF_GEMM_TILE(12, 2)
SF_GEMM_TILE(1, 4)
SF_GEMM_TILE(1, 3)
#else
SF_GEMM_TILE(6, 2)
#endif
SF_GEMM_TILE(12, 1)
SF_GEMM_TILE(1, 2)
SF_GEMM_TILE(1, 1)
#undef SF_GEMM_TILE
#undef SF_GEMM_EPI

#define SF_TILE(MR, NV)                                                                           \
  sf_gemm_tile_##MR##_##NV(a + p * as, as, K, B, Np, bias, n0, N, out + p * os, os,               \
               res ? res + p * rs : 0, rs, res_after_act, act, ap)

/* The 1×1 convolution of P pixels (a row): out[p][0:N] from a[p][0:K]. */
static void sf_gemm_rows(const float* restrict a, int64_t P, int64_t as, int64_t K,
                         const float* restrict B, int64_t Np, const float* restrict bias, int64_t N,
                         float* restrict out, int64_t os, const float* restrict res, int64_t rs,
                         int res_after_act, int act, float ap) {
  /* chunks of ≤ 4 vectors: with 6, GCC folded the weight loads into the FMAs (24
   * accumulators + 6 weights + a broadcast leave no spare register) and the tile
   * became load-bound — 160→960→160 at 32²: 0.84× oneDNN with 6, 0.97× with 4.
   * With 8 lanes (AVX2: 16 registers) chunks of ≤ 2 vectors, 6 pixels × 2 vectors or
   * 12 × 1 (12 accumulators + the weights + a broadcast). Only the vectors that hold
   * one of the N outputs are computed. */
#ifdef __AVX512F__
  const int64_t maxv = 4;
#else
  const int64_t maxv = 2;
#endif
  const int64_t nvt = (N + SF_NL - 1) / SF_NL;
  const int64_t chunks = (nvt + maxv - 1) / maxv;
  int64_t v0 = 0;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int nv = (int)(nvt / chunks + (ch < nvt % chunks));
    const int64_t n0 = SF_NL * v0;
    int64_t p = 0;
    switch (nv) {
#ifdef __AVX512F__
      case 4: for (; p + 6 <= P; p += 6) SF_TILE(6, 4); break;
      case 3: for (; p + 8 <= P; p += 8) SF_TILE(8, 3); break;
      case 2: for (; p + 12 <= P; p += 12) SF_TILE(12, 2); break;
#else
      case 2: for (; p + 6 <= P; p += 6) SF_TILE(6, 2); break;
#endif
      default: for (; p + 12 <= P; p += 12) SF_TILE(12, 1); break;
    }
    for (; p < P; ++p) {
      switch (nv) {
#ifdef __AVX512F__
        case 4: SF_TILE(1, 4); break;
        case 3: SF_TILE(1, 3); break;
#endif
        case 2: SF_TILE(1, 2); break;
        default: SF_TILE(1, 1); break;
      }
    }
    v0 += nv;
  }
}
#undef SF_TILE

#define MAX_KH 64

/* This OpenMP thread's contiguous run [r0, r1) of rows: kernels that keep a ring of
 * input rows walk consecutive output rows, so a thread's rows are one block. */
static inline void sf_thread_rows(int64_t rows, int64_t* r0, int64_t* r1) {
  const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
  const int64_t per = (rows + nt - 1) / nt;
  *r0 = t * per < rows ? t * per : rows;
  *r1 = *r0 + per < rows ? *r0 + per : rows;
}

/* Eight output pixels × one vector of channels of one depthwise row, every tap inside the map. */
static inline __attribute__((always_inline)) void sf_ir_dw_px8(
    const float* const* rp, const int64_t* kidx, int64_t nk, const float* restrict wd, int64_t KW,
    int64_t Cp, int64_t c, int64_t iw0, int64_t sw, int64_t dw, int act, float ap,
    const float* restrict bd, float* restrict out) {
  sf_vn acc[8];
  const sf_vn b = *(const sf_vn*)(bd + c);
  for (int p = 0; p < 8; ++p) acc[p] = b;
  for (int64_t i = 0; i < nk; ++i) {
    const float* xr = rp[i] + iw0 * Cp + c;
    const float* wr = wd + kidx[i] * KW * Cp + c;
    for (int64_t kw = 0; kw < KW; ++kw) {
      const sf_vn wv = *(const sf_vn*)(wr + kw * Cp);
      const float* xp = xr + kw * dw * Cp;
      for (int p = 0; p < 8; ++p) acc[p] += wv * *(const sf_vn*)(xp + p * sw * Cp);
    }
  }
  for (int p = 0; p < 8; ++p) *(sf_vn*)(out + p * Cp + c) = sf_act_n(acc[p], act, ap);
}

/* dwrow[ow][0:Cp] = act(bd + Σ taps wd·x) over the valid rows rp[i] (tap row kidx[i]). */
static void sf_ir_dw_row(const float* const* rp, const int64_t* kidx, int64_t nk, int64_t W,
                         int64_t Cp, const float* restrict wd, const float* restrict bd,
                         int64_t KW, int64_t sw, int64_t pw, int64_t dw, int act, float ap,
                         float* restrict dwrow, int64_t Wo) {
  /* interior: ow·sw - pw ≥ 0 and ow·sw - pw + (KW-1)·dw ≤ W-1 */
  int64_t lo = (pw + sw - 1) / sw;
  int64_t hi = (W - 1 + pw - (KW - 1) * dw) >= 0 ? (W - 1 + pw - (KW - 1) * dw) / sw + 1 : 0;
  if (lo > Wo) lo = Wo;
  if (hi > Wo) hi = Wo;
  if (hi < lo) hi = lo;
  int64_t ow = lo;
  for (; ow + 8 <= hi; ow += 8) {
    const int64_t iw0 = ow * sw - pw;
    float* out = dwrow + ow * Cp;
    if (KW == 3 && sw == 1 && dw == 1) {
      for (int64_t c = 0; c < Cp; c += SF_NL)
        sf_ir_dw_px8(rp, kidx, nk, wd, 3, Cp, c, iw0, 1, 1, act, ap, bd, out);
    } else if (KW == 3 && sw == 2 && dw == 1) {
      for (int64_t c = 0; c < Cp; c += SF_NL)
        sf_ir_dw_px8(rp, kidx, nk, wd, 3, Cp, c, iw0, 2, 1, act, ap, bd, out);
    } else {
      for (int64_t c = 0; c < Cp; c += SF_NL)
        sf_ir_dw_px8(rp, kidx, nk, wd, KW, Cp, c, iw0, sw, dw, act, ap, bd, out);
    }
  }
  /* edges and the remainder: one pixel at a time, taps checked */
  for (int64_t o = 0; o < Wo; ++o) {
    if (o >= lo && o < ow) {
      o = ow - 1;
      continue;
    }
    for (int64_t c = 0; c < Cp; c += SF_NL) {
      sf_vn acc = *(const sf_vn*)(bd + c);
      for (int64_t i = 0; i < nk; ++i) {
        for (int64_t kw = 0; kw < KW; ++kw) {
          const int64_t iw = o * sw - pw + kw * dw;
          if (iw < 0 || iw >= W) continue;
          acc += *(const sf_vn*)(wd + (kidx[i] * KW + kw) * Cp + c) *
                 *(const sf_vn*)(rp[i] + iw * Cp + c);
        }
      }
      *(sf_vn*)(dwrow + o * Cp + c) = sf_act_n(acc, act, ap);
    }
  }
}

/* The block's rows. wp != NULL: project each depthwise row into y (sf_invres). wp ==
 * NULL, the front of a squeeze-excitation block (sf_invres_front): y gets the depthwise
 * rows themselves (Ce channels) and `part` — [threads][N][Cp] floats, zeroed — each
 * thread's per-image channel sums of them, for the SE gate's mean. */
static int sf_invres_rows(const float* restrict x, int64_t N, int64_t H, int64_t W, int64_t Cin,
                          int64_t xsn, int64_t xsh, int64_t xsw,
                          const float* restrict we, const float* restrict be, int act_e,
                          float ap_e, int64_t Ce, int64_t Cp,
                          const float* restrict wd, const float* restrict bd, int64_t KH,
                          int64_t KW, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                          int64_t dw, int act_d, float ap_d,
                          const float* restrict wp, const float* restrict bp, int64_t Co,
                          int64_t Cop, int act_p, float ap_p,
                          float* restrict y, int64_t Ho, int64_t Wo, int64_t ysn, int64_t ysh,
                          int64_t ysw, const float* restrict res, int64_t rsn, int64_t rsh,
                          int64_t rsw, int res_after_act, float* restrict part, int threads) {
  if (KH > MAX_KH) return -2;
  if (Cp % SF_NL || (wp && Cop % SF_NL)) return -3; /* padded widths: whole vectors */
  const int64_t R = (KH - 1) * dh + 1;
  const int64_t rows = N * Ho;
  const int64_t row_len = W * Cp;
  const int direct = !we && Cin == Cp && xsw == Cp;
  /* the front writes its depthwise rows straight into y where y's pixels are Cp wide */
  const int in_place = !wp && Ce == Cp && ysw == Cp;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    int64_t r0, r1;
    sf_thread_rows(rows, &r0, &r1);
    float* ring = (float*)sf_scratch(SF_SLOT_RING, (size_t)(direct ? 16 : R * row_len) * sizeof(float));
    float* dwrow = (float*)sf_scratch(SF_SLOT_DWROW, (size_t)(Wo * Cp) * sizeof(float));
    int64_t* tag = (int64_t*)sf_scratch(SF_SLOT_TAGS, (size_t)R * sizeof(int64_t));
    float* mine = part ? part + (int64_t)omp_get_thread_num() * N * Cp : 0;
    if (!ring || !dwrow || !tag) {
#pragma omp atomic write
      failed = 1;
    } else if (r0 < r1) {
      for (int64_t i = 0; i < R; ++i) tag[i] = -1;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / Ho, oh = r % Ho;
        /* the rows this output row's taps read: x's own (direct), or expanded rows,
         * each computed once per run into the ring */
        const float* rp[MAX_KH];
        int64_t kidx[MAX_KH];
        int64_t nk = 0;
        for (int64_t kh = 0; kh < KH; ++kh) {
          const int64_t ih = oh * sh - ph + kh * dh;
          if (ih < 0 || ih >= H) continue;
          const float* src = x + n * xsn + ih * xsh;
          float* dst = ring + (ih % R) * row_len;
          kidx[nk] = kh;
          rp[nk++] = direct ? src : dst;
          if (direct || tag[ih % R] == n * H + ih) continue;
          tag[ih % R] = n * H + ih;
          if (we) {
            sf_gemm_rows(src, W, xsw, Cin, we, Cp, be, Cp, dst, Cp, 0, 0, 0, act_e, ap_e);
          } else {
            for (int64_t iw = 0; iw < W; ++iw) {
              for (int64_t c = 0; c < Cin; ++c) dst[iw * Cp + c] = src[iw * xsw + c];
              for (int64_t c = Cin; c < Cp; ++c) dst[iw * Cp + c] = 0.f;
            }
          }
        }
        float* yrow = y + n * ysn + oh * ysh;
        float* drow = in_place ? yrow : dwrow;
        /* depthwise: one output row, all Cp channels */
        sf_ir_dw_row(rp, kidx, nk, W, Cp, wd, bd, KW, sw, pw, dw, act_d, ap_d, drow, Wo);
        if (wp) { /* project: the output row, with the residual */
          sf_gemm_rows(drow, Wo, Cp, Ce, wp, Cop, bp, Co, yrow, ysw,
                       res ? res + n * rsn + oh * rsh : 0, rsw, res_after_act, act_p, ap_p);
          continue;
        }
        /* front: the row's channel sums (and the row itself into y) */
        float* acc = mine + n * Cp;
        for (int64_t c = 0; c < Cp; c += SF_NL) {
          sf_vn s = *(const sf_vn*)(acc + c);
          for (int64_t o = 0; o < Wo; ++o) s += *(const sf_vn*)(drow + o * Cp + c);
          *(sf_vn*)(acc + c) = s;
        }
        if (!in_place)
          for (int64_t o = 0; o < Wo; ++o)
            for (int64_t c = 0; c < Ce; c += SF_NL)
              sf_store_n(yrow + o * ysw + c, *(const sf_vn*)(drow + o * Cp + c),
                         Ce - c < SF_NL ? (int)(Ce - c) : SF_NL);
      }
    }
  }
  return failed ? -1 : 0;
}

/* we == NULL: no expansion (the depthwise conv reads x, Cin ≤ Cp). Ce: the real expanded
 * width (≤ Cp). wd: [KH][KW][Cp]; we: [Cin][Cp]; wp: [Ce][Cop]; biases padded likewise.
 * Returns 0; -1 when a thread's scratch could not be allocated; -2 for KH > MAX_KH; -3
 * when Cp or Cop is not a multiple of SF_NL (sf_lanes()) or wp is NULL. */
int sf_invres(const float* restrict x, int64_t N, int64_t H, int64_t W, int64_t Cin,
              int64_t xsn, int64_t xsh, int64_t xsw,
              const float* restrict we, const float* restrict be, int act_e, float ap_e,
              int64_t Ce, int64_t Cp,
              const float* restrict wd, const float* restrict bd, int64_t KH, int64_t KW,
              int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
              int act_d, float ap_d,
              const float* restrict wp, const float* restrict bp, int64_t Co, int64_t Cop,
              int act_p, float ap_p,
              float* restrict y, int64_t Ho, int64_t Wo, int64_t ysn, int64_t ysh, int64_t ysw,
              const float* restrict res, int64_t rsn, int64_t rsh, int64_t rsw,
              int res_after_act) {
  if (!wp) return -3;
  return sf_invres_rows(x, N, H, W, Cin, xsn, xsh, xsw, we, be, act_e, ap_e, Ce, Cp, wd, bd,
                        KH, KW, sh, sw, ph, pw, dh, dw, act_d, ap_d, wp, bp, Co, Cop, act_p,
                        ap_p, y, Ho, Wo, ysn, ysh, ysw, res, rsn, rsh, rsw, res_after_act, 0,
                        omp_get_max_threads());
}

/* The front of a squeeze-excitation block (EfficientNet's MBConv, MobileNetV3's bneck
 * with SE): [1×1 expand →] depthwise, written to y [N, Ho, Wo, Ce] (channel stride 1),
 * and the SE gate's mean over Ho×Wo of every (image, channel) into pooled [N][Ce] —
 * from the rows as they are computed, so the expanded tensor is never written and the
 * gate does not read the depthwise output again. Sums per thread over its run of rows,
 * added in thread order (deterministic for a thread count). Returns as sf_invres, or
 * -1 when the partial sums could not be allocated. */
int sf_invres_front(const float* restrict x, int64_t N, int64_t H, int64_t W, int64_t Cin,
                    int64_t xsn, int64_t xsh, int64_t xsw,
                    const float* restrict we, const float* restrict be, int act_e, float ap_e,
                    int64_t Ce, int64_t Cp,
                    const float* restrict wd, const float* restrict bd, int64_t KH, int64_t KW,
                    int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                    int act_d, float ap_d,
                    float* restrict y, int64_t Ho, int64_t Wo, int64_t ysn, int64_t ysh,
                    int64_t ysw, float* restrict pooled) {
  const int threads = omp_get_max_threads();
  float* part = 0;
  if (posix_memalign((void**)&part, 64, (size_t)threads * N * Cp * sizeof(float)) != 0)
    return -1;
  for (int64_t i = 0; i < (int64_t)threads * N * Cp; ++i) part[i] = 0.f;
  const int rc = sf_invres_rows(x, N, H, W, Cin, xsn, xsh, xsw, we, be, act_e, ap_e, Ce, Cp,
                                wd, bd, KH, KW, sh, sw, ph, pw, dh, dw, act_d, ap_d, 0, 0, 0, 0,
                                0, 0.f, y, Ho, Wo, ysn, ysh, ysw, 0, 0, 0, 0, 0, part, threads);
  if (rc == 0) {
    const float inv = 1.f / (float)(Ho * Wo);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < Ce; ++c) {
        float s = 0.f;
        for (int t = 0; t < threads; ++t) s += part[((int64_t)t * N + n) * Cp + c];
        pooled[n * Ce + c] = s * inv;
      }
  }
  free(part);
  return rc;
}

/* ---- Convolution with 17–24 output channels (a segmentation head: 19 or 21 classes) ----
 * oneDNN and MLAS pad the output channels to 32 (two 16-lane vectors); here they take
 * one 16-lane and one 8-lane vector, so 24 lanes of arithmetic per pixel instead of 32.
 * Stride 1, any KH×KW, padding and dilation. Each thread walks a run of output rows
 * keeping the R = (KH-1)·dh + 1 input rows its taps reach in a ring, zero-padded by pw
 * columns each side; a tile is 12 output pixels × 24 channels in registers, summed over
 * every (kh, kw, c). w: [KH][KW][C][24] (zero-padded), bias: [24].
 * Reference: segfast/backends/cpu/narrow.py. Returns 0, or -1 when a thread's scratch
 * could not be allocated. */
typedef float sf_v8 __attribute__((vector_size(32), aligned(4)));

#define SF_NARROW_TILE(MR)                                                                   \
  static void sf_narrow_tile_##MR(const float* const* rp, const int64_t* kidx, int64_t nk,   \
                                  int64_t KW, int64_t dw, int64_t C, const float* restrict wt, \
                                  const float* restrict bias, int64_t K, float* restrict out,  \
                                  int64_t os, int act, float ap) {                            \
    sf_v16 az[MR];                                                                           \
    sf_v8 ay[MR];                                                                            \
    const sf_v16 bz = *(const sf_v16*)bias;                                                  \
    const sf_v8 by = *(const sf_v8*)(bias + 16);                                             \
    for (int m = 0; m < MR; ++m) {                                                           \
      az[m] = bz;                                                                            \
      ay[m] = by;                                                                            \
    }                                                                                        \
    for (int64_t i = 0; i < nk; ++i) {                                                       \
      for (int64_t kw = 0; kw < KW; ++kw) {                                                  \
        const float* a = rp[i] + kw * dw * C;                                                \
        const float* b = wt + (kidx[i] * KW + kw) * C * 24;                                  \
        for (int64_t c = 0; c < C; ++c, b += 24) {                                           \
          const sf_v16 wz = *(const sf_v16*)b;                                               \
          const sf_v8 wy = *(const sf_v8*)(b + 16);                                          \
          for (int m = 0; m < MR; ++m) {                                                     \
            const float am = a[m * C + c];                                                   \
            az[m] += am * wz;                                                                \
            ay[m] += am * wy;                                                                \
          }                                                                                  \
        }                                                                                    \
      }                                                                                      \
    }                                                                                        \
    for (int m = 0; m < MR; ++m) {                                                           \
      const sf_v16 o = sf_act_v(az[m], act, ap);                                             \
      *(sf_v16*)(out + m * os) = o;                                                          \
      for (int64_t k = 16; k < K; ++k) out[m * os + k] = sf_act(ay[m][k - 16], act, ap);     \
    }                                                                                        \
  }
SF_NARROW_TILE(12)
SF_NARROW_TILE(1)
#undef SF_NARROW_TILE

int sf_conv_narrow(const float* restrict x, int64_t N, int64_t H, int64_t W, int64_t C,
                   int64_t xsn, int64_t xsh, int64_t xsw,
                   const float* restrict wt, const float* restrict bias, int64_t KH, int64_t KW,
                   int64_t ph, int64_t pw, int64_t dh, int64_t dw, int act, float ap,
                   float* restrict y, int64_t K, int64_t Ho, int64_t Wo,
                   int64_t ysn, int64_t ysh, int64_t ysw) {
  if (KH > MAX_KH || K <= 16 || K > 24) return -2;
  const int64_t R = (KH - 1) * dh + 1;
  const int64_t Wp = W + 2 * pw; /* a ring row: pw zero columns, the row, pw zero columns */
  const int64_t row_len = Wp * C;
  const int64_t rows = N * Ho;
  int failed = 0;
#pragma omp parallel
  {
    int64_t r0, r1;
    sf_thread_rows(rows, &r0, &r1);
    float* ring = (float*)sf_scratch(SF_SLOT_RING, (size_t)(R * row_len) * sizeof(float));
    int64_t* tag = (int64_t*)sf_scratch(SF_SLOT_TAGS, (size_t)R * sizeof(int64_t));
    if (!ring || !tag) {
#pragma omp atomic write
      failed = 1;
    } else if (r0 < r1) {
      for (int64_t i = 0; i < R; ++i) tag[i] = -1;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / Ho, oh = r % Ho;
        const float* rp[MAX_KH];
        int64_t kidx[MAX_KH];
        int64_t nk = 0;
        for (int64_t kh = 0; kh < KH; ++kh) {
          const int64_t ih = oh - ph + kh * dh;
          if (ih < 0 || ih >= H) continue;
          float* dst = ring + (ih % R) * row_len;
          if (tag[ih % R] != n * H + ih) { /* copy the row in, zero-padded */
            tag[ih % R] = n * H + ih;
            for (int64_t i = 0; i < pw * C; ++i) dst[i] = dst[(pw + W) * C + i] = 0.f;
            const float* src = x + n * xsn + ih * xsh;
            for (int64_t iw = 0; iw < W; ++iw)
              for (int64_t c = 0; c < C; ++c) dst[(pw + iw) * C + c] = src[iw * xsw + c];
          }
          rp[nk] = dst;
          kidx[nk++] = kh;
        }
        float* yrow = y + n * ysn + oh * ysh;
        int64_t ow = 0;
        const float* rq[MAX_KH];
        for (; ow + 12 <= Wo; ow += 12) {
          for (int64_t i = 0; i < nk; ++i) rq[i] = rp[i] + ow * C;
          sf_narrow_tile_12(rq, kidx, nk, KW, dw, C, wt, bias, K, yrow + ow * ysw, ysw, act, ap);
        }
        for (; ow < Wo; ++ow) {
          for (int64_t i = 0; i < nk; ++i) rq[i] = rp[i] + ow * C;
          sf_narrow_tile_1(rq, kidx, nk, KW, dw, C, wt, bias, K, yrow + ow * ysw, ysw, act, ap);
        }
      }
    }
  }
  return failed ? -1 : 0;
}

/* fp32 → u8: out = clamp(round_half_even(x / scale), -128, 127) + 128, over `rows`
 * rows of C values: x[r * xs + c] → out[r * os + c]. Pixel rows of NHWC tensors, so a
 * channel slice of a larger buffer (one source of a two-source conv's joined input) is
 * read or written in place. The division (not a multiply by 1/scale) keeps it
 * bit-identical to the reference (segfast.compiler.ops.fake_quant). */
void sf_quantize_u8(const float* restrict x, int64_t rows, int64_t C, int64_t xs, float scale,
                    int32_t zp, uint8_t* restrict out, int64_t os) {
  const float lo = zp == 0 ? 0.f : -128.f, z = (float)zp;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * xs;
    uint8_t* orow = out + r * os;
    for (int64_t c = 0; c < C; c++) {
      float v = nearbyintf(xr[c] / scale);
      v = v < lo ? lo : (v > 127.f ? 127.f : v);
      orow[c] = (uint8_t)(int32_t)(v + z);
    }
  }
}

/* Rows of C floats quantized to int8 at `scale` and back: out = clamp(round(x / scale),
 * −128, 127) · scale, round half to even — bit-identical to
 * segfast.compiler.ops.fake_quant. Layout as sf_quantize_u8 (NHWC pixel rows; `out` may
 * be a channel slice of a joined input). The int8 convs that run on oneDNN's fp32
 * convolution (CPUs whose int8 sums would saturate) read this: one pass instead of
 * PyTorch's four. */
void sf_fake_quant(const float* restrict x, int64_t rows, int64_t C, int64_t xs, float scale,
                   float* restrict out, int64_t os) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * xs;
    float* orow = out + r * os;
    for (int64_t c = 0; c < C; c++) {
      float v = nearbyintf(xr[c] / scale);
      v = v < -128.f ? -128.f : (v > 127.f ? 127.f : v);
      orow[c] = v * scale;
    }
  }
}

/* Squeeze-excitation gate: out[n, k] = act2(b2[k] + Σ_j w2t[j, k] · act1(b1[j] + Σ_c
 * w1[j, c] · mean_p x[n, p, c])) — or the first stage alone when w2t is NULL (C2 = C1).
 * x: N images of HW pixels, pixel stride xs and image stride xsn (elements), channels
 * contiguous; fp32, or bf16 when `bf16`. w1 is [C1, C]; w2t is the second weight
 * transposed, [C1, C2], so both products run along contiguous vectors. Sums
 * in fp32. The mean runs in parallel over blocks of SF_CB channels (one thread reads
 * its own 64-byte run of every pixel); the two small matrix-vector products after it
 * on one thread. `pooled`: N·C floats of scratch, `hidden`: C1; x == NULL: `pooled`
 * holds the N·C means already (sf_invres_front's). Reference:
 * segfast.compiler.ops.se_gate_impl. */
void sf_se_gate(const void* restrict x, int bf16, int64_t N, int64_t HW, int64_t C, int64_t xs,
                int64_t xsn, const float* restrict w1, const float* restrict b1, int64_t C1,
                int act1, float p1, const float* restrict w2t, const float* restrict b2,
                int64_t C2, int act2, float p2, float* restrict pooled, float* restrict hidden,
                float* restrict out) {
  const int64_t nb = x ? (C + SF_CB - 1) / SF_CB : 0; /* no map: pooled holds the means */
  const float inv = 1.f / (float)HW;
#pragma omp parallel for schedule(static) if (N * HW * C > 32768)
  for (int64_t t = 0; t < N * nb; t++) {
    const int64_t n = t / nb, c0 = (t % nb) * SF_CB;
    const int lanes = (int)(C - c0 < SF_CB ? C - c0 : SF_CB);
    float sums[SF_CB] = {0.f};
    if (bf16) {
      const uint16_t* xb = (const uint16_t*)x + n * xsn + c0;
      sf_v16 acc = {0.f};
      if (lanes == SF_CB) {
        for (int64_t p = 0; p < HW; p++) acc += sf_bf16_load16(xb + p * xs);
      } else {
        for (int64_t p = 0; p < HW; p++)
          for (int l = 0; l < lanes; l++) acc[l] += sf_bf16_load(xb + p * xs + l);
      }
      for (int l = 0; l < lanes; l++) sums[l] = acc[l];
    } else {
      const float* xf = (const float*)x + n * xsn + c0;
      if (lanes == SF_CB) {
        sf_vn acc[SF_CB / SF_NL] = {{0.f}};
        for (int64_t p = 0; p < HW; p++)
          for (int v = 0; v < SF_CB / SF_NL; v++)
            acc[v] += *(const sf_vn*)(xf + p * xs + v * SF_NL);
        for (int l = 0; l < SF_CB; l++) sums[l] = acc[l / SF_NL][l % SF_NL];
      } else {
        for (int64_t p = 0; p < HW; p++)
          for (int l = 0; l < lanes; l++) sums[l] += xf[p * xs + l];
      }
    }
    for (int l = 0; l < lanes; l++) pooled[n * C + c0 + l] = sums[l] * inv;
  }
  for (int64_t n = 0; n < N; n++) {
    const float* m = pooled + n * C;
    float* h = w2t ? hidden : out + n * C1;
    for (int64_t j = 0; j < C1; j++) {  /* dot products along C, a register at a time */
      const float* wr = w1 + j * C;
      sf_vn a = {0.f};
      int64_t c = 0;
      for (; c + SF_NL <= C; c += SF_NL) a += *(const sf_vn*)(wr + c) * *(const sf_vn*)(m + c);
      float v = 0.f;
      for (int l = 0; l < SF_NL; l++) v += a[l];
      for (; c < C; c++) v += wr[c] * m[c];
      h[j] = sf_act(v + (b1 ? b1[j] : 0.f), act1, p1);
    }
    if (!w2t) continue;
    float* o = out + n * C2;
    for (int64_t k = 0; k < C2; k++) o[k] = b2 ? b2[k] : 0.f;
    for (int64_t j = 0; j < C1; j++) {  /* axpy along C2: rows of w2t are contiguous */
      const float hj = hidden[j];
      const float* wr = w2t + j * C2;
      int64_t k = 0;
      for (; k + SF_NL <= C2; k += SF_NL) *(sf_vn*)(o + k) += hj * *(const sf_vn*)(wr + k);
      for (; k < C2; k++) o[k] += hj * wr[k];
    }
    for (int64_t k = 0; k < C2; k++) o[k] = sf_act(o[k], act2, p2);
  }
}

/* ---- 3×3 convolution of a ×2 nearest upsample, computed at the source resolution ----
 * Under a ×2 nearest upsample every output pixel of a 3×3 conv (stride 1, padding 1)
 * reads only 2×2 source pixels: output row 2i+a reads source rows {i-1, i} (a = 0:
 * its taps 0 | 1+2) or {i, i+1} (a = 1: taps 0+1 | 2), columns alike. So the four
 * phases (a, b) are four 2×2 convs of the source — 16 multiply-adds per source pixel
 * and channel pair instead of 36 — which oneDNN computes as one 2×2 conv with 4·K
 * outputs and padding 1: Z[n, i+a, j+b, (2a+b)·K + k] is phase (a, b)'s output at
 * (i, j). This kernel interleaves the phases:
 *   y[n, 2i+a, 2j+b, k] = act(bias[k] + Z[n, i+a, j+b, (2a+b)·K + k] (+ S[n, 2i+a, 2j+b, k]))
 * S: the conv of the other (full-resolution) source of a two-source conv, or NULL; y
 * may be S itself (each element is read once, then written). Z is [N, h+1, w+1, 4K],
 * S and y [N, 2h, 2w, K], all with channel stride 1; Z, S and y all fp32, or all bf16
 * when bf16 is set (summed in fp32, y rounded once to nearest even). Reference:
 * segfast/backends/cpu/subpixel.py. */
static inline __attribute__((always_inline)) void sf_subpixel2_rows(
    const void* restrict Z, const int bf16, int64_t h, int64_t w, int64_t zsn, int64_t zsh,
    int64_t zsw, int64_t K, const void* S, int64_t ssn, int64_t ssh, int64_t ssw,
    const float* restrict bias, int act, float ap, void* y, int64_t ysn, int64_t ysh,
    int64_t ysw, int64_t r) {
  const int64_t n = r / (2 * h), oh = r % (2 * h), i = oh >> 1, a = oh & 1;
  const int64_t zr = n * zsn + (i + a) * zsh, sr = n * ssn + oh * ssh, yr = n * ysn + oh * ysh;
  for (int64_t ow = 0; ow < 2 * w; ++ow) {
    const int64_t j = ow >> 1, b = ow & 1;
    const int64_t zp = zr + (j + b) * zsw + (2 * a + b) * K, sp = sr + ow * ssw,
                  yp = yr + ow * ysw;
    if (!bf16) {
      for (int64_t k = 0; k < K; k += SF_NL) {
        const int cn = K - k < SF_NL ? (int)(K - k) : SF_NL;
        sf_vn v = sf_load_n((const float*)Z + zp + k, cn) + sf_load_n(bias + k, cn);
        if (S) v += sf_load_n((const float*)S + sp + k, cn);
        sf_store_n((float*)y + yp + k, sf_act_n(v, act, ap), cn);
      }
    } else {
      for (int64_t k = 0; k < K; k += 16) {
        const int cn = K - k < 16 ? (int)(K - k) : 16;
        sf_v16 v = sf_load_any(Z, 1, zp + k, cn) + sf_load(bias + k, cn);
        if (S) v += sf_load_any(S, 1, sp + k, cn);
        sf_store_any(y, 1, yp + k, sf_act_v(v, act, ap), cn);
      }
    }
  }
}

void sf_subpixel2(const void* restrict Z, int64_t N, int64_t h, int64_t w, int64_t zsn,
                  int64_t zsh, int64_t zsw, int64_t K, const void* S, int64_t ssn,
                  int64_t ssh, int64_t ssw, const float* restrict bias, int act, float ap,
                  void* y, int64_t ysn, int64_t ysh, int64_t ysw, int bf16) {
  const int64_t rows = N * 2 * h;
  if (bf16) {
#pragma omp parallel for schedule(static) if (rows * w * K > 32768)
    for (int64_t r = 0; r < rows; ++r)
      sf_subpixel2_rows(Z, 1, h, w, zsn, zsh, zsw, K, S, ssn, ssh, ssw, bias, act, ap, y, ysn,
                        ysh, ysw, r);
  } else {
#pragma omp parallel for schedule(static) if (rows * w * K > 32768)
    for (int64_t r = 0; r < rows; ++r)
      sf_subpixel2_rows(Z, 0, h, w, zsn, zsh, zsw, K, S, ssn, ssh, ssw, bias, act, ap, y, ysn,
                        ysh, ysw, r);
  }
}

/* ---- the engine's entry layout conversion: NCHW fp32 → NHWC fp32 or bf16 ----
 * y[n, h, w, c] = x[n, c, h, w] (x with any strides, y contiguous NHWC), bf16 rounded
 * to nearest even like PyTorch's cast. A 3-channel image at 512² in 0.05–0.09 ms on
 * 2 cores of a Zen 4 EPYC, where PyTorch's strided _to_copy takes 0.3 (fp32) and 0.55
 * (bf16: cast and transposition in one) — a row of pixels at a time, channels innermost.
 * Reference: segfast/backends/cpu/entry.py (PyTorch's _to_copy). */
static inline __attribute__((always_inline)) void sf_to_nhwc_row(
    const float* restrict xr, int64_t C, int64_t W, int64_t xsc, int64_t xsw,
    void* restrict yr, int bf16) {
  if (bf16) {
    uint16_t* restrict y = (uint16_t*)yr;
    for (int64_t w = 0; w < W; ++w)
      for (int64_t c = 0; c < C; ++c) y[w * C + c] = sf_bf16_round(xr[c * xsc + w * xsw]);
  } else {
    float* restrict y = (float*)yr;
    for (int64_t w = 0; w < W; ++w)
      for (int64_t c = 0; c < C; ++c) y[w * C + c] = xr[c * xsc + w * xsw];
  }
}

void sf_to_nhwc(const float* restrict x, int64_t N, int64_t C, int64_t H, int64_t W,
                int64_t xsn, int64_t xsc, int64_t xsh, int64_t xsw, void* restrict y,
                int bf16) {
  const int64_t rows = N * H, row = W * C;
#pragma omp parallel for schedule(static) if (rows * row > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + (r / H) * xsn + (r % H) * xsh;
    if (C == 3 && xsw == 1) { /* an RGB image: constants the compiler unrolls */
      if (bf16) sf_to_nhwc_row(xr, 3, W, xsc, 1, (uint16_t*)y + r * row, 1);
      else sf_to_nhwc_row(xr, 3, W, xsc, 1, (float*)y + r * row, 0);
    } else if (bf16) {
      sf_to_nhwc_row(xr, C, W, xsc, xsw, (uint16_t*)y + r * row, 1);
    } else {
      sf_to_nhwc_row(xr, C, W, xsc, xsw, (float*)y + r * row, 0);
    }
  }
}
