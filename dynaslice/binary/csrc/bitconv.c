/* The 1-bit convolution: XNOR-popcount over bit-packed NHWC activations and weights.
 *
 * Layouts (dynaslice/binary/kernel.py builds and checks them; this file trusts the shapes it is
 * given only after checking every buffer's length against them):
 *   activations  uint64 [N][H][W][Cw]      bit c%64 of word c/64 is 1 where the input is >= 0 (+1)
 *                                          (pack_signs); a layer packs each sample of its float32
 *                                          NHWC input into padded rows instead (conv_run)
 *   patches      uint64 [K]                bit-packed im2col: bit t*Cin + c of the patch is channel c
 *                                          of tap t = i*kw + j, K = ceil(kh*kw*Cin / 64), so 16
 *                                          channels x 9 taps take 3 words, not 9
 *   weights      uint64 [K][Opad]          the same bit order per filter, output channels innermost
 *                                          (Opad = O rounded up to 16) so one vector holds one word
 *                                          of 8 (or 4) filters
 *   tap_ones     int32  [kh*kw][O]         the +1 weights of each tap and filter
 *   counts       int32  [N][Ho][Wo][O]     sum over the VALID taps of (+-1)*(+-1): a padded position
 *                                          contributes nothing, as in a zero-padded float conv
 * Bits past kh*kw*Cin are 0 in both operands, so they never mismatch. A padded tap is read as
 * zeros, whose mismatches against the weights are the tap's ones (tap_ones): with them,
 * count = base - 2*mismatches, base = nvalid*Cin + 2*(the padded taps' ones), one base per class
 * of positions (interior, each edge) built once per layer (base_table).
 *
 * The fused form writes act(count*a[o] + b[o] + residual) in float32: the binary conv's scale and
 * the folded BatchNorm in (a, b), the shortcut added, then hardtanh or PReLU -- one pass over the
 * output instead of four.
 *
 * Three paths compute the mismatch sums, chosen at run time: AVX-512 VPOPCNTDQ (four positions
 * by 16 filters in registers, the epilogue fused when O is a multiple of 16), AVX2 (nibble
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

/* NP positions against 16 filters (2 vectors of 8 words): 2*NP accumulators, each weight vector
 * loaded once per word serves NP patches; vpopcntq counts each 64-bit lane directly. Inlined with
 * a constant NP, the accumulators stay in registers. */
__attribute__((target("avx512f,avx512vpopcntdq"))) static inline __attribute__((always_inline)) void
mismatch_block_avx512(const uint64_t *x, int NP, const uint64_t *w, int K, int Opad, int ob, int32_t *out) {
    __m512i lo[4], hi[4];
    for (int q = 0; q < NP; q++) lo[q] = hi[q] = _mm512_setzero_si512();
    for (int k = 0; k < K; k++) {
        const uint64_t *wk = w + (size_t)k * Opad + ob;
        const __m512i w0 = _mm512_loadu_si512((const void *)wk), w1 = _mm512_loadu_si512((const void *)(wk + 8));
        for (int q = 0; q < NP; q++) {
            const __m512i xv = _mm512_set1_epi64((long long)x[(size_t)q * K + k]);
            lo[q] = _mm512_add_epi64(lo[q], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w0)));
            hi[q] = _mm512_add_epi64(hi[q], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w1)));
        }
    }
    for (int q = 0; q < NP; q++) {
        _mm256_storeu_si256((__m256i *)(out + (size_t)q * Opad + ob), _mm512_cvtepi64_epi32(lo[q]));
        _mm256_storeu_si256((__m256i *)(out + (size_t)q * Opad + ob + 8), _mm512_cvtepi64_epi32(hi[q]));
    }
}

/* Four positions at a time (a stride-1 row of 28 is 7 blocks), the rest one by one. */
__attribute__((target("avx512f,avx512vpopcntdq"))) static void mismatch_avx512(const uint64_t *patch, int P,
                                                                                const uint64_t *w, int K, int Opad,
                                                                                int32_t *pc) {
    int p = 0;
    for (; p + 4 <= P; p += 4)
        for (int ob = 0; ob < Opad; ob += 16)
            mismatch_block_avx512(patch + (size_t)p * K, 4, w, K, Opad, ob, pc + (size_t)p * Opad);
    for (; p < P; p++)
        for (int ob = 0; ob < Opad; ob += 16)
            mismatch_block_avx512(patch + (size_t)p * K, 1, w, K, Opad, ob, pc + (size_t)p * Opad);
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

/* The mean of one sample's count floats when center (summed in double, as torch's x.mean()), else
 * 0: the signs are then of x - mean, taken in float32 as torch does. */
static float sample_mean(const float *xn, size_t count, int center) {
    if (!center) return 0.0f;
    double sum = 0.0;
    for (size_t i = 0; i < count; i++) sum += xn[i];
    return (float)(sum / (double)count);
}

/* The signs of a run of positions (C floats each), Cw words per position. */
static void pack_run(const float *x, size_t positions, int C, float mean, int path, uint64_t *out) {
#ifdef BITCONV_X86
    if (path == PATH_AVX512) {
        pack_avx512(x, positions, C, mean, out);
        return;
    }
#endif
    pack_portable(x, positions, C, mean, out);
}

/* The signs of float32 NHWC x (N samples of HW positions), each sample centred when center. */
static void pack_signs(const float *x, int N, size_t HW, int C, int center, int path, uint64_t *out) {
    const int Cw = (C + 63) / 64;
    for (int n = 0; n < N; n++) {
        const float *xn = x + (size_t)n * HW * C;
        pack_run(xn, HW, C, sample_mean(xn, HW * C, center), path, out + (size_t)n * HW * Cw);
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
 * count = base[p][o] - 2*pc[p][o] (base: see conv_run); rows of O floats are contiguous in y and res. A multiply then an
 * add (never a fused multiply-add), so every path gives the same floats. */
static void epilogue_row(const int32_t *restrict pc, int Opad, const int32_t *const *base, int Wo, int O,
                         const float *restrict a, const float *restrict b, const float *restrict res, int act,
                         const float *restrict slope, float *restrict y) {
    for (int p = 0; p < Wo; p++) {
        const int32_t *c = pc + (size_t)p * Opad, *f = base[p];
        float *yp = y + (size_t)p * O;
        for (int o = 0; o < O; o++) {
            float v = (float)(f[o] - 2 * c[o]) * a[o] + b[o];
            if (res) v += res[(size_t)p * O + o];
            if (act == ACT_HARDTANH) v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
            else if (act == ACT_PRELU && v < 0.0f) v *= slope[o];
            yp[o] = v;
        }
    }
}

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

/* ---- the binary layer, one sample at a time ----
 *
 * A sample's signs are packed once into padded rows: row r (input row r - pad; the pad rows above
 * and below are zeros) is one bit stream over the columns -pad .. W+pad-1, bit (w + pad)*Cin + c,
 * RW words a row (one more than the bits need, so a 64-bit read that starts inside the row stays
 * inside the buffer). A kernel row's kw taps of an output position are then kw*Cin contiguous bits
 * of one row, read whole (one unaligned load per 64 bits when Cin is a multiple of 8), and the
 * kh of them appended give the position's patch in the weights' order (bit t*Cin + c): no tap
 * is gathered on its own, no padded tap is tested for. Packing per sample also keeps the
 * sample's floats in the core's cache for the shortcut that reads them again. */

static inline size_t row_words(const ConvShape *s) {
    return ((size_t)(s->W + 2 * s->pad) * s->Cin + 63) / 64 + 1;
}

/* A bit stream written in order: bits are appended to a word kept in a register, stored each time
 * it fills (no read-modify-write of memory, whose store-to-load chain would cost more than the
 * bits). */
typedef struct {
    uint64_t *d, cur;
    int pos;
} BitWriter;

/* Append the low n bits of v (0 < n <= 64; v has no bits at or above n). */
static inline __attribute__((always_inline)) void append_bits(BitWriter *bw, uint64_t v, int n) {
    bw->cur |= v << bw->pos;
    if (bw->pos + n >= 64) {
        *bw->d++ = bw->cur;
        bw->cur = bw->pos ? v >> (64 - bw->pos) : 0;
        bw->pos += n - 64;
    } else {
        bw->pos += n;
    }
}

static inline void flush_bits(BitWriter *bw) {
    if (bw->pos) *bw->d = bw->cur;
}

/* The padded rows of one sample (see above); tmp holds W*Cw words. */
static void pack_rows(const ConvShape *s, const float *xn, float mean, int path, uint64_t *rows, size_t RW,
                      uint64_t *tmp) {
    memset(rows, 0, sizeof(uint64_t) * (size_t)(s->H + 2 * s->pad) * RW);
    for (int h = 0; h < s->H; h++) {
        uint64_t *row = rows + (size_t)(h + s->pad) * RW;
        const float *xr = xn + (size_t)h * s->W * s->Cin;
        if (s->Cin % 64 == 0) {  /* positions are whole words: the packed run is the row */
            pack_run(xr, (size_t)s->W, s->Cin, mean, path, row + (size_t)s->pad * s->Cw);
            continue;
        }
        pack_run(xr, (size_t)s->W, s->Cin, mean, path, tmp);
        BitWriter bw = {row + (size_t)s->pad * s->Cin / 64, 0, (s->pad * s->Cin) % 64};
        const int last = s->Cin - (s->Cw - 1) * 64;
        for (int w = 0; w < s->W; w++) {
            const uint64_t *v = tmp + (size_t)w * s->Cw;
            for (int q = 0; q + 1 < s->Cw; q++) append_bits(&bw, v[q], 64);
            append_bits(&bw, v[s->Cw - 1], last);
        }
        flush_bits(&bw);
    }
}

/* 64 bits of a row from bit b. When C is a multiple of 8 every read starts on a byte: one
 * unaligned load (little-endian: byte j holds bits 8j..8j+7); otherwise two words shifted. */
static inline __attribute__((always_inline)) uint64_t bits_at(const uint64_t *row, size_t b, int C) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (C % 8 == 0) {
        uint64_t v;
        memcpy(&v, (const unsigned char *)row + (b >> 3), sizeof v);
        return v;
    }
#endif
    const size_t q = b >> 6;
    const unsigned sh = (unsigned)(b & 63);
    return (row[q] >> sh) | ((row[q + 1] << 1) << (63 - sh));  /* no shift by 64 when sh == 0 */
}

/* The patch of one output position: the kh segments of L = kw*C bits, each at bit b of its row
 * (rows RW words apart), appended in order into K words. Inlined with constant kh, L, C (below),
 * the loops unroll into loads, shifts and ORs with every shift known. */
static inline __attribute__((always_inline)) void gather_patch(uint64_t *restrict d, const uint64_t *restrict rows,
                                                               size_t RW, size_t b, int kh, int L, int C) {
    BitWriter bw = {d, 0, 0};
    for (int i = 0; i < kh; i++) {
        const uint64_t *row = rows + (size_t)i * RW;
        for (int done = 0; done < L; done += 64) {
            const int n = L - done < 64 ? L - done : 64;
            const uint64_t v = bits_at(row, b + (size_t)done, C);
            append_bits(&bw, n < 64 ? v & ((1ULL << n) - 1) : v, n);
        }
    }
    flush_bits(&bw);
}

/* The patches of one output row, Wo positions of K words; window: the row's first padded row. */
static void gather_row(uint64_t *restrict patch, const ConvShape *s, const uint64_t *restrict window, size_t RW) {
    const int K = s->K, st = s->stride;
#define GATHER_CASE(KH, KW, CIN)                                                                               \
    if (s->kh == KH && s->kw == KW && s->Cin == CIN) {                                                         \
        for (int wo = 0; wo < s->Wo; wo++)                                                                     \
            gather_patch(patch + (size_t)wo * K, window, RW, (size_t)wo * st * CIN, KH, KW * CIN, CIN);         \
        return;                                                                                                \
    }
    GATHER_CASE(3, 3, 16)
    GATHER_CASE(3, 3, 32)
    GATHER_CASE(3, 3, 64)
    GATHER_CASE(3, 3, 128)
#undef GATHER_CASE
    for (int wo = 0; wo < s->Wo; wo++)
        gather_patch(patch + (size_t)wo * K, window, RW, (size_t)wo * st * s->Cin, s->kh, s->kw * s->Cin, s->Cin);
}

/* What undoes the padding: a position's count is base - 2*mismatches, base = its valid taps times
 * Cin plus twice the +1 weights of its padded taps (whose zero bits mismatched them). Positions
 * share a base when their valid kernel rows [i0, i1) and columns [j0, j1) are the same: a few
 * classes per side (the interior and each edge), so the bases are built once per layer, not per
 * position or sample. */
typedef struct {
    int *rclass, *cclass; /* each output row's and column's class */
    int ncol;             /* column classes */
    int32_t *base;        /* [row class][column class][O] */
} BaseTable;

/* The classes of `out` windows (start o*stride - pad over a side of n, kernel k) by valid range. */
static int range_classes(int out, int stride, int pad, int n, int k, int *cls, int *lo, int *hi) {
    int m = 0;
    for (int o = 0; o < out; o++) {
        const int start = o * stride - pad, l = start < 0 ? -start : 0, h = start + k > n ? n - start : k;
        int c = 0;
        while (c < m && (lo[c] != l || hi[c] != h)) c++;
        if (c == m) lo[m] = l, hi[m] = h, m++;
        cls[o] = c;
    }
    return m;
}

static void free_base_table(BaseTable *t) {
    free(t->rclass), free(t->base);
    t->rclass = NULL, t->base = NULL;
}

/* Returns 0, or -1 when out of memory. */
static int base_table(const ConvShape *s, const int32_t *tap_ones, BaseTable *t) {
    const int Ho = s->Ho, Wo = s->Wo, O = s->O;
    t->base = NULL;
    t->rclass = malloc(sizeof(int) * 3 * ((size_t)Ho + Wo));
    if (!t->rclass) return -1;
    int *rlo = t->rclass + Ho, *rhi = rlo + Ho, *clo = rhi + Ho, *chi = clo + Wo;
    t->cclass = chi + Wo;
    const int nrow = range_classes(Ho, s->stride, s->pad, s->H, s->kh, t->rclass, rlo, rhi);
    t->ncol = range_classes(Wo, s->stride, s->pad, s->W, s->kw, t->cclass, clo, chi);
    t->base = malloc(sizeof(int32_t) * (size_t)nrow * t->ncol * O);
    if (!t->base) {
        free_base_table(t);
        return -1;
    }
    for (int r = 0; r < nrow; r++)
        for (int c = 0; c < t->ncol; c++) {
            int32_t *b = t->base + ((size_t)r * t->ncol + c) * O;
            for (int o = 0; o < O; o++) b[o] = (rhi[r] - rlo[r]) * (chi[c] - clo[c]) * s->Cin;
            for (int i = 0; i < s->kh; i++)
                for (int j = 0; j < s->kw; j++)
                    if (i < rlo[r] || i >= rhi[r] || j < clo[c] || j >= chi[c]) {
                        const int32_t *ones = tap_ones + ((size_t)i * s->kw + j) * O;
                        for (int o = 0; o < O; o++) b[o] += 2 * ones[o];
                    }
        }
    return 0;
}

/* conv_run's scratch: the padded rows, a packed input row, the row's patches, its mismatch counts,
 * a pointer to each position's base, the pooled shortcut. Carved from mem (when not NULL); returns its length in words. */
typedef struct {
    uint64_t *rows, *tmp, *patch;
    int32_t *pc;
    const int32_t **base;
    float *r;
} ConvScratch;

static void *carve(uint64_t *mem, size_t *used, size_t bytes) {
    void *p = mem ? mem + *used : NULL;
    *used += (bytes + 7) / 8;
    return p;
}

static size_t conv_scratch(const ConvShape *s, uint64_t *mem, ConvScratch *cs) {
    const size_t Wo = (size_t)s->Wo, O = (size_t)s->O;
    size_t used = 0;
    ConvScratch c;
    c.rows = carve(mem, &used, sizeof(uint64_t) * (size_t)(s->H + 2 * s->pad) * row_words(s));
    c.tmp = carve(mem, &used, sizeof(uint64_t) * (size_t)s->W * s->Cw);
    c.patch = carve(mem, &used, sizeof(uint64_t) * Wo * s->K);
    c.pc = carve(mem, &used, sizeof(int32_t) * Wo * s->Opad);
    c.base = carve(mem, &used, sizeof(int32_t *) * Wo);
    c.r = carve(mem, &used, sizeof(float) * Wo * O);
    if (cs) *cs = c;
    return used;
}

#ifdef BITCONV_X86
/* The AVX-512 path of one output row with the epilogue fused: NP positions x 16 filters counted
 * as in mismatch_block_avx512, then each position's 16 counts (the low halves of two vectors of
 * 64-bit sums, gathered by one permute) go straight through the epilogue in registers -- no count
 * buffer written and read back, a and b loaded once per block. The same multiply-then-add as
 * epilogue_row, so the floats are the portable path's. */
__attribute__((target("avx512f,avx512vpopcntdq"))) static inline __attribute__((always_inline)) void
fused_block_avx512(const uint64_t *x, int NP, const uint64_t *w, int K, int Opad, int ob, const int32_t *const *base,
                   int O, const float *a, const float *b, const float *res, int act, const float *slope, float *y) {
    __m512i lo[4], hi[4];
    for (int q = 0; q < NP; q++) lo[q] = hi[q] = _mm512_setzero_si512();
    for (int k = 0; k < K; k++) {
        const uint64_t *wk = w + (size_t)k * Opad + ob;
        const __m512i w0 = _mm512_loadu_si512((const void *)wk), w1 = _mm512_loadu_si512((const void *)(wk + 8));
        for (int q = 0; q < NP; q++) {
            const __m512i xv = _mm512_set1_epi64((long long)x[(size_t)q * K + k]);
            lo[q] = _mm512_add_epi64(lo[q], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w0)));
            hi[q] = _mm512_add_epi64(hi[q], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w1)));
        }
    }
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512 av = _mm512_loadu_ps(a + ob), bv = _mm512_loadu_ps(b + ob);
    const __m512 lo1 = _mm512_set1_ps(-1.0f), hi1 = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    for (int q = 0; q < NP; q++) {
        const __m512i c = _mm512_permutex2var_epi32(lo[q], even, hi[q]);
        const __m512i f = _mm512_loadu_si512((const void *)(base[q] + ob));
        const __m512 count = _mm512_cvtepi32_ps(_mm512_sub_epi32(f, _mm512_add_epi32(c, c)));
        __m512 v = _mm512_add_ps(_mm512_mul_ps(count, av), bv);
        if (res) v = _mm512_add_ps(v, _mm512_loadu_ps(res + (size_t)q * O + ob));
        if (act == ACT_HARDTANH) {
            v = _mm512_min_ps(_mm512_max_ps(v, lo1), hi1);
        } else if (act == ACT_PRELU) {
            const __mmask16 neg = _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ);
            v = _mm512_mask_mul_ps(v, neg, v, _mm512_loadu_ps(slope + ob));
        }
        _mm512_storeu_ps(y + (size_t)q * O + ob, v);
    }
}

/* One output row, O a multiple of 16: four positions at a time, the rest one by one. */
__attribute__((target("avx512f,avx512vpopcntdq"))) static void fused_row_avx512(const uint64_t *patch, int Wo,
                                                                                 const uint64_t *w, int K, int O,
                                                                                 const int32_t *const *base,
                                                                                 const Epilogue *ep,
                                                                                 const float *res, float *y) {
    int p = 0;
    for (; p + 4 <= Wo; p += 4)
        for (int ob = 0; ob < O; ob += 16)
            fused_block_avx512(patch + (size_t)p * K, 4, w, K, O, ob, base + p, O, ep->a, ep->b,
                               res ? res + (size_t)p * O : NULL, ep->act, ep->slope, y + (size_t)p * O);
    for (; p < Wo; p++)
        for (int ob = 0; ob < O; ob += 16)
            fused_block_avx512(patch + (size_t)p * K, 1, w, K, O, ob, base + p, O, ep->a, ep->b,
                               res ? res + (size_t)p * O : NULL, ep->act, ep->slope, y + (size_t)p * O);
}
#endif

/* The binary layer on float32 NHWC x: per sample, pack its signs into padded rows; per output
 * row, build the row's patches (bit t*Cin + c), count mismatches with the chosen path, and write
 * count = base - 2*mismatches (bt: base_table of this shape) as integers (ep == NULL) or
 * act(count*a + b + shortcut). scratch: conv_scratch(s) words, or NULL to allocate them.
 * Returns 0, or -1 when out of memory. */
static int conv_run(const ConvShape *s, int path, const float *x, int center, const uint64_t *w,
                    const BaseTable *bt, const Epilogue *ep, void *out, uint64_t *scratch) {
    const int K = s->K, O = s->O, Wo = s->Wo;
    uint64_t *mem = scratch ? scratch : malloc(sizeof(uint64_t) * conv_scratch(s, NULL, NULL));
    if (!mem) return -1;
    ConvScratch cs;
    conv_scratch(s, mem, &cs);
    const size_t RW = row_words(s);
    uint64_t *rows = cs.rows, *patch = cs.patch;
    int32_t *pc = cs.pc;
    const int32_t **base = cs.base;
    const mismatch_fn mismatch = path_fn(path);
    /* the AVX-512 path counts and finishes a row in one pass when the filters fill its vectors */
    const int fused = path == PATH_AVX512 && ep && O % 16 == 0;
    for (int n = 0; n < s->N; n++) {
        const float *xf = x + (size_t)n * s->H * s->W * s->Cin;
        pack_rows(s, xf, sample_mean(xf, (size_t)s->H * s->W * s->Cin, center), path, rows, RW, cs.tmp);
        for (int ho = 0; ho < s->Ho; ho++) {
            gather_row(patch, s, rows + (size_t)ho * s->stride * RW, RW);
            if (!fused) mismatch(patch, Wo, w, K, s->Opad, pc);
            const int32_t *row_base = bt->base + (size_t)bt->rclass[ho] * bt->ncol * O;
            for (int wo = 0; wo < Wo; wo++) base[wo] = row_base + (size_t)bt->cclass[wo] * O;
            const size_t at = ((size_t)n * s->Ho + ho) * Wo * O;
            if (!ep) {
                int32_t *counts = (int32_t *)out + at;
                for (int wo = 0; wo < Wo; wo++)
                    for (int o = 0; o < O; o++)
                        counts[(size_t)wo * O + o] = base[wo][o] - 2 * pc[(size_t)wo * s->Opad + o];
                continue;
            }
            const float *res = NULL;
            if (ep->shortcut == SHORTCUT_IDENTITY) {
                res = xf + (size_t)ho * s->W * s->Cin;
            } else if (ep->shortcut == SHORTCUT_POOL) {
                for (int wo = 0; wo < Wo; wo++)
                    pool_shortcut(xf, s->H, s->W, s->Cin, s->stride, ho, wo, O, cs.r + (size_t)wo * O);
                res = cs.r;
            }
#ifdef BITCONV_X86
            if (fused) {
                fused_row_avx512(patch, Wo, w, K, O, base, ep, res, (float *)out + at);
                continue;
            }
#endif
            epilogue_row(pc, s->Opad, base, Wo, O, ep->a, ep->b, res, ep->act, ep->slope, (float *)out + at);
        }
    }
    if (!scratch) free(mem);
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
    BaseTable bt;
    int rc = -1;
    if (base_table(&s, ones->buf, &bt) == 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = conv_run(&s, path, x->buf, center, w->buf, &bt, fused ? &ep : NULL, out->buf, NULL);
        Py_END_ALLOW_THREADS
        free_base_table(&bt);
    }
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
 * workspace: bytes for two activations of the largest layer (reused across calls by the caller,
 * so no call touches fresh pages); the binary layers' own scratch, one sample's packed rows and
 * patches (kilobytes), is allocated once per call. Every buffer is checked against the
 * shapes the layers give before anything runs. */
#define MAX_RUN_LAYERS 256
#define RUN_BUFS 6
typedef struct {
    int kind, center, shortcut;
    ConvShape s;
    Py_buffer buf[RUN_BUFS]; /* stem: w bias slope; binary: bits ones a b slope; classifier: w bias */
    BaseTable bt;            /* binary: its base_table */
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
    uint64_t *scratch = NULL;
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
    size_t biggest = 0, scratch_words = 1;
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
            ConvShape one = *s;
            one.N = 1;
            if (conv_scratch(&one, NULL, NULL) > scratch_words) scratch_words = conv_scratch(&one, NULL, NULL);
            if (base_table(s, r->buf[1].buf, &r->bt) < 0) {
                PyErr_NoMemory();
                goto done;
            }
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
    if (!need(&out, (size_t)N * classes, 4, "out") ||
        !need(&work, 2 * biggest * sizeof(float), 1, "workspace"))
        goto done;
    scratch = malloc(sizeof(uint64_t) * scratch_words);
    if (!scratch) {
        PyErr_NoMemory();
        goto done;
    }
    bufA = work.buf, bufB = bufA + biggest;
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
                rc = conv_run(&one, path, cur, r->center, r->buf[0].buf, &r->bt, &ep, next, scratch);
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
        for (Py_ssize_t i = 0; i < L; i++) release(rl[i].buf, RUN_BUFS), free_base_table(&rl[i].bt);
    free(rl), free(scratch);
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
