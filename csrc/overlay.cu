// Fused postprocessing for the edge runtime: class mask (network resolution) → nearest
// upscale to the frame → palette colour → fixed-point alpha blend → uint8 BGR, one kernel.
//
// Semantics: segfast.kernels.overlay (ids clamped to the palette, skip class keeps the
// frame, out = ((65536 − a)·frame + a·colour + 32768) >> 16), with the mask sampled by
// ATen's upsample_nearest2d indices when it is smaller than the frame. NV12 frames are
// decoded with sf_yuv_to_rgb and written as BGR. Per-pixel code: segfast_edge.cuh.
// Reference: segfast/edge/reference.py (overlay, overlay_nv12).
//
// One thread per frame pixel, grid-stride loop. Bytes per pixel: read C frame bytes (NV12:
// 1.5) + one mask id (1–8 bytes, shared by neighbours when upscaling) + C palette bytes
// (cached); write C bytes.
#include "segfast_edge.cuh"

#define SF_OVERLAY_KERNEL(NAME, MASK_T, NV12)                                          \
    extern "C" __global__ void NAME(const sf_overlay_args args) {                     \
        sf_i64 total = (sf_i64)args.N * args.H * args.W;                              \
        sf_i64 stride = (sf_i64)gridDim.x * blockDim.x;                                \
        for (sf_i64 p = (sf_i64)blockIdx.x * blockDim.x + threadIdx.x; p < total;      \
             p += stride)                                                              \
            sf_overlay_pixel<MASK_T>(args, p, NV12);                                   \
    }

SF_OVERLAY_KERNEL(sf_overlay_hwc_u8, unsigned char, 0)
SF_OVERLAY_KERNEL(sf_overlay_hwc_i32, int, 0)
SF_OVERLAY_KERNEL(sf_overlay_hwc_i64, long long, 0)
SF_OVERLAY_KERNEL(sf_overlay_nv12_u8, unsigned char, 1)
SF_OVERLAY_KERNEL(sf_overlay_nv12_i32, int, 1)
SF_OVERLAY_KERNEL(sf_overlay_nv12_i64, long long, 1)
