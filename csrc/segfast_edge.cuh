// segfast edge kernels: the per-pixel functions and argument structs shared by
// preprocess.cu and overlay.cu.
//
// Everything here is plain C++ as well as CUDA: with no CUDA compiler it compiles as
// host C++ (g++), which is how the test suite runs these exact functions on the CPU
// against the numpy references in segfast/edge/reference.py (tests/edge/test_csrc_host.py).
// The __global__ kernels in the .cu files only map threads to pixels and call them.
//
// Floating point is spelled out: every fused multiply-add is an explicit fmaf and the
// kernels are compiled with --fmad=false (nvcc and NVRTC), so the device rounds exactly as
// the host build (-ffp-contract=off) does. The semantics follow segfast.kernels.preprocess
// and segfast.kernels.overlay (see their docstrings); NV12 decoding is defined here.
//
// No standard headers on the device side: NVRTC compiles this without a host toolchain.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define SF_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#define SF_HD static inline
#endif

typedef long long sf_i64;

// ---------------------------------------------------------------------------------------
// Argument structs. Passed by value to the kernels (one kernel parameter each). The host
// builds the same bytes with a numpy structured dtype (segfast/edge/kernels.py, ARGS_DTYPES);
// tests check the sizes against the C layout (g++) and the PTX parameter (NVRTC).
// Natural alignment, 8-byte members first: identical layout on x86-64, aarch64 and NVPTX64.
// ---------------------------------------------------------------------------------------

// uint8 frames [N, H, W, C] (strided, bytes) or NV12 (Y plane + interleaved UV plane)
//   → [N, C, h, w] fp32 or fp16 (element strides), RGB order for colour inputs.
struct sf_preprocess_args {
    const unsigned char* src;  // HWC frames, or the NV12 Y plane
    const unsigned char* uv;   // NV12 UV plane [ceil(H/2), ceil(W/2), 2] (U, V); HWC: unused
    void* out;                 // [N, C, h, w] float or half (uint16 bits)
    sf_i64 s_n, s_y, s_x, s_c; // source strides in bytes (NV12: Y plane; s_x = 1, s_c unused)
    sf_i64 uv_n, uv_y;         // NV12 UV plane strides in bytes (pixel pair = 2 bytes)
    sf_i64 o_n, o_c, o_y, o_x; // output strides in elements
    int N, H, W, C;            // source frames (C = 3, or 1 for grayscale HWC)
    int h, w;                  // output size
    int c_first, c_step;       // HWC: output channel c reads source channel c_first + c·c_step
    int align_corners;         // 1: ATen's align_corners=True source indices
    int resize;                // 0 when (h, w) == (H, W): a plain copy
    float ratio_h, ratio_w;    // bilinear_scale(in, out, align_corners), fp32 like ATen
    float a[3], b[3];          // value = fma(v, a[c], b[c]): 1/(255·std), −mean/std
    int yuv[6];                // NV12: y_offset, cy, crv, cgu, cgv, cbu (see sf_yuv_to_rgb)
};

// mask (class ids, any resolution) + palette + alpha → uint8 frames [N, H, W, C].
// The source is a uint8 HWC frame, or NV12 decoded to BGR (C = 3) with sf_yuv_to_rgb.
struct sf_overlay_args {
    const unsigned char* src;     // HWC frames, or the NV12 Y plane
    const unsigned char* uv;      // NV12 UV plane; HWC: unused
    const void* mask;             // [N, mh, mw] uint8 / int32 / int64 class ids
    const unsigned char* palette; // [K, C] colours in the output's channel order
    unsigned char* out;           // [N, H, W, C]
    sf_i64 s_n, s_y, s_x, s_c;    // source strides in bytes (NV12: Y plane)
    sf_i64 uv_n, uv_y;            // NV12 UV plane strides in bytes
    sf_i64 m_n, m_y, m_x;         // mask strides in elements
    sf_i64 p_k, p_c;              // palette strides in bytes
    sf_i64 o_n, o_y, o_x, o_c;    // output strides in bytes
    int N, H, W, C;               // frames (NV12: C = 3, BGR out)
    int mh, mw;                   // mask size; nearest-neighbour upscaled to H×W like ATen
    float mscale_h, mscale_w;     // (float)mh / H, (float)mw / W (ATen's nearest scale)
    int K;                        // palette entries; ids are clamped to [0, K − 1]
    int alpha;                    // blend weight in 1/65536: round(alpha·65536)
    int skip;                     // pixels with this class id keep the frame
    int has_skip;                 // 0: no skip class
    int yuv[6];                   // NV12 decoding coefficients
};

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

SF_HD int sf_min_i(int a, int b) { return a < b ? a : b; }
SF_HD int sf_clamp_u8(int v) { return v < 0 ? 0 : (v > 255 ? 255 : v); }

// float → IEEE half bits, round to nearest even (what a cvt.rn.f16.f32 does), in integer
// arithmetic so that host and device run the same code: NaN stays NaN, overflow → ±inf,
// subnormals rounded correctly. Tested against numpy's float16 cast.
SF_HD unsigned short sf_float_to_half_bits(float f) {
    union {
        float f;
        unsigned int u;
    } bits;
    bits.f = f;
    unsigned int x = bits.u;
    unsigned int sign = (x >> 16) & 0x8000u;
    unsigned int ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)  // inf or NaN (quiet NaN keeps a payload bit)
        return (unsigned short)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    int e = (int)(ax >> 23);  // biased fp32 exponent
    if (e >= 143) return (unsigned short)(sign | 0x7c00u);  // ≥ 2^16: overflow
    unsigned int m = (ax & 0x7fffffu) | 0x800000u;         // 24-bit significand
    unsigned int r, rem, half;
    if (e >= 113) {  // normal half: 10 mantissa bits, drop 13
        r = ((unsigned int)(e - 112) << 10) | ((ax >> 13) & 0x3ffu);
        rem = ax & 0x1fffu;
        half = 0x1000u;
    } else {  // subnormal half (or zero): units of 2^-24; value = m·2^(e−150)
        int shift = 126 - e;           // ≥ 14
        if (shift > 24) return (unsigned short)sign;  // < 2^-25 (fp32 subnormals too): ±0
        r = m >> shift;
        rem = m & ((1u << shift) - 1u);
        half = 1u << (shift - 1);
    }
    if (rem > half || (rem == half && (r & 1u))) r += 1u;  // carries into the exponent
    return (unsigned short)(sign | r);
}

// ---------------------------------------------------------------------------------------
// Bilinear source indices: ATen's upsample_bilinear2d in fp32 (same as
// segfast.kernels.head._source_index): d → (i0, i1, λ).
// ---------------------------------------------------------------------------------------
SF_HD void sf_source_index(int d, int size_in, float ratio, int align, int* i0, int* i1,
                           float* lam) {
    float df = (float)d;
    float src = align ? ratio * df : fmaxf(fmaf(ratio, df + 0.5f, -0.5f), 0.0f);
    int j = sf_min_i((int)src, size_in - 1);  // src ≥ 0: truncation is floor
    *lam = fminf(fmaxf(src - (float)j, 0.0f), 1.0f);
    *i0 = j;
    *i1 = j < size_in - 1 ? j + 1 : j;
}

// h0·(w0·x00 + w1·x01) + h1·(w0·x10 + w1·x11) with the fmas of ATen's CUDA kernel.
SF_HD float sf_blend(float x00, float x01, float x10, float x11, float h0, float h1, float w0,
                     float w1) {
    float t0 = fmaf(w0, x00, w1 * x01);
    float t1 = fmaf(w0, x10, w1 * x11);
    return fmaf(h0, t0, h1 * t1);
}

// ATen's upsample_nearest2d source index: min(floor(d·scale), in − 1), scale = in/out (fp32).
SF_HD int sf_nearest_index(int d, int size_in, int size_out, float scale) {
    if (size_in == size_out) return d;
    int s = (int)floorf((float)d * scale);
    return sf_min_i(s, size_in - 1);
}

// ---------------------------------------------------------------------------------------
// NV12 → RGB, integer fixed point (8 fractional bits), chroma sampled at (y/2, x/2):
//   c = cy·(Y − y_off), d = U − 128, e = V − 128
//   R = clamp((c + crv·e + 128) >> 8), G = clamp((c − cgu·d − cgv·e + 128) >> 8),
//   B = clamp((c + cbu·d + 128) >> 8)
// Coefficients per matrix/range: segfast/edge/reference.py YUV_COEFFICIENTS. Odd widths and
// heights: the UV plane has ceil(H/2) rows of ceil(W/2) pairs; pixel (y, x) uses pair
// (y >> 1, x >> 1), so the last odd row/column uses the last chroma sample.
// ---------------------------------------------------------------------------------------
SF_HD void sf_yuv_to_rgb(int Y, int U, int V, const int* k, int* rgb) {
    int c = k[1] * (Y - k[0]);
    int d = U - 128;
    int e = V - 128;
    // >> of a negative int is an arithmetic shift on every target here (and any negative
    // sum clamps to 0 regardless of how it rounds).
    rgb[0] = sf_clamp_u8((c + k[2] * e + 128) >> 8);
    rgb[1] = sf_clamp_u8((c - k[3] * d - k[4] * e + 128) >> 8);
    rgb[2] = sf_clamp_u8((c + k[5] * d + 128) >> 8);
}

SF_HD void sf_nv12_pixel_rgb(const unsigned char* ysrc, const unsigned char* uvsrc, sf_i64 y_y,
                             sf_i64 uv_y, int y, int x, const int* k, int* rgb) {
    int Y = ysrc[(sf_i64)y * y_y + x];
    const unsigned char* p = uvsrc + (sf_i64)(y >> 1) * uv_y + (sf_i64)(x >> 1) * 2;
    sf_yuv_to_rgb(Y, p[0], p[1], k, rgb);
}

// ---------------------------------------------------------------------------------------
// Preprocess: output pixel p (flattened n, y, x; x fastest) → its C channels.
// ---------------------------------------------------------------------------------------
SF_HD void sf_store(void* out, sf_i64 off, float v, int f16) {
    if (f16)
        ((unsigned short*)out)[off] = sf_float_to_half_bits(v);
    else
        ((float*)out)[off] = v;
}

SF_HD void sf_preprocess_pixel(const sf_preprocess_args& A, sf_i64 p, int nv12, int f16) {
    int ox = (int)(p % A.w);
    sf_i64 t = p / A.w;
    int oy = (int)(t % A.h);
    int n = (int)(t / A.h);
    int iy0, iy1, ix0, ix1;
    float ly, lx;
    if (A.resize) {
        sf_source_index(oy, A.H, A.ratio_h, A.align_corners, &iy0, &iy1, &ly);
        sf_source_index(ox, A.W, A.ratio_w, A.align_corners, &ix0, &ix1, &lx);
    } else {
        iy0 = iy1 = oy;
        ix0 = ix1 = ox;
        ly = lx = 0.0f;
    }
    float h1 = ly, h0 = 1.0f - ly, w1 = lx, w0 = 1.0f - lx;
    sf_i64 o_pix = (sf_i64)n * A.o_n + (sf_i64)oy * A.o_y + (sf_i64)ox * A.o_x;
    if (nv12) {
        const unsigned char* ys = A.src + (sf_i64)n * A.s_n;
        const unsigned char* uvs = A.uv + (sf_i64)n * A.uv_n;
        int q00[3], q01[3], q10[3], q11[3];  // the four neighbours as RGB bytes
        sf_nv12_pixel_rgb(ys, uvs, A.s_y, A.uv_y, iy0, ix0, A.yuv, q00);
        if (A.resize) {
            sf_nv12_pixel_rgb(ys, uvs, A.s_y, A.uv_y, iy0, ix1, A.yuv, q01);
            sf_nv12_pixel_rgb(ys, uvs, A.s_y, A.uv_y, iy1, ix0, A.yuv, q10);
            sf_nv12_pixel_rgb(ys, uvs, A.s_y, A.uv_y, iy1, ix1, A.yuv, q11);
        }
        for (int c = 0; c < 3; ++c) {
            float v = (float)q00[c];
            if (A.resize)
                v = sf_blend(v, (float)q01[c], (float)q10[c], (float)q11[c], h0, h1, w0, w1);
            sf_store(A.out, o_pix + c * A.o_c, fmaf(v, A.a[c], A.b[c]), f16);
        }
        return;
    }
    const unsigned char* base = A.src + (sf_i64)n * A.s_n;
    sf_i64 off00 = (sf_i64)iy0 * A.s_y + (sf_i64)ix0 * A.s_x;
    sf_i64 off01 = (sf_i64)iy0 * A.s_y + (sf_i64)ix1 * A.s_x;
    sf_i64 off10 = (sf_i64)iy1 * A.s_y + (sf_i64)ix0 * A.s_x;
    sf_i64 off11 = (sf_i64)iy1 * A.s_y + (sf_i64)ix1 * A.s_x;
    for (int c = 0; c < A.C; ++c) {
        sf_i64 cs = (sf_i64)(A.c_first + c * A.c_step) * A.s_c;
        float v = (float)base[off00 + cs];
        if (A.resize)
            v = sf_blend(v, (float)base[off01 + cs], (float)base[off10 + cs],
                         (float)base[off11 + cs], h0, h1, w0, w1);
        sf_store(A.out, o_pix + c * A.o_c, fmaf(v, A.a[c], A.b[c]), f16);
    }
}

// ---------------------------------------------------------------------------------------
// Overlay: frame pixel p (flattened n, y, x) → C blended bytes.
//   out = ((65536 − a)·frame + a·palette[clamp(id)] + 32768) >> 16, or the frame where
//   id == skip (segfast.kernels.overlay's fixed-point blend, bit for bit).
// ---------------------------------------------------------------------------------------
template <typename MaskT>
SF_HD void sf_overlay_pixel(const sf_overlay_args& A, sf_i64 p, int nv12) {
    int x = (int)(p % A.W);
    sf_i64 t = p / A.W;
    int y = (int)(t % A.H);
    int n = (int)(t / A.H);
    int my = sf_nearest_index(y, A.mh, A.H, A.mscale_h);
    int mx = sf_nearest_index(x, A.mw, A.W, A.mscale_w);
    sf_i64 cls = (sf_i64)((const MaskT*)A.mask)[(sf_i64)n * A.m_n + (sf_i64)my * A.m_y +
                                                (sf_i64)mx * A.m_x];
    sf_i64 k = cls < 0 ? 0 : (cls > A.K - 1 ? A.K - 1 : cls);
    const unsigned char* colour = A.palette + k * A.p_k;
    int keep = A.has_skip && cls == (sf_i64)A.skip;
    unsigned char* o = A.out + (sf_i64)n * A.o_n + (sf_i64)y * A.o_y + (sf_i64)x * A.o_x;
    int rgb[3] = {0, 0, 0};
    const unsigned char* f = A.src + (sf_i64)n * A.s_n;
    if (nv12)
        sf_nv12_pixel_rgb(f, A.uv + (sf_i64)n * A.uv_n, A.s_y, A.uv_y, y, x, A.yuv, rgb);
    else
        f += (sf_i64)y * A.s_y + (sf_i64)x * A.s_x;
    for (int c = 0; c < A.C; ++c) {
        int fr = nv12 ? rgb[2 - c] : (int)f[(sf_i64)c * A.s_c];  // NV12: BGR out
        // ≤ 255·65536 + 32768 < 2³¹: exact in int; operands ≥ 0, so >> 16 is floor.
        int v = (fr * (65536 - A.alpha) + (int)colour[(sf_i64)c * A.p_c] * A.alpha + 32768) >> 16;
        o[(sf_i64)c * A.o_c] = (unsigned char)(keep ? fr : v);
    }
}
