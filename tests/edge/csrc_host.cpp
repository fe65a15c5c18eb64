// Host build of csrc/segfast_edge.cuh for tests/edge/test_csrc_host.py: runs the kernels'
// per-pixel functions over every pixel on the CPU (what each CUDA thread does, in a loop).
// Built with g++ -ffp-contract=off (the kernels are built with --fmad=false: same rounding).
#include "segfast_edge.cuh"

extern "C" {

int sf_host_sizeof_preprocess_args() { return (int)sizeof(sf_preprocess_args); }
int sf_host_sizeof_overlay_args() { return (int)sizeof(sf_overlay_args); }

void sf_host_preprocess(const sf_preprocess_args* a, int nv12, int f16) {
    sf_i64 total = (sf_i64)a->N * a->h * a->w;
    for (sf_i64 p = 0; p < total; ++p) sf_preprocess_pixel(*a, p, nv12, f16);
}

// mask_bytes: 1 (uint8), 4 (int32) or 8 (int64), as the sf_overlay_{u8,i32,i64} kernels.
void sf_host_overlay(const sf_overlay_args* a, int nv12, int mask_bytes) {
    sf_i64 total = (sf_i64)a->N * a->H * a->W;
    for (sf_i64 p = 0; p < total; ++p) {
        if (mask_bytes == 1)
            sf_overlay_pixel<unsigned char>(*a, p, nv12);
        else if (mask_bytes == 4)
            sf_overlay_pixel<int>(*a, p, nv12);
        else
            sf_overlay_pixel<long long>(*a, p, nv12);
    }
}

void sf_host_float_to_half(const float* x, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = sf_float_to_half_bits(x[i]);
}

}  // extern "C"
