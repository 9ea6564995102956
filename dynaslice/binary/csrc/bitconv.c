/* The 1-bit convolution: XNOR-popcount over bit-packed NHWC activations and weights.
 *
 * Layouts (dynaslice/binary/kernel.py builds and checks them; this file trusts the shapes it is
 * given only after checking every buffer's length against them):
 *   activations  uint64 [N][H][W][Cw]      bit c%64 of word c/64 is 1 where the input is >= 0 (+1);
 *                                          packed inside each call from the float32 NHWC input
 *   patches      uint64 [K]                bit-packed im2col: bit t*Cin + c of the patch is channel c
 *                                          of tap t = i*kw + j, K = ceil(kh*kw*Cin / 64), so 16
 *                                          channels x 9 taps take 3 words, not 9
 *   weights      uint64 [K][Opad]          the same bit order per filter, output channels innermost
 *                                          (Opad = O rounded up to 16) so one vector holds one word
 *                                          of 8 (or 4) filters
 *   tap_ones     int32  [kh*kw][O]         the +1 weights of each tap and filter
 *   counts       int32  [N][Ho][Wo][O]     sum over the VALID taps of (+-1)*(+-1): a padded position
 *                                          contributes nothing, as in a zero-padded float conv
 * Bits past kh*kw*Cin are 0 in both operands, so they never mismatch. A padded tap is gathered as
 * zeros, whose mismatches against the weights are the tap's ones: they are subtracted again
 * (tap_ones), so count = nvalid*Cin - 2*(mismatches over valid taps).
 *
 * The fused form writes act(count*a[o] + b[o] + residual) in float32: the binary conv's scale and
 * the folded BatchNorm in (a, b), the shortcut added, then hardtanh or PReLU -- one pass over the
 * output instead of four.
 *
 * Three paths compute the mismatch sums, chosen at run time: AVX-512 VPOPCNTDQ, AVX2 (nibble
 * lookup with vpshufb), portable C. Each is a function compiled for its own target, so the file
 * builds with the default flags and runs on any x86-64 (or other) CPU.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BITCONV_X86 1
#include <immintrin.h>
#endif

enum { PATH_PORTABLE = 0, PATH_AVX2 = 1, PATH_AVX512 = 2 };
enum { ACT_NONE = 0, ACT_HARDTANH = 1, ACT_PRELU = 2 };
#define OPAD_MULTIPLE 16

typedef void (*mismatch_fn)(const uint64_t *patch, int P, const uint64_t *w, int K, int Opad, int32_t *pc);

/* Bits set in v, by the SWAR sum (no popcnt instruction assumed: this is the portable path). */
static inline int popc64(uint64_t v) {
    v = v - ((v >> 1) & 0x5555555555555555ULL);
    v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
    v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
    return (int)((v * 0x0101010101010101ULL) >> 56);
}

/* pc[p][o] = sum_k popcount(patch[p][k] ^ w[k][o]) for P gathered patches of K words. */
static void mismatch_portable(const uint64_t *patch, int P, const uint64_t *w, int K, int Opad, int32_t *pc) {
    for (int p = 0; p < P; p++) {
        const uint64_t *x = patch + (size_t)p * K;
        int32_t *out = pc + (size_t)p * Opad;
        for (int o = 0; o < Opad; o++) out[o] = 0;
        for (int k = 0; k < K; k++) {
            const uint64_t xv = x[k];
            const uint64_t *wk = w + (size_t)k * Opad;
            for (int o = 0; o < Opad; o++) out[o] += popc64(xv ^ wk[o]);
        }
    }
}

#ifdef BITCONV_X86
__attribute__((target("avx2"))) static inline __m256i popcnt_bytes_avx2(__m256i v) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_and_si256(v, low);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

/* 16 filters (4 vectors of 4 words) at a time; byte counts summed for up to 31 words (31 * 8 < 256)
 * before vpsadbw folds them into 64-bit lanes. */
__attribute__((target("avx2"))) static void mismatch_avx2(const uint64_t *patch, int P, const uint64_t *w, int K,
                                                          int Opad, int32_t *pc) {
    const __m256i zero = _mm256_setzero_si256();
    for (int p = 0; p < P; p++) {
        const uint64_t *x = patch + (size_t)p * K;
        int32_t *out = pc + (size_t)p * Opad;
        for (int ob = 0; ob < Opad; ob += 16) {
            __m256i s0 = zero, s1 = zero, s2 = zero, s3 = zero;
            for (int k0 = 0; k0 < K; k0 += 31) {
                const int k1 = K < k0 + 31 ? K : k0 + 31;
                __m256i b0 = zero, b1 = zero, b2 = zero, b3 = zero;
                for (int k = k0; k < k1; k++) {
                    const __m256i xv = _mm256_set1_epi64x((long long)x[k]);
                    const uint64_t *wk = w + (size_t)k * Opad + ob;
                    b0 = _mm256_add_epi8(b0, popcnt_bytes_avx2(_mm256_xor_si256(xv, _mm256_loadu_si256((const __m256i *)(wk + 0)))));
                    b1 = _mm256_add_epi8(b1, popcnt_bytes_avx2(_mm256_xor_si256(xv, _mm256_loadu_si256((const __m256i *)(wk + 4)))));
                    b2 = _mm256_add_epi8(b2, popcnt_bytes_avx2(_mm256_xor_si256(xv, _mm256_loadu_si256((const __m256i *)(wk + 8)))));
                    b3 = _mm256_add_epi8(b3, popcnt_bytes_avx2(_mm256_xor_si256(xv, _mm256_loadu_si256((const __m256i *)(wk + 12)))));
                }
                s0 = _mm256_add_epi64(s0, _mm256_sad_epu8(b0, zero));
                s1 = _mm256_add_epi64(s1, _mm256_sad_epu8(b1, zero));
                s2 = _mm256_add_epi64(s2, _mm256_sad_epu8(b2, zero));
                s3 = _mm256_add_epi64(s3, _mm256_sad_epu8(b3, zero));
            }
            int64_t tmp[16];
            _mm256_storeu_si256((__m256i *)(tmp + 0), s0);
            _mm256_storeu_si256((__m256i *)(tmp + 4), s1);
            _mm256_storeu_si256((__m256i *)(tmp + 8), s2);
            _mm256_storeu_si256((__m256i *)(tmp + 12), s3);
            for (int i = 0; i < 16; i++) out[ob + i] = (int32_t)tmp[i];
        }
    }
}

/* 16 filters (2 vectors of 8 words) for two positions at a time, so each weight load serves two
 * patches; vpopcntq counts each 64-bit lane directly. */
__attribute__((target("avx512f,avx512vpopcntdq"))) static void mismatch_avx512(const uint64_t *patch, int P,
                                                                                const uint64_t *w, int K, int Opad,
                                                                                int32_t *pc) {
    int p = 0;
    for (; p + 1 < P; p += 2) {
        const uint64_t *x0 = patch + (size_t)p * K, *x1 = x0 + K;
        int32_t *out0 = pc + (size_t)p * Opad, *out1 = out0 + Opad;
        for (int ob = 0; ob < Opad; ob += 16) {
            __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
            __m512i c0 = _mm512_setzero_si512(), c1 = _mm512_setzero_si512();
            for (int k = 0; k < K; k++) {
                const uint64_t *wk = w + (size_t)k * Opad + ob;
                const __m512i w0 = _mm512_loadu_si512((const void *)wk);
                const __m512i w1 = _mm512_loadu_si512((const void *)(wk + 8));
                const __m512i xv0 = _mm512_set1_epi64((long long)x0[k]);
                const __m512i xv1 = _mm512_set1_epi64((long long)x1[k]);
                a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_xor_si512(xv0, w0)));
                a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(_mm512_xor_si512(xv0, w1)));
                c0 = _mm512_add_epi64(c0, _mm512_popcnt_epi64(_mm512_xor_si512(xv1, w0)));
                c1 = _mm512_add_epi64(c1, _mm512_popcnt_epi64(_mm512_xor_si512(xv1, w1)));
            }
            _mm256_storeu_si256((__m256i *)(out0 + ob), _mm512_cvtepi64_epi32(a0));
            _mm256_storeu_si256((__m256i *)(out0 + ob + 8), _mm512_cvtepi64_epi32(a1));
            _mm256_storeu_si256((__m256i *)(out1 + ob), _mm512_cvtepi64_epi32(c0));
            _mm256_storeu_si256((__m256i *)(out1 + ob + 8), _mm512_cvtepi64_epi32(c1));
        }
    }
    for (; p < P; p++) {
        const uint64_t *x0 = patch + (size_t)p * K;
        int32_t *out0 = pc + (size_t)p * Opad;
        for (int ob = 0; ob < Opad; ob += 16) {
            __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
            for (int k = 0; k < K; k++) {
                const uint64_t *wk = w + (size_t)k * Opad + ob;
                const __m512i xv0 = _mm512_set1_epi64((long long)x0[k]);
                a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_xor_si512(xv0, _mm512_loadu_si512((const void *)wk))));
                a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(_mm512_xor_si512(xv0, _mm512_loadu_si512((const void *)(wk + 8)))));
            }
            _mm256_storeu_si256((__m256i *)(out0 + ob), _mm512_cvtepi64_epi32(a0));
            _mm256_storeu_si256((__m256i *)(out0 + ob + 8), _mm512_cvtepi64_epi32(a1));
        }
    }
}
#endif

/* What the CPU supports, read once when the module loads (CPUID traps to the hypervisor in a
 * virtual machine: microseconds per call, more than a small layer takes). */
static int supported[3];

static void detect_paths(void) {
    supported[PATH_PORTABLE] = 1;
#ifdef BITCONV_X86
    __builtin_cpu_init();
    supported[PATH_AVX2] = __builtin_cpu_supports("avx2");
    supported[PATH_AVX512] = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#endif
}

static int path_supported(int path) { return path >= PATH_PORTABLE && path <= PATH_AVX512 && supported[path]; }

static mismatch_fn path_fn(int path) {
#ifdef BITCONV_X86
    if (path == PATH_AVX512) return mismatch_avx512;
    if (path == PATH_AVX2) return mismatch_avx2;
#endif
    return mismatch_portable;
}

/* ---- sign packing: bit c%64 of word c/64 is (x[c] - mean >= 0) ---- */

static void pack_portable(const float *x, size_t positions, int C, float mean, uint64_t *out) {
    const int Cw = (C + 63) / 64;
    for (size_t p = 0; p < positions; p++) {
        const float *v = x + p * C;
        for (int word = 0; word < Cw; word++) {
            uint64_t bits = 0;
            const int c0 = word * 64, c1 = C < c0 + 64 ? C : c0 + 64;
            for (int c = c0; c < c1; c++) bits |= (uint64_t)(v[c] - mean >= 0.0f) << (c - c0);
            out[p * Cw + word] = bits;
        }
    }
}

#ifdef BITCONV_X86
/* 16 channels per compare: the mask of (x - mean >= 0) is the packed bits themselves. */
__attribute__((target("avx512f"))) static void pack_avx512(const float *x, size_t positions, int C, float mean,
                                                           uint64_t *out) {
    const int Cw = (C + 63) / 64;
    const __m512 m = _mm512_set1_ps(mean);
    if (C <= 64 && C % 16 == 0) {  /* one word per position, built in a register, stored once */
        for (size_t p = 0; p < positions; p++) {
            const float *v = x + p * C;
            uint64_t bits = 0;
            for (int c = 0; c < C; c += 16)
                bits |= (uint64_t)_mm512_cmp_ps_mask(_mm512_sub_ps(_mm512_loadu_ps(v + c), m), _mm512_setzero_ps(),
                                                     _CMP_GE_OQ) << c;
            out[p] = bits;
        }
        return;
    }
    for (size_t p = 0; p < positions; p++) {
        const float *v = x + p * C;
        uint64_t *dst = out + p * Cw;
        for (int word = 0; word < Cw; word++) dst[word] = 0;
        for (int c = 0; c < C; c += 16) {
            const int left = C - c;
            const __mmask16 valid = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            const __m512 t = _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, v + c), m);
            const uint64_t bits = _mm512_mask_cmp_ps_mask(valid, t, _mm512_setzero_ps(), _CMP_GE_OQ);
            dst[c / 64] |= bits << (c % 64);
        }
    }
}
#endif

/* The signs of float32 NHWC x (N samples of HW positions), each sample centred on its mean over
 * (H, W, C) when center: the mean is summed in double, then x - mean is taken in float32 as torch
 * does (x - x.mean()). */
static void pack_signs(const float *x, int N, size_t HW, int C, int center, int path, uint64_t *out) {
    const int Cw = (C + 63) / 64;
    for (int n = 0; n < N; n++) {
        const float *xn = x + (size_t)n * HW * C;
        float mean = 0.0f;
        if (center) {
            double sum = 0.0;
            for (size_t i = 0; i < HW * C; i++) sum += xn[i];
            mean = (float)(sum / ((double)HW * C));
        }
#ifdef BITCONV_X86
        if (path == PATH_AVX512) {
            pack_avx512(xn, HW, C, mean, out + (size_t)n * HW * Cw);
            continue;
        }
#endif
        pack_portable(xn, HW, C, mean, out + (size_t)n * HW * Cw);
    }
}

/* ---- the float epilogue, compiled for each vector width (no FMA contraction under -std=c11, so
 * every clone gives the same floats) ---- */

#if defined(BITCONV_X86) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* One output row of Wo positions: y[p][o] = act(count*a[o] + b[o] + res[p][o]) with
 * count = full[p] - 2*pc[p][o]; rows of O floats are contiguous in y and res. A multiply then an
 * add (never a fused multiply-add), so every path gives the same floats. */
static void epilogue_row(const int32_t *restrict pc, int Opad, const int32_t *restrict full, int Wo, int O,
                         const float *restrict a, const float *restrict b, const float *restrict res, int act,
                         const float *restrict slope, float *restrict y) {
    for (int p = 0; p < Wo; p++) {
        const int32_t *c = pc + (size_t)p * Opad;
        float *yp = y + (size_t)p * O;
        for (int o = 0; o < O; o++) {
            float v = (float)(full[p] - 2 * c[o]) * a[o] + b[o];
            if (res) v += res[(size_t)p * O + o];
            if (act == ACT_HARDTANH) v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
            else if (act == ACT_PRELU && v < 0.0f) v *= slope[o];
            yp[o] = v;
        }
    }
}

#ifdef BITCONV_X86
/* The same, 16 channels per vector (O a multiple of 16). */
__attribute__((target("avx512f"))) static void epilogue_row_avx512(const int32_t *restrict pc, int Opad,
                                                                   const int32_t *restrict full, int Wo, int O,
                                                                   const float *restrict a, const float *restrict b,
                                                                   const float *restrict res, int act,
                                                                   const float *restrict slope, float *restrict y) {
    const __m512 lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    for (int p = 0; p < Wo; p++) {
        const __m512i f = _mm512_set1_epi32(full[p]);
        for (int o = 0; o < O; o += 16) {
            const __m512i c = _mm512_loadu_si512((const void *)(pc + (size_t)p * Opad + o));
            const __m512 count = _mm512_cvtepi32_ps(_mm512_sub_epi32(f, _mm512_add_epi32(c, c)));
            __m512 v = _mm512_add_ps(_mm512_mul_ps(count, _mm512_loadu_ps(a + o)), _mm512_loadu_ps(b + o));
            if (res) v = _mm512_add_ps(v, _mm512_loadu_ps(res + (size_t)p * O + o));
            if (act == ACT_HARDTANH) {
                v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
            } else if (act == ACT_PRELU) {
                const __mmask16 neg = _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ);
                v = _mm512_mask_mul_ps(v, neg, v, _mm512_loadu_ps(slope + o));
            }
            _mm512_storeu_ps(y + (size_t)p * O + o, v);
        }
    }
}
#endif

/* The pooled shortcut of output position (ho, wo): AvgPool2d(s, ceil_mode=True) of x's channels
 * (the window cut by the edge averages what it covers), zero past Cin. */
static void pool_shortcut(const float *restrict xn, int H, int W, int Cin, int s, int ho, int wo, int Cout,
                          float *restrict r) {
    for (int c = 0; c < Cout; c++) r[c] = 0.0f;
    const int h1 = ho * s + s < H ? ho * s + s : H, w1 = wo * s + s < W ? wo * s + s : W;
    for (int h = ho * s; h < h1; h++)
        for (int w = wo * s; w < w1; w++) {
            const float *v = xn + ((size_t)h * W + w) * Cin;
            for (int c = 0; c < Cin; c++) r[c] += v[c];
        }
    const float count = (float)((h1 - ho * s) * (w1 - wo * s));
    for (int c = 0; c < Cin; c++) r[c] /= count;
}

typedef struct {
    int N, H, W, Cin, Cw, K, O, Opad, kh, kw, stride, pad, Ho, Wo;
} ConvShape;

enum { SHORTCUT_NONE = 0, SHORTCUT_IDENTITY = 1, SHORTCUT_POOL = 2 };

typedef struct {
    const float *a, *b, *slope;
    int act, shortcut;
} Epilogue;

/* The patch of one output position when Cin <= 64 (one word per position): the taps' bits are
 * appended in order to a word kept in a register, which is stored each time it fills -- no
 * read-modify-write of memory. A padded tap appends zeros. Writes all K words. */
static inline void gather_patch_narrow(uint64_t *restrict d, const uint64_t *restrict xn, int H, int W, int h0,
                                       int w0, int kh, int kw, int Cin) {
    uint64_t cur = 0;
    int pos = 0, q = 0;
    for (int i = 0; i < kh; i++) {
        const int h = h0 + i, hv = h >= 0 && h < H;
        const uint64_t *row = xn + (size_t)(hv ? h : 0) * W;
        for (int j = 0; j < kw; j++) {
            const int ww = w0 + j;
            const uint64_t v = hv && ww >= 0 && ww < W ? row[ww] : 0;
            cur |= v << pos;
            const int end = pos + Cin;
            if (end >= 64) {
                d[q++] = cur;
                cur = end > 64 ? v >> (64 - pos) : 0;
                pos = end - 64;
            } else {
                pos = end;
            }
        }
    }
    if (pos) d[q] = cur;
}

/* The patch of an interior position (no padded tap) when Cin divides 64: word q is the OR of taps
 * q*per .. q*per+per-1 (per = 64/Cin), tap t loaded at row t/kw, column t%kw from the window's
 * corner -- independent loads, no carried state. Inlined with constant kh, kw, Cin for the common
 * shapes (below), the loops unroll into straight loads, shifts and ORs. */
static inline __attribute__((always_inline)) void gather_patch_aligned(uint64_t *restrict d,
                                                                       const uint64_t *restrict corner, int W,
                                                                       int kh, int kw, int Cin) {
    const int per = 64 / Cin, T = kh * kw, K = (T * Cin + 63) / 64;
#pragma GCC unroll 32
    for (int q = 0; q < K; q++) {
        uint64_t word = 0;
#pragma GCC unroll 64
        for (int u = 0; u < per; u++) {
            const int t = q * per + u;
            if (t < T) word |= corner[(t / kw) * W + t % kw] << (u * Cin);
        }
        d[q] = word;
    }
}

static void gather_row_aligned(uint64_t *restrict patch, int K, const uint64_t *restrict xn, int W, int h0,
                               int wo0, int wo1, int stride, int pad, int kh, int kw, int Cin) {
    const uint64_t *base = xn + (size_t)h0 * W;
#define GATHER_CASE(KH, KW, CIN)                                                                               \
    if (kh == KH && kw == KW && Cin == CIN) {                                                                  \
        for (int wo = wo0; wo < wo1; wo++)                                                                     \
            gather_patch_aligned(patch + (size_t)wo * K, base + wo * stride - pad, W, KH, KW, CIN);            \
        return;                                                                                                \
    }
    GATHER_CASE(3, 3, 16)
    GATHER_CASE(3, 3, 32)
    GATHER_CASE(3, 3, 64)
#undef GATHER_CASE
    for (int wo = wo0; wo < wo1; wo++)
        gather_patch_aligned(patch + (size_t)wo * K, base + wo * stride - pad, W, kh, kw, Cin);
}

/* OR the Cin packed bits of one position (Cw words, zero past Cin) into the patch at bit `off`. */
static inline void put_bits(uint64_t *restrict patch, int K, const uint64_t *restrict src, int Cw, int off) {
    for (int q = 0; q < Cw; q++, off += 64) {
        const int at = off >> 6, sh = off & 63;
        patch[at] |= src[q] << sh;
        if (sh && at + 1 < K) patch[at + 1] |= src[q] >> (64 - sh);
    }
}

/* The binary layer on float32 NHWC input x: pack its signs, then one output row at a time build
 * the row's bit-packed patches (bit t*Cin + c; a padded tap's bits stay zero), count mismatches
 * with the chosen path, undo the padded taps (tap_ones: a zero tap mismatches the weights' ones)
 * and write the integer counts (ep == NULL) or act(count*a + b + shortcut).
 * Returns 0, or -1 when out of memory. */
static int conv_run(const ConvShape *s, int path, const float *x, int center, const uint64_t *w,
                    const int32_t *tap_ones, const Epilogue *ep, void *out, uint64_t *scratch) {
    const int K = s->K;
    /* the packed input: in the caller's scratch when it has one (a workspace reused across calls:
     * fresh pages cost a fault each, milliseconds per layer at batch 64 in a virtual machine) */
    uint64_t *xp = scratch ? scratch : malloc(sizeof(uint64_t) * ((size_t)s->N * s->H * s->W * s->Cw + 1));
    uint64_t *patch = malloc(sizeof(uint64_t) * (size_t)s->Wo * K);
    int32_t *pc = malloc(sizeof(int32_t) * (size_t)s->Wo * s->Opad);
    int32_t *full = malloc(sizeof(int32_t) * (size_t)s->Wo);
    int32_t *rowcorr = malloc(sizeof(int32_t) * (size_t)s->O);
    float *r = malloc(sizeof(float) * (size_t)s->Wo * s->O);
    if (!xp || !patch || !pc || !full || !rowcorr || !r) {
        if (!scratch) free(xp);
        free(patch), free(pc), free(full), free(rowcorr), free(r);
        return -1;
    }
    pack_signs(x, s->N, (size_t)s->H * s->W, s->Cin, center, path, xp);
    const mismatch_fn mismatch = path_fn(path);
    const int aligned = s->Cw == 1 && 64 % s->Cin == 0;
    for (int n = 0; n < s->N; n++) {
        const uint64_t *xn = xp + (size_t)n * s->H * s->W * s->Cw;
        const float *xf = x + (size_t)n * s->H * s->W * s->Cin;
        for (int ho = 0; ho < s->Ho; ho++) {
            const int h0 = ho * s->stride - s->pad;
            if (s->Cw == 1) {
                /* the interior positions [wo0, wo1) by whole-word loads, the edges tap by tap */
                int wo0 = s->Wo, wo1 = s->Wo;
                if (aligned && h0 >= 0 && h0 + s->kh <= s->H) {
                    wo0 = (s->pad + s->stride - 1) / s->stride;
                    wo1 = s->W - s->kw + s->pad >= 0 ? (s->W - s->kw + s->pad) / s->stride + 1 : 0;
                    if (wo1 > s->Wo) wo1 = s->Wo;
                    if (wo0 > wo1) wo0 = wo1;
                    gather_row_aligned(patch, K, xn, s->W, h0, wo0, wo1, s->stride, s->pad, s->kh, s->kw, s->Cin);
                }
                for (int wo = 0; wo < s->Wo; wo++) {
                    if (wo == wo0) wo = wo1;
                    if (wo >= s->Wo) break;
                    gather_patch_narrow(patch + (size_t)wo * K, xn, s->H, s->W, h0, wo * s->stride - s->pad, s->kh,
                                        s->kw, s->Cin);
                }
            } else {
                memset(patch, 0, sizeof(uint64_t) * (size_t)s->Wo * K);
            }
            for (int wo = 0; wo < s->Wo && s->Cw > 1; wo++) {
                const int w0 = wo * s->stride - s->pad;
                uint64_t *d = patch + (size_t)wo * K;
                for (int i = 0; i < s->kh; i++) {
                    const int h = h0 + i;
                    if (h < 0 || h >= s->H) continue;
                    for (int j = 0; j < s->kw; j++) {
                        const int ww = w0 + j;
                        if (ww < 0 || ww >= s->W) continue;
                        put_bits(d, K, xn + ((size_t)h * s->W + ww) * s->Cw, s->Cw, (i * s->kw + j) * s->Cin);
                    }
                }
            }
            mismatch(patch, s->Wo, w, K, s->Opad, pc);
            /* undo the padded taps: the valid rows [i_lo, i_hi) are the row's; a position whose
             * columns are all inside subtracts the row's own correction (once per row), an edge
             * position (at most pad of them each side) goes tap by tap */
            const int i_lo = h0 < 0 ? -h0 : 0, i_hi = h0 + s->kh > s->H ? s->H - h0 : s->kh;
            const int row_pads = i_lo > 0 || i_hi < s->kh;
            if (row_pads) {
                for (int o = 0; o < s->O; o++) rowcorr[o] = 0;
                for (int i = 0; i < s->kh; i++)
                    if (i < i_lo || i >= i_hi)
                        for (int j = 0; j < s->kw; j++) {
                            const int32_t *ones = tap_ones + (size_t)(i * s->kw + j) * s->O;
                            for (int o = 0; o < s->O; o++) rowcorr[o] += ones[o];
                        }
            }
            for (int wo = 0; wo < s->Wo; wo++) {
                const int w0 = wo * s->stride - s->pad;
                const int j_lo = w0 < 0 ? -w0 : 0, j_hi = w0 + s->kw > s->W ? s->W - w0 : s->kw;
                int32_t *row = pc + (size_t)wo * s->Opad;
                const int nvalid = (i_hi - i_lo) * (j_hi - j_lo);
                if (j_lo == 0 && j_hi == s->kw) {
                    if (row_pads)
                        for (int o = 0; o < s->O; o++) row[o] -= rowcorr[o];
                } else {
                    for (int i = 0; i < s->kh; i++)
                        for (int j = 0; j < s->kw; j++)
                            if (i < i_lo || i >= i_hi || j < j_lo || j >= j_hi) {
                                const int32_t *ones = tap_ones + (size_t)(i * s->kw + j) * s->O;
                                for (int o = 0; o < s->O; o++) row[o] -= ones[o];
                            }
                }
                full[wo] = nvalid * s->Cin;
            }
            const size_t at = ((size_t)n * s->Ho + ho) * s->Wo * s->O;
            if (!ep) {
                int32_t *counts = (int32_t *)out + at;
                for (int wo = 0; wo < s->Wo; wo++)
                    for (int o = 0; o < s->O; o++)
                        counts[(size_t)wo * s->O + o] = full[wo] - 2 * pc[(size_t)wo * s->Opad + o];
                continue;
            }
            const float *res = NULL;
            if (ep->shortcut == SHORTCUT_IDENTITY) {
                res = xf + (size_t)ho * s->W * s->Cin;
            } else if (ep->shortcut == SHORTCUT_POOL) {
                for (int wo = 0; wo < s->Wo; wo++)
                    pool_shortcut(xf, s->H, s->W, s->Cin, s->stride, ho, wo, s->O, r + (size_t)wo * s->O);
                res = r;
            }
#ifdef BITCONV_X86
            if (path == PATH_AVX512 && s->O % 16 == 0) {
                epilogue_row_avx512(pc, s->Opad, full, s->Wo, s->O, ep->a, ep->b, res, ep->act, ep->slope,
                                    (float *)out + at);
                continue;
            }
#endif
            epilogue_row(pc, s->Opad, full, s->Wo, s->O, ep->a, ep->b, res, ep->act, ep->slope, (float *)out + at);
        }
    }
    if (!scratch) free(xp);
    free(patch), free(pc), free(full), free(rowcorr), free(r);
    return 0;
}

/* The full-precision stem: a direct convolution of float32 NHWC x by w [kh][kw][Cin][Opad] (Opad
 * = O rounded up to 16, zeros past O) with zero padding, then bias and the activation; output
 * channels in blocks of 16, one accumulator each. Multiplies then adds (no fused multiply-add),
 * taps in the same order on every path, so the paths agree to the bit. */
static void float_conv_portable(const ConvShape *s, const float *restrict x, const float *restrict w,
                                const float *restrict bias, int act, const float *restrict slope, float *restrict out) {
    for (int n = 0; n < s->N; n++)
        for (int ho = 0; ho < s->Ho; ho++)
            for (int wo = 0; wo < s->Wo; wo++) {
                float *y = out + (((size_t)n * s->Ho + ho) * s->Wo + wo) * s->O;
                for (int ob = 0; ob < s->O; ob += 16) {
                    float acc[16] = {0};
                    for (int i = 0; i < s->kh; i++) {
                        const int h = ho * s->stride - s->pad + i;
                        if (h < 0 || h >= s->H) continue;
                        for (int j = 0; j < s->kw; j++) {
                            const int ww = wo * s->stride - s->pad + j;
                            if (ww < 0 || ww >= s->W) continue;
                            const float *v = x + (((size_t)n * s->H + h) * s->W + ww) * s->Cin;
                            const float *wt = w + (size_t)(i * s->kw + j) * s->Cin * s->Opad + ob;
                            for (int c = 0; c < s->Cin; c++)
                                for (int q = 0; q < 16; q++) acc[q] += v[c] * wt[(size_t)c * s->Opad + q];
                        }
                    }
                    const int nb = s->O - ob < 16 ? s->O - ob : 16;
                    for (int q = 0; q < nb; q++) {
                        float v = acc[q] + bias[ob + q];
                        if (act == ACT_HARDTANH) v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
                        else if (act == ACT_PRELU && v < 0.0f) v *= slope[ob + q];
                        y[ob + q] = v;
                    }
                }
            }
}

#ifdef BITCONV_X86
__attribute__((target("avx512f"))) static inline __m512 stem_finish(__m512 acc, const float *bias, int act,
                                                                    const float *slope) {
    __m512 v = _mm512_add_ps(acc, _mm512_loadu_ps(bias));
    if (act == ACT_HARDTANH) {
        v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f));
    } else if (act == ACT_PRELU) {
        const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
        v = _mm512_mask_mul_ps(v, neg, v, _mm512_loadu_ps(slope));
    }
    return v;
}

/* The same with one 16-float vector per block (O a multiple of 16). Interior positions go four at
 * a time (four independent accumulators: a tap's weights loaded once, no chain of dependent adds
 * through one register); each position's sum still runs over the taps in the portable order. */
__attribute__((target("avx512f"))) static void float_conv_avx512(const ConvShape *s, const float *restrict x,
                                                                 const float *restrict w, const float *restrict bias,
                                                                 int act, const float *restrict slope,
                                                                 float *restrict out) {
    const int wi0 = (s->pad + s->stride - 1) / s->stride;
    int wi1 = s->W - s->kw + s->pad >= 0 ? (s->W - s->kw + s->pad) / s->stride + 1 : 0;
    if (wi1 > s->Wo) wi1 = s->Wo;
    for (int n = 0; n < s->N; n++)
        for (int ho = 0; ho < s->Ho; ho++) {
            const int h0 = ho * s->stride - s->pad;
            const int rows_in = h0 >= 0 && h0 + s->kh <= s->H;
            for (int wo = 0; wo < s->Wo;) {
                float *y = out + (((size_t)n * s->Ho + ho) * s->Wo + wo) * s->O;
                if (rows_in && wo >= wi0 && wo + 4 <= wi1) {
                    const float *corner = x + (((size_t)n * s->H + h0) * s->W + wo * s->stride - s->pad) * s->Cin;
                    const size_t step = (size_t)s->stride * s->Cin;
                    for (int ob = 0; ob < s->O; ob += 16) {
                        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                        for (int i = 0; i < s->kh; i++)
                            for (int j = 0; j < s->kw; j++) {
                                const float *v = corner + ((size_t)i * s->W + j) * s->Cin;
                                const float *wt = w + (size_t)(i * s->kw + j) * s->Cin * s->Opad + ob;
                                for (int c = 0; c < s->Cin; c++) {
                                    const __m512 wv = _mm512_loadu_ps(wt + (size_t)c * s->Opad);
                                    a0 = _mm512_add_ps(a0, _mm512_mul_ps(_mm512_set1_ps(v[c]), wv));
                                    a1 = _mm512_add_ps(a1, _mm512_mul_ps(_mm512_set1_ps(v[step + c]), wv));
                                    a2 = _mm512_add_ps(a2, _mm512_mul_ps(_mm512_set1_ps(v[2 * step + c]), wv));
                                    a3 = _mm512_add_ps(a3, _mm512_mul_ps(_mm512_set1_ps(v[3 * step + c]), wv));
                                }
                            }
                        _mm512_storeu_ps(y + ob, stem_finish(a0, bias + ob, act, slope ? slope + ob : NULL));
                        _mm512_storeu_ps(y + s->O + ob, stem_finish(a1, bias + ob, act, slope ? slope + ob : NULL));
                        _mm512_storeu_ps(y + 2 * s->O + ob, stem_finish(a2, bias + ob, act, slope ? slope + ob : NULL));
                        _mm512_storeu_ps(y + 3 * s->O + ob, stem_finish(a3, bias + ob, act, slope ? slope + ob : NULL));
                    }
                    wo += 4;
                    continue;
                }
                for (int ob = 0; ob < s->O; ob += 16) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int i = 0; i < s->kh; i++) {
                        const int h = h0 + i;
                        if (h < 0 || h >= s->H) continue;
                        for (int j = 0; j < s->kw; j++) {
                            const int ww = wo * s->stride - s->pad + j;
                            if (ww < 0 || ww >= s->W) continue;
                            const float *v = x + (((size_t)n * s->H + h) * s->W + ww) * s->Cin;
                            const float *wt = w + (size_t)(i * s->kw + j) * s->Cin * s->Opad + ob;
                            for (int c = 0; c < s->Cin; c++)
                                acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(v[c]),
                                                                       _mm512_loadu_ps(wt + (size_t)c * s->Opad)));
                        }
                    }
                    _mm512_storeu_ps(y + ob, stem_finish(acc, bias + ob, act, slope ? slope + ob : NULL));
                }
                wo++;
            }
        }
}
#endif

static void float_conv_run(const ConvShape *s, int path, const float *x, const float *w, const float *bias, int act,
                           const float *slope, float *out) {
#ifdef BITCONV_X86
    if (path == PATH_AVX512 && s->O % 16 == 0) {
        float_conv_avx512(s, x, w, bias, act, slope, out);
        return;
    }
#endif
    float_conv_portable(s, x, w, bias, act, slope, out);
}

/* ---- Python bindings: buffers in, buffers out; every length checked against the shape ---- */

static int need(Py_buffer *buf, size_t elems, size_t itemsize, const char *name) {
    if ((size_t)buf->len < elems * itemsize) {
        PyErr_Format(PyExc_ValueError, "bitconv: %s has %zd bytes, the shape needs %zu", name, buf->len,
                     elems * itemsize);
        return 0;
    }
    return 1;
}

static int check_shape(ConvShape *s, int words) {
    if (s->N < 0 || s->H < 1 || s->W < 1 || s->Cin < 1 || s->O < 1 || s->kh < 1 || s->kw < 1 || s->stride < 1 ||
        s->pad < 0 || s->pad >= s->kh || s->pad >= s->kw || s->H > (1 << 16) || s->W > (1 << 16) ||
        s->Cin > (1 << 20) || s->O > (1 << 20) || s->kh > 64 || s->kw > 64) {
        PyErr_SetString(PyExc_ValueError, "bitconv: invalid convolution shape");
        return 0;
    }
    s->Cw = words ? (s->Cin + 63) / 64 : s->Cin;
    s->K = words ? (s->kh * s->kw * s->Cin + 63) / 64 : 0;
    s->Opad = (s->O + OPAD_MULTIPLE - 1) / OPAD_MULTIPLE * OPAD_MULTIPLE;
    s->Ho = (s->H + 2 * s->pad - s->kh) / s->stride + 1;
    s->Wo = (s->W + 2 * s->pad - s->kw) / s->stride + 1;
    if (s->Ho < 1 || s->Wo < 1) {
        PyErr_SetString(PyExc_ValueError, "bitconv: the kernel is larger than the padded input");
        return 0;
    }
    return 1;
}

static int check_path(int path) {
    if (path < PATH_PORTABLE || path > PATH_AVX512 || !path_supported(path)) {
        PyErr_Format(PyExc_ValueError, "bitconv: path %d is not supported on this CPU", path);
        return 0;
    }
    return 1;
}

static int get_vector(PyObject *obj, Py_buffer *buf, int n, const char *name) {
    if (obj == Py_None) {
        PyErr_Format(PyExc_ValueError, "bitconv: %s is missing", name);
        return 0;
    }
    return PyObject_GetBuffer(obj, buf, PyBUF_SIMPLE) == 0 && need(buf, (size_t)n, 4, name);
}

static void release(Py_buffer *bufs, int n) {
    for (int i = 0; i < n; i++)
        if (bufs[i].obj) PyBuffer_Release(&bufs[i]);
}

/* conv(x, w, tap_ones, out, N, H, W, Cin, O, k, stride, pad, path, center[, a, b, act, slope, shortcut])
 * x: float32 NHWC. Without a: out is int32 counts. With a: out is float32,
 * act(count*a + b + shortcut(x)), shortcut 0 none, 1 identity, 2 AvgPool(stride)+zero channels. */
static PyObject *py_conv(PyObject *self, PyObject *args) {
    Py_buffer bufs[7] = {{0}};
    Py_buffer *x = &bufs[0], *w = &bufs[1], *out = &bufs[2], *a = &bufs[3], *b = &bufs[4], *slope = &bufs[5],
              *ones = &bufs[6];
    PyObject *a_obj = Py_None, *b_obj = Py_None, *slope_obj = Py_None;
    ConvShape s;
    int k, path, center, act = ACT_NONE, shortcut = SHORTCUT_NONE;
    if (!PyArg_ParseTuple(args, "y*y*y*w*iiiiiiiiip|OOiOi", x, w, ones, out, &s.N, &s.H, &s.W, &s.Cin, &s.O, &k, &s.stride,
                          &s.pad, &path, &center, &a_obj, &b_obj, &act, &slope_obj, &shortcut))
        return NULL;
    s.kh = s.kw = k;
    PyObject *result = NULL;
    Epilogue ep = {0};
    const int fused = a_obj != Py_None;
    if (!check_shape(&s, 1) || !check_path(path)) goto done;
    const size_t nout = (size_t)s.N * s.Ho * s.Wo * s.O;
    if (!need(x, (size_t)s.N * s.H * s.W * s.Cin, 4, "x") || !need(w, (size_t)s.K * s.Opad, 8, "w") ||
        !need(ones, (size_t)k * k * s.O, 4, "tap_ones") || !need(out, nout, 4, "out"))
        goto done;
    if (fused) {
        if (act < ACT_NONE || act > ACT_PRELU || shortcut < SHORTCUT_NONE || shortcut > SHORTCUT_POOL) {
            PyErr_SetString(PyExc_ValueError, "bitconv: unknown activation or shortcut");
            goto done;
        }
        if (shortcut == SHORTCUT_IDENTITY && (s.stride != 1 || s.Cin != s.O || s.Ho != s.H || s.Wo != s.W)) {
            PyErr_SetString(PyExc_ValueError, "bitconv: an identity shortcut needs the output shape of the input");
            goto done;
        }
        if (shortcut == SHORTCUT_POOL &&
            (s.O < s.Cin || s.Ho != (s.H + s.stride - 1) / s.stride || s.Wo != (s.W + s.stride - 1) / s.stride)) {
            PyErr_SetString(PyExc_ValueError, "bitconv: the pooled shortcut does not give the convolution's shape");
            goto done;
        }
        if (!get_vector(a_obj, a, s.O, "a") || !get_vector(b_obj, b, s.O, "b")) goto done;
        if (act == ACT_PRELU && !get_vector(slope_obj, slope, s.O, "slope")) goto done;
        ep = (Epilogue){a->buf, b->buf, slope->buf, act, shortcut};
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = conv_run(&s, path, x->buf, center, w->buf, ones->buf, fused ? &ep : NULL, out->buf, NULL);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    release(bufs, 7);
    return result;
}

/* float_conv(x, w, bias, out, N, H, W, Cin, O, k, stride, pad, path, act[, slope]): the FP stem. */
static PyObject *py_float_conv(PyObject *self, PyObject *args) {
    Py_buffer bufs[5] = {{0}};
    Py_buffer *x = &bufs[0], *w = &bufs[1], *bias = &bufs[2], *out = &bufs[3], *slope = &bufs[4];
    PyObject *slope_obj = Py_None;
    ConvShape s;
    int k, path, act;
    if (!PyArg_ParseTuple(args, "y*y*y*w*iiiiiiiiii|O", x, w, bias, out, &s.N, &s.H, &s.W, &s.Cin, &s.O, &k,
                          &s.stride, &s.pad, &path, &act, &slope_obj))
        return NULL;
    s.kh = s.kw = k;
    PyObject *result = NULL;
    if (!check_shape(&s, 0) || !check_path(path)) goto done;
    if (!need(x, (size_t)s.N * s.H * s.W * s.Cin, 4, "x") || !need(w, (size_t)k * k * s.Cin * s.Opad, 4, "w") ||
        !need(bias, s.O, 4, "bias") || !need(out, (size_t)s.N * s.Ho * s.Wo * s.O, 4, "out"))
        goto done;
    if (act < ACT_NONE || act > ACT_PRELU) {
        PyErr_SetString(PyExc_ValueError, "bitconv: unknown activation");
        goto done;
    }
    if (act == ACT_PRELU && !get_vector(slope_obj, slope, s.O, "slope")) goto done;
    Py_BEGIN_ALLOW_THREADS
    float_conv_run(&s, path, x->buf, w->buf, bias->buf, act, slope->buf, out->buf);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    release(bufs, 5);
    return result;
}

/* pack_signs(x, out, N, HW, C, center, path): float32 [N][HW][C] -> uint64 [N][HW][Cw]. */
static PyObject *py_pack_signs(PyObject *self, PyObject *args) {
    Py_buffer bufs[2] = {{0}};
    int N, HW, C, center, path;
    if (!PyArg_ParseTuple(args, "y*w*iiipi", &bufs[0], &bufs[1], &N, &HW, &C, &center, &path)) return NULL;
    PyObject *result = NULL;
    if (N < 0 || HW < 1 || C < 1) {
        PyErr_SetString(PyExc_ValueError, "bitconv: invalid shape");
        goto done;
    }
    if (!check_path(path) || !need(&bufs[0], (size_t)N * HW * C, 4, "x") ||
        !need(&bufs[1], (size_t)N * HW * ((C + 63) / 64), 8, "out"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    pack_signs(bufs[0].buf, N, (size_t)HW, C, center, path, bufs[1].buf);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    release(bufs, 2);
    return result;
}

/* run(x, out, workspace, N, H, W, C, path, act, layers): a whole network in one call, float32 NHWC x in,
 * logits [N][classes] out, so a batch-1 inference crosses from Python to C once, not once per
 * layer. layers is a tuple of
 *   (0, w, bias, slope|None, Cin, O, k, stride, pad)                       the float stem
 *   (1, bits, tap_ones, a, b, slope|None, Cin, O, k, stride, pad, center, shortcut)   a binary layer
 *   (2, weight [C][classes], bias, C, classes)                             mean pool + classifier (last)
 * workspace: bytes for two activations and the packed input of the largest layer (reused across
 * calls by the caller, so no call touches fresh pages). Every buffer is checked against the
 * shapes the layers give before anything runs. */
#define MAX_RUN_LAYERS 256
#define RUN_BUFS 6
typedef struct {
    int kind, center, shortcut;
    ConvShape s;
    Py_buffer buf[RUN_BUFS]; /* stem: w bias slope; binary: bits ones a b slope; classifier: w bias */
} RunLayer;

static int run_buffer(PyObject *obj, Py_buffer *buf, size_t elems, size_t itemsize, const char *name, int optional) {
    if (obj == Py_None && optional) return 1;
    if (obj == Py_None) {
        PyErr_Format(PyExc_ValueError, "bitconv: %s is missing", name);
        return 0;
    }
    return PyObject_GetBuffer(obj, buf, PyBUF_SIMPLE) == 0 && need(buf, elems, itemsize, name);
}

static PyObject *py_run(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, out = {0}, work = {0};
    int N, H, W, C, path, act;
    PyObject *layers;
    if (!PyArg_ParseTuple(args, "y*w*w*iiiiiiO!", &x, &out, &work, &N, &H, &W, &C, &path, &act, &PyTuple_Type,
                          &layers))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t L = PyTuple_GET_SIZE(layers);
    RunLayer *rl = calloc(L > 0 ? (size_t)L : 1, sizeof(RunLayer));
    float *bufA = NULL, *bufB = NULL;
    uint64_t *packed = NULL;
    if (!rl) {
        PyErr_NoMemory();
        goto done;
    }
    if (L < 2 || L > MAX_RUN_LAYERS || N < 1 || H < 1 || W < 1 || C < 1 || !check_path(path) || act < ACT_NONE ||
        act > ACT_PRELU) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bitconv: invalid network or input shape");
        goto done;
    }
    if (!need(&x, (size_t)N * H * W * C, 4, "x")) goto done;
    int h = H, w = W, c = C, classes = 0;
    size_t biggest = 0, packed_words = 1;
    for (Py_ssize_t i = 0; i < L; i++) {
        PyObject *t = PyTuple_GET_ITEM(layers, i);
        RunLayer *r = &rl[i];
        PyObject *o[6] = {Py_None, Py_None, Py_None, Py_None, Py_None, Py_None};
        int k = 0;
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 1) {
            PyErr_SetString(PyExc_ValueError, "bitconv: a layer is not a tuple");
            goto done;
        }
        r->kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(t, 0));
        r->s.N = N, r->s.H = h, r->s.W = w;
        if (r->kind == 0 && i == 0) {
            if (!PyArg_ParseTuple(t, "iOOOiiiii", &r->kind, &o[0], &o[1], &o[2], &r->s.Cin, &r->s.O, &k, &r->s.stride,
                                  &r->s.pad))
                goto done;
            r->s.kh = r->s.kw = k;
            if (r->s.Cin != c || !check_shape(&r->s, 0) || !run_buffer(o[0], &r->buf[0], (size_t)k * k * c * r->s.Opad, 4, "stem weight", 0) ||
                !run_buffer(o[1], &r->buf[1], r->s.O, 4, "stem bias", 0) ||
                !run_buffer(o[2], &r->buf[2], r->s.O, 4, "stem slope", act != ACT_PRELU))
                goto fail_shape;
        } else if (r->kind == 1 && i > 0 && i < L - 1) {
            if (!PyArg_ParseTuple(t, "iOOOOOiiiiiii", &r->kind, &o[0], &o[1], &o[2], &o[3], &o[4], &r->s.Cin, &r->s.O,
                                  &k, &r->s.stride, &r->s.pad, &r->center, &r->shortcut))
                goto done;
            r->s.kh = r->s.kw = k;
            if (r->s.Cin != c || !check_shape(&r->s, 1) ||
                !run_buffer(o[0], &r->buf[0], (size_t)r->s.K * r->s.Opad, 8, "bits", 0) ||
                !run_buffer(o[1], &r->buf[1], (size_t)k * k * r->s.O, 4, "tap_ones", 0) ||
                !run_buffer(o[2], &r->buf[2], r->s.O, 4, "a", 0) || !run_buffer(o[3], &r->buf[3], r->s.O, 4, "b", 0) ||
                !run_buffer(o[4], &r->buf[4], r->s.O, 4, "slope", act != ACT_PRELU))
                goto fail_shape;
            const ConvShape *s = &r->s;
            const int ok = r->shortcut == SHORTCUT_NONE ||
                           (r->shortcut == SHORTCUT_IDENTITY && s->stride == 1 && s->Cin == s->O && s->Ho == s->H && s->Wo == s->W) ||
                           (r->shortcut == SHORTCUT_POOL && s->O >= s->Cin && s->Ho == (s->H + s->stride - 1) / s->stride &&
                            s->Wo == (s->W + s->stride - 1) / s->stride);
            if (!ok) goto fail_shape;
            if ((size_t)N * s->H * s->W * s->Cw > packed_words) packed_words = (size_t)N * s->H * s->W * s->Cw;
        } else if (r->kind == 2 && i == L - 1) {
            if (!PyArg_ParseTuple(t, "iOOii", &r->kind, &o[0], &o[1], &r->s.Cin, &r->s.O)) goto done;
            if (r->s.Cin != c || r->s.O < 1 || !run_buffer(o[0], &r->buf[0], (size_t)c * r->s.O, 4, "classifier weight", 0) ||
                !run_buffer(o[1], &r->buf[1], r->s.O, 4, "classifier bias", 0))
                goto fail_shape;
            classes = r->s.O;
            continue;
        } else {
            goto fail_shape;
        }
        h = r->s.Ho, w = r->s.Wo, c = r->s.O;
        if ((size_t)N * h * w * c > biggest) biggest = (size_t)N * h * w * c;
    }
    biggest = (biggest + 1) / 2 * 2;  /* keeps the packed words 8-byte aligned after two float buffers */
    if (!need(&out, (size_t)N * classes, 4, "out") ||
        !need(&work, 2 * biggest * sizeof(float) + packed_words * sizeof(uint64_t), 1, "workspace"))
        goto done;
    bufA = work.buf, bufB = bufA + biggest, packed = (uint64_t *)(bufB + biggest);
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    /* one sample at a time through every layer: its activations (tens of kilobytes) stay in the
     * core's caches from one layer to the next, where a whole batch's would not */
    for (int n = 0; n < N && rc == 0; n++) {
        const float *cur = (const float *)x.buf + (size_t)n * H * W * C;
        float *next = bufA;
        for (Py_ssize_t i = 0; i < L && rc == 0; i++) {
            RunLayer *r = &rl[i];
            ConvShape one = r->s;
            one.N = 1;
            if (r->kind == 0) {
                float_conv_run(&one, path, cur, r->buf[0].buf, r->buf[1].buf, act, r->buf[2].buf, next);
            } else if (r->kind == 1) {
                const Epilogue ep = {r->buf[2].buf, r->buf[3].buf, r->buf[4].buf, act, r->shortcut};
                rc = conv_run(&one, path, cur, r->center, r->buf[0].buf, r->buf[1].buf, &ep, next, packed);
            } else {  /* mean over positions, then features @ weight + bias */
                const int positions = h * w, cin = r->s.Cin, ncls = r->s.O;
                const float *wt = r->buf[0].buf, *bias = r->buf[1].buf;
                float *logits = (float *)out.buf + (size_t)n * ncls;
                float *feat = next;
                for (int ch = 0; ch < cin; ch++) feat[ch] = 0.0f;
                for (int p = 0; p < positions; p++)
                    for (int ch = 0; ch < cin; ch++) feat[ch] += cur[(size_t)p * cin + ch];
                for (int ch = 0; ch < cin; ch++) feat[ch] /= (float)positions;
                for (int m = 0; m < ncls; m++) logits[m] = bias[m];
                for (int ch = 0; ch < cin; ch++)
                    for (int m = 0; m < ncls; m++) logits[m] += feat[ch] * wt[(size_t)ch * ncls + m];
                break;
            }
            cur = next;
            next = next == bufA ? bufB : bufA;
        }
    }
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
    goto done;
fail_shape:
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bitconv: a layer does not fit the shape it is given");
done:
    if (rl)
        for (Py_ssize_t i = 0; i < L; i++) release(rl[i].buf, RUN_BUFS);
    free(rl);
    PyBuffer_Release(&x), PyBuffer_Release(&out), PyBuffer_Release(&work);
    return result;
}

static PyObject *py_supported_paths(PyObject *self, PyObject *noargs) {
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (int path = PATH_AVX512; path >= PATH_PORTABLE; path--) {
        if (!path_supported(path)) continue;
        PyObject *v = PyLong_FromLong(path);
        if (!v || PyList_Append(list, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(v);
    }
    return list;
}

static PyMethodDef methods[] = {
    {"conv", py_conv, METH_VARARGS, "The binary conv of float32 NHWC input: counts, or fused affine+shortcut+activation."},
    {"float_conv", py_float_conv, METH_VARARGS, "The full-precision stem: direct conv, bias, activation (NHWC)."},
    {"run", py_run, METH_VARARGS, "A whole binary network in one call: float32 NHWC in, logits out."},
    {"pack_signs", py_pack_signs, METH_VARARGS, "Pack the signs of float32 NHWC activations along channels."},
    {"supported_paths", py_supported_paths, METH_NOARGS, "The paths this CPU runs, fastest first (2 avx512, 1 avx2, 0 portable)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bitconv", "The 1-bit convolution kernel.", -1, methods};

PyMODINIT_FUNC PyInit__bitconv(void) {
    detect_paths();
    return PyModule_Create(&module);
}
