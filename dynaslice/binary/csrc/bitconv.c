/* The 1-bit convolution: XNOR-popcount over bit-packed NHWC activations and weights.
 *
 * Layouts (dynaslice/binary/kernel.py builds and checks them; this file trusts the shapes it is
 * given only after checking every buffer's length against them):
 *   activations  uint64 [N][H][W][Cw]      bit c%64 of word c/64 is 1 where the input is >= 0 (+1)
 *   weights      uint64 [K][Opad]          K = kh*kw*Cw taps-by-words, k = (i*kw + j)*Cw + word;
 *                                          output channels innermost (Opad = O rounded up to 16)
 *                                          so one vector holds one word of 8 (or 4) filters
 *   counts       int32  [N][Ho][Wo][O]     sum over the VALID taps of (+-1)*(+-1): a padded position
 *                                          contributes nothing, as in a zero-padded float conv
 * Bits past Cin are 0 in both operands, so they never mismatch. A padded tap is gathered as a
 * word of zeros, whose mismatch count against the weights is popcount(w): it is subtracted again
 * (wpop), so count = nvalid*Cin - 2*(mismatches over valid taps).
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

/* pc[p][o] = sum_k popcount(patch[p][k] ^ w[k][o]) for P gathered patches of K words. */
static void mismatch_portable(const uint64_t *patch, int P, const uint64_t *w, int K, int Opad, int32_t *pc) {
    for (int p = 0; p < P; p++) {
        const uint64_t *x = patch + (size_t)p * K;
        int32_t *out = pc + (size_t)p * Opad;
        for (int o = 0; o < Opad; o++) out[o] = 0;
        for (int k = 0; k < K; k++) {
            const uint64_t xv = x[k];
            const uint64_t *wk = w + (size_t)k * Opad;
            for (int o = 0; o < Opad; o++) out[o] += __builtin_popcountll(xv ^ wk[o]);
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

static int path_supported(int path) {
    if (path == PATH_PORTABLE) return 1;
#ifdef BITCONV_X86
    __builtin_cpu_init();
    if (path == PATH_AVX2) return __builtin_cpu_supports("avx2");
    if (path == PATH_AVX512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#endif
    return 0;
}

static mismatch_fn path_fn(int path) {
#ifdef BITCONV_X86
    if (path == PATH_AVX512) return mismatch_avx512;
    if (path == PATH_AVX2) return mismatch_avx2;
#endif
    return mismatch_portable;
}

typedef struct {
    int N, H, W, Cin, Cw, O, Opad, kh, kw, stride, pad, Ho, Wo;
} ConvShape;

/* Runs the convolution one output row at a time: gather the row's patches (zeros for padded taps),
 * count mismatches with the chosen path, then undo the padded taps and write counts or the fused
 * float output. Returns 0, or -1 when out of memory. */
static int conv_run(const ConvShape *s, int path, const uint64_t *x, const uint64_t *w, int32_t *counts,
                    float *fused, const float *a, const float *b, const float *res, int act, const float *slope) {
    const int K = s->kh * s->kw * s->Cw, T = s->kh * s->kw;
    uint64_t *patch = malloc(sizeof(uint64_t) * (size_t)s->Wo * K);
    int32_t *pc = malloc(sizeof(int32_t) * (size_t)s->Wo * s->Opad);
    int32_t *wpop = calloc((size_t)T * s->O, sizeof(int32_t));
    if (!patch || !pc || !wpop) {
        free(patch), free(pc), free(wpop);
        return -1;
    }
    for (int t = 0; t < T; t++)
        for (int c = 0; c < s->Cw; c++)
            for (int o = 0; o < s->O; o++)
                wpop[t * s->O + o] += __builtin_popcountll(w[(size_t)(t * s->Cw + c) * s->Opad + o]);
    const mismatch_fn mismatch = path_fn(path);
    for (int n = 0; n < s->N; n++) {
        const uint64_t *xn = x + (size_t)n * s->H * s->W * s->Cw;
        for (int ho = 0; ho < s->Ho; ho++) {
            const int h0 = ho * s->stride - s->pad;
            for (int wo = 0; wo < s->Wo; wo++) {
                const int w0 = wo * s->stride - s->pad;
                uint64_t *dst = patch + (size_t)wo * K;
                for (int i = 0; i < s->kh; i++) {
                    const int h = h0 + i;
                    for (int j = 0; j < s->kw; j++) {
                        const int ww = w0 + j;
                        uint64_t *d = dst + (size_t)(i * s->kw + j) * s->Cw;
                        if (h < 0 || h >= s->H || ww < 0 || ww >= s->W)
                            memset(d, 0, sizeof(uint64_t) * s->Cw);
                        else
                            memcpy(d, xn + ((size_t)h * s->W + ww) * s->Cw, sizeof(uint64_t) * s->Cw);
                    }
                }
            }
            mismatch(patch, s->Wo, w, K, s->Opad, pc);
            for (int wo = 0; wo < s->Wo; wo++) {
                const int w0 = wo * s->stride - s->pad;
                int32_t *row = pc + (size_t)wo * s->Opad;
                int nvalid = 0;
                for (int i = 0; i < s->kh; i++) {
                    const int h = h0 + i;
                    for (int j = 0; j < s->kw; j++) {
                        const int ww = w0 + j;
                        if (h < 0 || h >= s->H || ww < 0 || ww >= s->W) {
                            const int32_t *wp = wpop + (size_t)(i * s->kw + j) * s->O;
                            for (int o = 0; o < s->O; o++) row[o] -= wp[o];
                        } else {
                            nvalid++;
                        }
                    }
                }
                const int32_t full = nvalid * s->Cin;
                const size_t at = (((size_t)n * s->Ho + ho) * s->Wo + wo) * s->O;
                if (counts) {
                    for (int o = 0; o < s->O; o++) counts[at + o] = full - 2 * row[o];
                } else {
                    float *y = fused + at;
                    const float *r = res ? res + at : NULL;
                    for (int o = 0; o < s->O; o++) {
                        float v = (float)(full - 2 * row[o]) * a[o] + b[o];
                        if (r) v += r[o];
                        if (act == ACT_HARDTANH) v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
                        else if (act == ACT_PRELU && v < 0.0f) v *= slope[o];
                        y[o] = v;
                    }
                }
            }
        }
    }
    free(patch), free(pc), free(wpop);
    return 0;
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

static int parse_shape(ConvShape *s, int path) {
    if (s->N < 0 || s->H < 1 || s->W < 1 || s->Cin < 1 || s->O < 1 || s->kh < 1 || s->kw < 1 || s->stride < 1 ||
        s->pad < 0 || s->pad >= s->kh || s->pad >= s->kw) {
        PyErr_SetString(PyExc_ValueError, "bitconv: invalid convolution shape");
        return 0;
    }
    if (path < PATH_PORTABLE || path > PATH_AVX512 || !path_supported(path)) {
        PyErr_Format(PyExc_ValueError, "bitconv: path %d is not supported on this CPU", path);
        return 0;
    }
    s->Cw = (s->Cin + 63) / 64;
    s->Opad = (s->O + OPAD_MULTIPLE - 1) / OPAD_MULTIPLE * OPAD_MULTIPLE;
    s->Ho = (s->H + 2 * s->pad - s->kh) / s->stride + 1;
    s->Wo = (s->W + 2 * s->pad - s->kw) / s->stride + 1;
    if (s->Ho < 1 || s->Wo < 1) {
        PyErr_SetString(PyExc_ValueError, "bitconv: the kernel is larger than the padded input");
        return 0;
    }
    return 1;
}

/* conv(x, w, out, N, H, W, Cin, O, kh, kw, stride, pad, path[, a, b, residual, act, slope])
 * Without a: out is int32 counts. With a: out is float32, act(count*a + b + residual). */
static PyObject *py_conv(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, w = {0}, out = {0}, a = {0}, b = {0}, res = {0}, slope = {0};
    PyObject *a_obj = Py_None, *b_obj = Py_None, *res_obj = Py_None, *slope_obj = Py_None;
    ConvShape s;
    int path, act = ACT_NONE;
    if (!PyArg_ParseTuple(args, "y*y*w*iiiiiiiiii|OOOiO", &x, &w, &out, &s.N, &s.H, &s.W, &s.Cin, &s.O, &s.kh,
                          &s.kw, &s.stride, &s.pad, &path, &a_obj, &b_obj, &res_obj, &act, &slope_obj))
        return NULL;
    PyObject *result = NULL;
    const int fused = a_obj != Py_None;
    if (!parse_shape(&s, path)) goto done;
    const size_t nout = (size_t)s.N * s.Ho * s.Wo * s.O;
    if (!need(&x, (size_t)s.N * s.H * s.W * s.Cw, 8, "x") ||
        !need(&w, (size_t)s.kh * s.kw * s.Cw * s.Opad, 8, "w") || !need(&out, nout, 4, "out"))
        goto done;
    if (fused) {
        if (PyObject_GetBuffer(a_obj, &a, PyBUF_SIMPLE) < 0 || PyObject_GetBuffer(b_obj, &b, PyBUF_SIMPLE) < 0)
            goto done;
        if (!need(&a, s.O, 4, "a") || !need(&b, s.O, 4, "b")) goto done;
        if (res_obj != Py_None && (PyObject_GetBuffer(res_obj, &res, PyBUF_SIMPLE) < 0 || !need(&res, nout, 4, "residual")))
            goto done;
        if (act < ACT_NONE || act > ACT_PRELU) {
            PyErr_SetString(PyExc_ValueError, "bitconv: unknown activation");
            goto done;
        }
        if (act == ACT_PRELU && (slope_obj == Py_None || PyObject_GetBuffer(slope_obj, &slope, PyBUF_SIMPLE) < 0 ||
                                 !need(&slope, s.O, 4, "slope"))) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bitconv: PReLU needs its slopes");
            goto done;
        }
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = conv_run(&s, path, (const uint64_t *)x.buf, (const uint64_t *)w.buf, fused ? NULL : (int32_t *)out.buf,
                  fused ? (float *)out.buf : NULL, (const float *)a.buf, (const float *)b.buf,
                  res.buf ? (const float *)res.buf : NULL, act, (const float *)slope.buf);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_BuildValue("(ii)", s.Ho, s.Wo);
done:
    PyBuffer_Release(&x), PyBuffer_Release(&w), PyBuffer_Release(&out);
    if (a.obj) PyBuffer_Release(&a);
    if (b.obj) PyBuffer_Release(&b);
    if (res.obj) PyBuffer_Release(&res);
    if (slope.obj) PyBuffer_Release(&slope);
    return result;
}

/* pack_signs(x, out, N, HW, C, center): x float32 [N][HW][C] -> uint64 [N][HW][Cw], bit 1 where
 * x (minus the sample's mean over HW*C when center) is >= 0. Bits past C stay 0. */
static PyObject *py_pack_signs(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, out = {0};
    int N, HW, C, center;
    if (!PyArg_ParseTuple(args, "y*w*iiip", &x, &out, &N, &HW, &C, &center)) return NULL;
    PyObject *result = NULL;
    const int Cw = (C + 63) / 64;
    if (N < 0 || HW < 1 || C < 1) {
        PyErr_SetString(PyExc_ValueError, "bitconv: invalid shape");
        goto done;
    }
    if (!need(&x, (size_t)N * HW * C, 4, "x") || !need(&out, (size_t)N * HW * Cw, 8, "out")) goto done;
    Py_BEGIN_ALLOW_THREADS
    const float *xs = x.buf;
    uint64_t *o = out.buf;
    for (int n = 0; n < N; n++) {
        const float *xn = xs + (size_t)n * HW * C;
        float mean = 0.0f;
        if (center) {
            double sum = 0.0;
            for (size_t i = 0; i < (size_t)HW * C; i++) sum += xn[i];
            mean = (float)(sum / ((double)HW * C));
        }
        for (int p = 0; p < HW; p++) {
            const float *v = xn + (size_t)p * C;
            uint64_t *dst = o + ((size_t)n * HW + p) * Cw;
            for (int word = 0; word < Cw; word++) {
                uint64_t bits = 0;
                const int c0 = word * 64, c1 = C < c0 + 64 ? C : c0 + 64;
                for (int c = c0; c < c1; c++) bits |= (uint64_t)(v[c] - mean >= 0.0f) << (c - c0);
                dst[word] = bits;
            }
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&x), PyBuffer_Release(&out);
    return result;
}

/* pool_pad(x, out, N, H, W, C, stride, Cout): AvgPool2d(stride, ceil_mode=True) over float32 NHWC
 * (a window cut by the edge averages what it covers), then channels C..Cout-1 set to zero. */
static PyObject *py_pool_pad(PyObject *self, PyObject *args) {
    Py_buffer x = {0}, out = {0};
    int N, H, W, C, s, Cout;
    if (!PyArg_ParseTuple(args, "y*w*iiiiii", &x, &out, &N, &H, &W, &C, &s, &Cout)) return NULL;
    PyObject *result = NULL;
    if (N < 0 || H < 1 || W < 1 || C < 1 || s < 1 || Cout < C) {
        PyErr_SetString(PyExc_ValueError, "bitconv: invalid pooling shape");
        goto done;
    }
    const int Ho = (H + s - 1) / s, Wo = (W + s - 1) / s;
    if (!need(&x, (size_t)N * H * W * C, 4, "x") || !need(&out, (size_t)N * Ho * Wo * Cout, 4, "out")) goto done;
    Py_BEGIN_ALLOW_THREADS
    const float *xs = x.buf;
    float *o = out.buf;
    for (int n = 0; n < N; n++)
        for (int ho = 0; ho < Ho; ho++)
            for (int wo = 0; wo < Wo; wo++) {
                float *dst = o + (((size_t)n * Ho + ho) * Wo + wo) * Cout;
                memset(dst, 0, sizeof(float) * Cout);
                const int h1 = ho * s + s < H ? ho * s + s : H, w1 = wo * s + s < W ? wo * s + s : W;
                for (int h = ho * s; h < h1; h++)
                    for (int ww = wo * s; ww < w1; ww++) {
                        const float *v = xs + (((size_t)n * H + h) * W + ww) * C;
                        for (int c = 0; c < C; c++) dst[c] += v[c];
                    }
                const float inv = 1.0f / (float)((h1 - ho * s) * (w1 - wo * s));
                for (int c = 0; c < C; c++) dst[c] *= inv;
            }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(ii)", Ho, Wo);
done:
    PyBuffer_Release(&x), PyBuffer_Release(&out);
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
    {"conv", py_conv, METH_VARARGS, "XNOR-popcount convolution (counts, or fused affine+residual+activation)."},
    {"pack_signs", py_pack_signs, METH_VARARGS, "Pack the signs of float32 NHWC activations along channels."},
    {"pool_pad", py_pool_pad, METH_VARARGS, "AvgPool2d(stride, ceil_mode=True) then zero channels, NHWC."},
    {"supported_paths", py_supported_paths, METH_NOARGS, "The paths this CPU runs, fastest first (2 avx512, 1 avx2, 0 portable)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bitconv", "The 1-bit convolution kernel.", -1, methods};

PyMODINIT_FUNC PyInit__bitconv(void) { return PyModule_Create(&module); }
