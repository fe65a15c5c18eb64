// Fused preprocessing for the edge runtime: uint8 frames (BGR/RGB/gray HWC, or NV12)
// → bilinear resize → (v/255 − mean)/std → fp16 or fp32 NCHW, RGB order, one kernel.
//
// Semantics: segfast.kernels.preprocess (ATen's upsample_bilinear2d source indices, the
// blend's fmas, value = fma(v, 1/(255·std), −mean/std)); NV12 input is the same as
// decoding it to RGB bytes with sf_yuv_to_rgb and preprocessing those. Per-pixel code:
// segfast_edge.cuh. Reference: segfast/edge/reference.py (preprocess, preprocess_nv12).
//
// One thread per output pixel (all channels), grid-stride loop. Bytes per output pixel:
// reads 4·C source bytes (mostly cache hits), writes C·2 (fp16) or C·4 (fp32) bytes.
#include "segfast_edge.cuh"

#define SF_PREPROCESS_KERNEL(NAME, NV12, F16)                                          \
    extern "C" __global__ void NAME(const sf_preprocess_args args) {                  \
        sf_i64 total = (sf_i64)args.N * args.h * args.w;                              \
        sf_i64 stride = (sf_i64)gridDim.x * blockDim.x;                                \
        for (sf_i64 p = (sf_i64)blockIdx.x * blockDim.x + threadIdx.x; p < total;      \
             p += stride)                                                              \
            sf_preprocess_pixel(args, p, NV12, F16);                                   \
    }

SF_PREPROCESS_KERNEL(sf_preprocess_hwc_f32, 0, 0)
SF_PREPROCESS_KERNEL(sf_preprocess_hwc_f16, 0, 1)
SF_PREPROCESS_KERNEL(sf_preprocess_nv12_f32, 1, 0)
SF_PREPROCESS_KERNEL(sf_preprocess_nv12_f16, 1, 1)
