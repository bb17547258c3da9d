/* Native CPU code for mlx_voxtral's CPU backend (Linux), compiled once with the system C
 * compiler and loaded privately (RTLD_LOCAL): nothing here replaces a symbol of MLX or of any
 * other library, and the BLAS it calls is opened privately too.
 *
 * 1. float32 matmuls x @ W^T: a few rows (decoding) stream W once on all cores, where the
 *    BLAS (OpenBLAS 0.3.21) packs the whole matrix first; many rows go to the BLAS.
 * 2. Matmuls for weights MLX's CPU backend multiplies slowly -- affine 4/8-bit quantized
 *    (MLX's packing) and bfloat16 -- with float32 activations (rounded to 8 bits per group
 *    for quantized weights). A few rows (decoding) stream the weights once on all cores
 *    (OpenMP), sharing each unpacked block across up to 4 rows; many rows convert the
 *    weights tile by tile and multiply tiles with the BLAS.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
typedef void (*sgemm_t)(int, int, int, int, int, int, float, const float*, int,
                        const float*, int, float, float*, int);
typedef void (*sgemv_t)(int, int, int, int, float, const float*, int, const float*, int,
                        float, float*, int);
static sgemm_t real_sgemm;
static sgemv_t real_sgemv;

int mlx_voxtral_blas_init(const char* library) {
  void* handle = dlopen(library, RTLD_NOW | RTLD_LOCAL);
  if (!handle) return 1;
  real_sgemm = (sgemm_t)dlsym(handle, "cblas_sgemm");
  real_sgemv = (sgemv_t)dlsym(handle, "cblas_sgemv");
  return (real_sgemm && real_sgemv) ? 0 : 2;
}

#ifdef _OPENMP
#define FEW_ROWS 8
#define K_BLOCK 512
typedef float v8 __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
#define INLINE static inline __attribute__((always_inline))
INLINE v8 load8(const float* p) { v8 v; memcpy(&v, p, 32); return v; }
/* x in every lane: one broadcast ((v8){0} + x is an add, then the broadcast) */
INLINE v8 splat8(float x) { return (v8){x, x, x, x, x, x, x, x}; }
INLINE float hsum(v8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }
INLINE float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
/* bfloat16 -> float32 vectors: the bits moved to the top half of each lane */
#define BF16_WIDEN(name, vf, vh, vu)               \
  INLINE vf name(const uint16_t* p) {              \
    vh h;                                          \
    memcpy(&h, p, sizeof(h));                      \
    vu u = __builtin_convertvector(h, vu) << 16;   \
    vf f;                                          \
    memcpy(&f, &u, sizeof(f));                     \
    return f;                                      \
  }
BF16_WIDEN(bf16x8, v8, v8h, v8u)

/* a * b + c. The file is compiled with -ffp-contract=off, so every row of a result gets the
   same operations whatever other rows share the call (a stream's logits never depend on
   its batch); fused multiply-adds are explicit where the CPU has them. */
#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__FMA__) && defined(__AVX__)
INLINE v8 fma8(v8 a, v8 b, v8 c) { return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
INLINE v8 fma8(v8 a, v8 b, v8 c) { return a * b + c; }
#endif

/* Weights stream from memory once per product: asking for them 6 KB ahead (one line per
   line read, kept out of the outer caches) lets a long row run at the memory bandwidth
   where the hardware prefetcher alone fell behind (bfloat16 3072 x 9216: 18 -> 49 GB/s,
   9216 x 3072: 46 -> 52 GB/s; measured 2-6 KB, 6 KB best overall). */
#define PREFETCH_AHEAD 6144
INLINE void prefetch_ahead(const void* p) { __builtin_prefetch((const char*)p + PREFETCH_AHEAD, 0, 0); }

/* C = alpha A B^T + beta C for M <= FEW_ROWS rows: A [M, K], B [N, K] row-major. Each
   thread streams its share of B's rows, 4 at a time, in K blocks that stay in L1 while
   every pair of A rows is multiplied with them. Rows are computed independently, so a
   row's result does not depend on the other rows. */
static void few_rows_sgemm_nt(int M, int N, int K, float alpha, const float* A, int lda,
                              const float* B, int ldb, float beta, float* C, int ldc) {
  int K8 = K & ~7;
  #pragma omp parallel for schedule(static)
  for (int n0 = 0; n0 < N; n0 += 4) {
    int nb = N - n0 < 4 ? N - n0 : 4;
    v8 acc[FEW_ROWS + 1][4];
    memset(acc, 0, sizeof(acc));
    const float* b[4];
    for (int j = 0; j < 4; j++) b[j] = B + (size_t)(n0 + (j < nb ? j : 0)) * ldb;
    for (int k0 = 0; k0 < K8; k0 += K_BLOCK) {
      int k1 = k0 + K_BLOCK < K8 ? k0 + K_BLOCK : K8;
      for (int m0 = 0; m0 < M; m0 += 2) {
        const float* a0p = A + (size_t)m0 * lda;
        const float* a1p = A + (size_t)(m0 + 1 < M ? m0 + 1 : m0) * lda;
        v8 c00 = acc[m0][0], c01 = acc[m0][1], c02 = acc[m0][2], c03 = acc[m0][3];
        v8 c10 = acc[m0 + 1][0], c11 = acc[m0 + 1][1], c12 = acc[m0 + 1][2], c13 = acc[m0 + 1][3];
        for (int k = k0; k < k1; k += 8) {
          v8 b0 = load8(b[0] + k), b1 = load8(b[1] + k), b2 = load8(b[2] + k), b3 = load8(b[3] + k);
          v8 a0 = load8(a0p + k), a1 = load8(a1p + k);
          c00 = fma8(a0, b0, c00); c01 = fma8(a0, b1, c01); c02 = fma8(a0, b2, c02); c03 = fma8(a0, b3, c03);
          c10 = fma8(a1, b0, c10); c11 = fma8(a1, b1, c11); c12 = fma8(a1, b2, c12); c13 = fma8(a1, b3, c13);
        }
        acc[m0][0] = c00; acc[m0][1] = c01; acc[m0][2] = c02; acc[m0][3] = c03;
        acc[m0 + 1][0] = c10; acc[m0 + 1][1] = c11; acc[m0 + 1][2] = c12; acc[m0 + 1][3] = c13;
      }
    }
    for (int i = 0; i < M; i++) {
      const float* a = A + (size_t)i * lda;
      for (int j = 0; j < nb; j++) {
        float s = hsum(acc[i][j]);
        for (int k = K8; k < K; k++) s += a[k] * b[j][k];
        float* c = C + (size_t)i * ldc + n0 + j;
        *c = alpha * s + (beta == 0.0f ? 0.0f : beta * *c);
      }
    }
  }
}

/* ---- quantized (MLX affine layout): w [N, K * bits / 32] uint32, value j of a word at bits
   [bits * j, bits * (j + 1)); scales/biases [N, K / G], w = scale * q + bias per group.
   The kernels take 16 words (one 64-byte line) at a time: slot j of the 16 words meets 16
   contiguous values of x permuted to match (xp, rows padded to whole blocks with zeros).
   Groups are whole multiples of 8 words, so lanes 0-7 and 8-15 each lie in one group and
   the scales are applied per lane. ---- */
typedef float v16 __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
INLINE v16 splat16(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
/* Halves and joins by shuffles where the compiler has them (GCC 12, clang): with memcpy an
   address taken kept the totals in memory, a store and a load per block on their chain.
   Older GCCs get the memcpy forms (correct, slower). */
#if defined(__clang__) || __GNUC__ >= 12
INLINE v8 lo8(v16 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
INLINE v8 hi8(v16 v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); }
INLINE v16 join8(v8 lo, v8 hi) { return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
#else
INLINE v8 lo8(v16 v) { v8 r; memcpy(&r, &v, 32); return r; }
INLINE v8 hi8(v16 v) { v8 r; memcpy(&r, (const char*)&v + 32, 32); return r; }
INLINE v16 join8(v8 lo, v8 hi) { v16 r; memcpy(&r, &lo, 32); memcpy((char*)&r + 32, &hi, 32); return r; }
#endif
/* Without AVX-512 a 64-byte memcpy into a v16 became 16 scalar loads and inserts (a 4-bit
   matvec at 3 GB/s); two 32-byte loads joined stay two vector loads. */
#if defined(__AVX512F__)
INLINE v16 load16(const float* p) { v16 v; memcpy(&v, p, 64); return v; }
#else
INLINE v16 load16(const float* p) { return join8(load8(p), load8(p + 8)); }
#endif
INLINE float hsum16(v16 v) { return hsum(lo8(v) + hi8(v)); }
#if defined(__AVX512F__)
INLINE v16 fma16(v16 a, v16 b, v16 c) { return (v16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#else
INLINE v16 fma16(v16 a, v16 b, v16 c) {
  return join8(fma8(lo8(a), lo8(b), lo8(c)), fma8(hi8(a), hi8(b), hi8(c)));
}
#endif
typedef uint16_t v16h __attribute__((vector_size(32)));
BF16_WIDEN(bf16x16, v16, v16h, v16u)
#define Q(v, shift, mask) __builtin_convertvector((v16i)(((v) >> (shift)) & (mask)), v16)
/* Slot value times 2^shift, one integer op fewer than Q (exact: a few significant bits);
   the few-row kernels meet it with x scaled by 2^-shift, so the products are q x exactly. */
#define QS(v, shift, mask) __builtin_convertvector((v16i)((v) & ((mask) << (shift))), v16)
#define QT(v, shift) __builtin_convertvector((v16i)((v) >> (shift)), v16)
#define QBLOCK 16 /* words per block */

INLINE float qparam(const void* p, size_t i, int bf16) {
  return bf16 ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

/* The block at word w0 of row n: its words (a last half block padded with zeros) and the
   per-lane scale and bias (zero past the row's end). half_group[h]: the group of words
   [8 h, 8 h + 8). */
INLINE v16u qblock(const uint32_t* row, int w0, int words, int n, int KG, const int* half_group,
                   const void* scales, const void* biases, int bf16, v16* sv, v16* cv) {
  v16u v;
  int full = words - w0 >= QBLOCK;
  if (full) {
#if defined(__AVX512F__)
    memcpy(&v, row + w0, 64);
#else
    v8u a, b;
    memcpy(&a, row + w0, 32);
    memcpy(&b, row + w0 + 8, 32);
    v = (v16u)join8((v8)a, (v8)b);
#endif
  } else {
#if defined(__AVX512F__)
    v = (v16u)_mm512_maskz_loadu_epi32(0x00FF, row + w0); /* masked lanes are not read */
#else
    v = (v16u){0};
    memcpy(&v, row + w0, 32);
#endif
  }
  size_t ga = (size_t)n * KG + half_group[w0 / 8], gb = (size_t)n * KG + half_group[w0 / 8 + full];
  float sa = qparam(scales, ga, bf16), sb = full ? qparam(scales, gb, bf16) : 0.0f;
  *sv = (v16){sa, sa, sa, sa, sa, sa, sa, sa, sb, sb, sb, sb, sb, sb, sb, sb};
  if (cv) {
    float ca = qparam(biases, ga, bf16), cb = full ? qparam(biases, gb, bf16) : 0.0f;
    *cv = (v16){ca, ca, ca, ca, ca, ca, ca, ca, cb, cb, cb, cb, cb, cb, cb, cb};
  }
  return v;
}

/* y for rows [m0, m0 + R) and output n: the lanes' total plus the biases times the sums of
   x's groups (xs), for the float and the integer kernels alike. */
INLINE float qbias_dot(const void* biases, size_t at, const float* s, int KG, int bf16) {
  /* vectors (one scalar chain was as long as the row's blocks: 48-144 dependent adds) */
  v8 a0 = (v8){0}, a1 = (v8){0};
  int g = 0;
  const uint16_t* bh = (const uint16_t*)biases + at;
  const float* bf = (const float*)biases + at;
  for (; g + 16 <= KG; g += 16) {
    a0 = fma8(bf16 ? bf16x8(bh + g) : load8(bf + g), load8(s + g), a0);
    a1 = fma8(bf16 ? bf16x8(bh + g + 8) : load8(bf + g + 8), load8(s + g + 8), a1);
  }
  float dot = hsum(a0 + a1);
  for (; g < KG; g++) dot += qparam(biases, at + g, bf16) * s[g];
  return dot;
}

INLINE void qfinish(const int R, int m0, int n, int N, int KG, const float* xs, const void* biases, int bf16,
                    const v16* tot, float* y) {
  for (int r = 0; r < R; r++) {
    float bias_dot = qbias_dot(biases, (size_t)n * KG, xs + (size_t)(m0 + r) * KG, KG, bf16);
    y[(size_t)(m0 + r) * N + n] = hsum16(tot[r]) + bias_dot;
  }
}

/* qfinish for totals kept as two 8-lane halves (a 16-lane total's lanes) */
INLINE void qfinish8(const int R, int m0, int n, int N, int KG, const float* xs, const void* biases, int bf16,
                     v8 tot[][2], float* y) {
  for (int r = 0; r < R; r++) {
    float bias_dot = qbias_dot(biases, (size_t)n * KG, xs + (size_t)(m0 + r) * KG, KG, bf16);
    y[(size_t)(m0 + r) * N + n] = hsum(tot[r][0] + tot[r][1]) + bias_dot;
  }
}

#if defined(__AVX512F__)
/* Rows [m0, m0 + R) of y for output n (R <= 4 is constant after inlining): per block two
   chains (even and odd slots) scaled per lane into one total; the biases meet the sums of
   x's groups (xs) at the end. */
INLINE void qmv_part(const int R, const int bits, int m0, int n, int N, int K, int Kp, int G,
                     const float* xp, const float* xs, const uint32_t* row, const void* scales,
                     const void* biases, int bf16, const int* half_group, float* y) {
  const int vpw = 32 / bits, words = K / vpw, KG = K / G;
  v16 tot[4] = {0};
  for (int w0 = 0; w0 < words; w0 += QBLOCK) {
    prefetch_ahead(row + w0);
    v16 sv;
    v16u v = qblock(row, w0, words, n, KG, half_group, scales, biases, bf16, &sv, NULL);
    const float* xb0 = xp + (size_t)w0 * vpw;
    if (bits == 4) {
      v16 q0 = QS(v, 0, 15u), q1 = QS(v, 4, 15u), q2 = QS(v, 8, 15u), q3 = QS(v, 12, 15u);
      v16 q4 = QS(v, 16, 15u), q5 = QS(v, 20, 15u), q6 = QS(v, 24, 15u), q7 = QT(v, 28);
      for (int r = 0; r < R; r++) {
        const float* xb = xb0 + (size_t)(m0 + r) * Kp;
        v16 e = q0 * load16(xb), o = q1 * load16(xb + 16);
        e = fma16(q2, load16(xb + 32), e);
        o = fma16(q3, load16(xb + 48), o);
        e = fma16(q4, load16(xb + 64), e);
        o = fma16(q5, load16(xb + 80), o);
        e = fma16(q6, load16(xb + 96), e);
        o = fma16(q7, load16(xb + 112), o);
        tot[r] = fma16(sv, e + o, tot[r]);
      }
    } else {
      v16 q0 = QS(v, 0, 255u), q1 = QS(v, 8, 255u), q2 = QS(v, 16, 255u), q3 = QT(v, 24);
      for (int r = 0; r < R; r++) {
        const float* xb = xb0 + (size_t)(m0 + r) * Kp;
        v16 e = fma16(q2, load16(xb + 32), q0 * load16(xb));
        v16 o = fma16(q3, load16(xb + 48), q1 * load16(xb + 16));
        tot[r] = fma16(sv, e + o, tot[r]);
      }
    }
  }
  qfinish(R, m0, n, N, KG, xs, biases, bf16, tot, y);
}
#else
/* Without AVX-512 (GCC keeps 64-byte vectors in memory there: 3 GB/s of 4-bit weights):
   qmv_part's operations lane for lane, each block as two halves of 8 words. */
#define QS8(v, shift, mask) __builtin_convertvector((v8i)((v) & ((mask) << (shift))), v8)
#define QT8(v, shift) __builtin_convertvector((v8i)((v) >> (shift)), v8)
INLINE void qmv_part(const int R, const int bits, int m0, int n, int N, int K, int Kp, int G,
                     const float* xp, const float* xs, const uint32_t* row, const void* scales,
                     const void* biases, int bf16, const int* half_group, float* y) {
  const int vpw = 32 / bits, words = K / vpw, KG = K / G;
  v8 tot[4][2];
  for (int r = 0; r < R; r++) tot[r][0] = tot[r][1] = (v8){0};
  for (int w0 = 0; w0 < words; w0 += QBLOCK) {
    prefetch_ahead(row + w0);
    const float* xb0 = xp + (size_t)w0 * vpw;
    for (int h = 0; h < 2 && w0 + 8 * h < words; h++) {
      v8u v;
      memcpy(&v, row + w0 + 8 * h, 32);
      v8 sv = splat8(qparam(scales, (size_t)n * KG + half_group[w0 / 8 + h], bf16));
      if (bits == 4) {
        v8 q0 = QS8(v, 0, 15u), q1 = QS8(v, 4, 15u), q2 = QS8(v, 8, 15u), q3 = QS8(v, 12, 15u);
        v8 q4 = QS8(v, 16, 15u), q5 = QS8(v, 20, 15u), q6 = QS8(v, 24, 15u), q7 = QT8(v, 28);
        for (int r = 0; r < R; r++) {
          const float* xb = xb0 + (size_t)(m0 + r) * Kp + 8 * h;
          v8 e = q0 * load8(xb), o = q1 * load8(xb + 16);
          e = fma8(q2, load8(xb + 32), e);
          o = fma8(q3, load8(xb + 48), o);
          e = fma8(q4, load8(xb + 64), e);
          o = fma8(q5, load8(xb + 80), o);
          e = fma8(q6, load8(xb + 96), e);
          o = fma8(q7, load8(xb + 112), o);
          tot[r][h] = fma8(sv, e + o, tot[r][h]);
        }
      } else {
        v8 q0 = QS8(v, 0, 255u), q1 = QS8(v, 8, 255u), q2 = QS8(v, 16, 255u), q3 = QT8(v, 24);
        for (int r = 0; r < R; r++) {
          const float* xb = xb0 + (size_t)(m0 + r) * Kp + 8 * h;
          v8 e = fma8(q2, load8(xb + 32), q0 * load8(xb));
          v8 o = fma8(q3, load8(xb + 48), q1 * load8(xb + 16));
          tot[r][h] = fma8(sv, e + o, tot[r][h]);
        }
      }
    }
  }
  qfinish8(R, m0, n, N, KG, xs, biases, bf16, tot, y);
}
#endif

/* One function per (bits, rows), compiled apart rather than inlined into one parallel loop
   (measured: 4-bit decoder matvecs 82 -> 79 ms per step). */
#define QMV_ARGS int m0, int n, int N, int K, int Kp, int G, const float* xp, const float* xs, \
                 const uint32_t* row, const void* scales, const void* biases, int bf16, const int* half_group, float* y
#define QMV_DEF(bits, R) \
  static __attribute__((noinline)) void qmv_##bits##_##R(QMV_ARGS) { \
    qmv_part(R, bits, m0, n, N, K, Kp, G, xp, xs, row, scales, biases, bf16, half_group, y); \
  }
QMV_DEF(4, 1) QMV_DEF(4, 2) QMV_DEF(4, 3) QMV_DEF(4, 4)
QMV_DEF(8, 1) QMV_DEF(8, 2) QMV_DEF(8, 3) QMV_DEF(8, 4)
typedef void (*qmv_fn)(QMV_ARGS);

static void qmv_rows(int bits, int M, int N, int K, int Kp, int G, const float* xp, const float* xs,
                     const uint32_t* w, const void* scales, const void* biases, int bf16,
                     const int* half_group, float* y) {
  static const qmv_fn fns[2][4] = {{qmv_4_1, qmv_4_2, qmv_4_3, qmv_4_4}, {qmv_8_1, qmv_8_2, qmv_8_3, qmv_8_4}};
  const qmv_fn* f = fns[bits == 8];
  int words = K / (32 / bits);
  #pragma omp for schedule(static) nowait
  for (int n = 0; n < N; n++) {
    const uint32_t* row = w + (size_t)n * words;
    for (int m0 = 0; m0 < M; m0 += 4)
      f[(M - m0 < 4 ? M - m0 : 4) - 1](m0, n, N, K, Kp, G, xp, xs, row, scales, biases, bf16, half_group, y);
  }
}

/* ---- activations in 8 bits ----
   Every quantized path first rounds x per group of G values to x~ = d round(x / d) with
   d = max |x| / 127 (what llama.cpp's Q8 and mistral.rs's CPU matmuls do): the few-row
   kernels then multiply 4/8-bit weights with 8-bit activations in integers (AVX-512
   VNNI: 4 products per lane and instruction, exact), where float unpacking was bound by
   arithmetic at half the memory bandwidth. Many rows and CPUs without VNNI multiply the
   same x~ in float. The error x~ adds (about 0.3% of a dot product for Gaussian rows) is
   far below the weights' own rounding. */
INLINE void quantize_group(const float* x, int n, float* xt, int8_t* xi, float* d) {  /* xt may be NULL */
  float amax = 0.0f;
  for (int k = 0; k < n; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
  float inv = amax > 0.0f ? 127.0f / amax : 0.0f, step = amax / 127.0f;
  for (int k = 0; k < n; k++) {
    float q = nearbyintf(x[k] * inv);
    xi[k] = (int8_t)q;
    if (xt) xt[k] = step * q;
  }
  *d = step;
}

/* x [M, K] -> x~ (xt [M, K]; NULL for the integer kernel, which does not use it), its
   integers (xi [M, K]), scales (xd [M, K / G]) and group sums (xs [M, K / G], d times the
   integer sum: exact). */
static void quantize_rows(int M, int K, int G, const float* x, float* xt, int8_t* xi, float* xd, float* xs) {
  int KG = K / G;
  #pragma omp parallel for schedule(static) if (M > FEW_ROWS)
  for (int m = 0; m < M; m++)
    for (int g = 0; g < KG; g++) {
      size_t o = (size_t)m * K + (size_t)g * G;
      quantize_group(x + o, G, xt ? xt + o : NULL, xi + o, xd + (size_t)m * KG + g);
      int sum = 0;
      for (int k = 0; k < G; k++) sum += xi[o + k];
      xs[(size_t)m * KG + g] = xd[(size_t)m * KG + g] * (float)sum;
    }
}

/* Integer kernels: AVX-512 VNNI (u8 x s8, 4 products per 32-bit lane, exact), or AVX2: the
   same sums from pairs of u8 x s8 products in 16 bits, which stay exact for 4-bit values
   (2 x 15 x 127 fits; 8-bit weights are taken as 16 hi + lo, their nibbles) added in 32. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QVNNI 1
#define QAVX2 0
#elif defined(__AVX2__)
#define QVNNI 0
#define QAVX2 1
#else
#define QVNNI 0
#define QAVX2 0
#endif
#define QINT (QVNNI || QAVX2)

#if QVNNI || QAVX2
/* The integers of x laid out for the integer kernel, Kp bytes per row: 4-bit, per block of
   16 words, the values of the low nibbles (word i: its values 0, 2, 4, 6 at bytes 4i..4i+3)
   then of the high nibbles (1, 3, 5, 7); 8-bit, the values in order. Zeros past K. Also
   the per-lane x scale of every block (xl, 16 floats per block). */
static void layout_q8(int M, int K, int Kp, int G, int bits, const int8_t* xi, const float* xd,
                      const int* half_group, int8_t* xq, float* xl) {
  int vpw = 32 / bits, blk = QBLOCK * vpw, KG = K / G, blocks = Kp / blk, halves = K / (8 * vpw);
  for (int m = 0; m < M; m++) {
    const int8_t* src = xi + (size_t)m * K;
    int8_t* dst = xq + (size_t)m * Kp;
    for (int b = 0; b < Kp; b += blk)
      for (int i = 0; i < QBLOCK; i++)
        for (int j = 0; j < vpw; j++) {
          int k = b + vpw * i + j;
          int pos = bits == 4 ? b + (j & 1) * 64 + 4 * i + j / 2 : k;
          dst[pos] = k < K ? src[k] : 0;
        }
    for (int t = 0; t < blocks; t++)
      for (int lane = 0; lane < QBLOCK; lane++) {
        int h = 2 * t + lane / 8;
        xl[((size_t)m * blocks + t) * QBLOCK + lane] = h < halves ? xd[(size_t)m * KG + half_group[h]] : 0.0f;
      }
  }
}

#endif

#if QVNNI
/* Rows [m0, m0 + R) of y for output n, in integers: per block and lane the exact sum of
   the word's products, then scaled by the weights' and x's scales into one total. */
INLINE void qmv_int_part(const int R, const int bits, int m0, int n, int N, int K, int Kp, int G,
                         const int8_t* xq, const float* xl, const float* xs, const uint32_t* row,
                         const void* scales, const void* biases, int bf16, const int* half_group, float* y) {
  const int vpw = 32 / bits, words = K / vpw, KG = K / G, blk = QBLOCK * vpw, blocks = Kp / blk;
  const __m512i nib = _mm512_set1_epi8(15);
  v16 tot[4] = {0};
  for (int w0 = 0; w0 < words; w0 += QBLOCK) {
    prefetch_ahead(row + w0);
    v16 sv;
    v16u v = qblock(row, w0, words, n, KG, half_group, scales, biases, bf16, &sv, NULL);
    int t = w0 / QBLOCK;
    __m512i wv = (__m512i)v;
    for (int r = 0; r < R; r++) {
      const int8_t* xb = xq + (size_t)(m0 + r) * Kp + (size_t)t * blk;
      __m512i acc;
      if (bits == 4) {
        acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(wv, nib), _mm512_loadu_si512(xb));
        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(wv, 4), nib), _mm512_loadu_si512(xb + 64));
      } else {
        acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(xb));
      }
      v16 scale = sv * load16(xl + ((size_t)(m0 + r) * blocks + t) * QBLOCK);
      tot[r] = fma16(scale, (v16)_mm512_cvtepi32_ps(acc), tot[r]);
    }
  }
  qfinish(R, m0, n, N, KG, xs, biases, bf16, tot, y);
}
#elif QAVX2
/* The exact sums of 8 words' products with x's bytes, per word: 4-bit, the low nibbles
   with xlo and the high ones with xhi; 8-bit, 16 x (high nibbles) + (low nibbles) with xlo. */
INLINE __m256i dp_avx2(const int bits, __m256i w, const int8_t* xlo, const int8_t* xhi) {
  const __m256i nib = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256i lo = _mm256_and_si256(w, nib), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), nib);
  __m256i xl = _mm256_loadu_si256((const __m256i*)xlo);
  if (bits == 8)
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), ones),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xl), _mm256_set1_epi16(16)));
  __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl),
                               _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)xhi)));
  return _mm256_madd_epi16(p, ones);
}

/* AVX2: the VNNI qmv_int_part's operations lane for lane, each block as two halves of 8 words */
INLINE void qmv_int_part(const int R, const int bits, int m0, int n, int N, int K, int Kp, int G,
                         const int8_t* xq, const float* xl, const float* xs, const uint32_t* row,
                         const void* scales, const void* biases, int bf16, const int* half_group, float* y) {
  const int vpw = 32 / bits, words = K / vpw, KG = K / G, blk = QBLOCK * vpw, blocks = Kp / blk;
  v8 tot[4][2];
  for (int r = 0; r < R; r++) tot[r][0] = tot[r][1] = (v8){0};
  for (int w0 = 0; w0 < words; w0 += QBLOCK) {
    prefetch_ahead(row + w0);
    int t = w0 / QBLOCK;
    for (int h = 0; h < 2 && w0 + 8 * h < words; h++) {
      __m256i wv = _mm256_loadu_si256((const __m256i*)(row + w0 + 8 * h));
      float sw = qparam(scales, (size_t)n * KG + half_group[w0 / 8 + h], bf16);
      for (int r = 0; r < R; r++) {
        const int8_t* xb = xq + (size_t)(m0 + r) * Kp + (size_t)t * blk;
        __m256i acc = bits == 4 ? dp_avx2(4, wv, xb + 32 * h, xb + 64 + 32 * h) : dp_avx2(8, wv, xb + 32 * h, NULL);
        /* a half's 8 lanes lie in one group: one x scale (sv * xl's lanes, as one product) */
        v8 scale = splat8(sw * xl[((size_t)(m0 + r) * blocks + t) * QBLOCK + 8 * h]);
        tot[r][h] = fma8(scale, (v8)_mm256_cvtepi32_ps(acc), tot[r][h]);
      }
    }
  }
  qfinish8(R, m0, n, N, KG, xs, biases, bf16, tot, y);
}
#endif

#if QVNNI || QAVX2
#define QINT_DEF(bits, R) \
  static __attribute__((noinline)) void qint_##bits##_##R(int m0, int n, int N, int K, int Kp, int G, \
      const int8_t* xq, const float* xl, const float* xs, const uint32_t* row, const void* scales, \
      const void* biases, int bf16, const int* half_group, float* y) { \
    qmv_int_part(R, bits, m0, n, N, K, Kp, G, xq, xl, xs, row, scales, biases, bf16, half_group, y); \
  }
QINT_DEF(4, 1) QINT_DEF(4, 2) QINT_DEF(4, 3) QINT_DEF(4, 4)
QINT_DEF(8, 1) QINT_DEF(8, 2) QINT_DEF(8, 3) QINT_DEF(8, 4)
typedef void (*qint_fn)(int, int, int, int, int, int, const int8_t*, const float*, const float*, const uint32_t*,
                        const void*, const void*, int, const int*, float*);

static void qint_rows(int bits, int M, int N, int K, int Kp, int G, const int8_t* xq, const float* xl,
                      const float* xs, const uint32_t* w, const void* scales, const void* biases, int bf16,
                      const int* half_group, float* y) {
  static const qint_fn fns[2][4] = {{qint_4_1, qint_4_2, qint_4_3, qint_4_4}, {qint_8_1, qint_8_2, qint_8_3, qint_8_4}};
  const qint_fn* f = fns[bits == 8];
  int words = K / (32 / bits);
  #pragma omp for schedule(static) nowait
  for (int n = 0; n < N; n++)
    for (int m0 = 0; m0 < M; m0 += 4)
      f[(M - m0 < 4 ? M - m0 : 4) - 1](m0, n, N, K, Kp, G, xq, xl, xs, w + (size_t)n * words, scales, biases, bf16,
                                       half_group, y);
}

/* ---- many rows in integers: x~ [M, K] (8 bits per group) times 4/8-bit weights ----
   Outputs lie in vector lanes: a tile of QG_COLS weight rows is transposed once into
   scratch (word w of the tile's rows side by side: 16 x 16 transposes in registers), then
   for QG_ROWS rows of x at a time each word meets 4 of x's bytes broadcast (VNNI: 64
   products per instruction, exact in int32 over a group); once per group the integer sums
   are scaled (the weights' scale times x's, plus the weights' bias times x's group sum)
   into float totals. Every output is the same sequence of operations whatever M, the
   tiling or the other rows, so a row's result does not depend on its batch or chunking. */
#define QG_COLS 32
#define QG_ROWS 6
#ifndef QG_PF
#define QG_PF 48 /* words (128 bytes each) ahead in a laid-out tile: 6 KB, as the decoder's reads */
#endif
#ifndef QG_AHEAD
#define QG_AHEAD 64 /* words: each of the 16 rows' reads asked for 4 lines ahead */
#endif

#if QVNNI
/* 16 x 16 32-bit transpose: in[i] (16 words of row i) -> out[j] (word j of the 16 rows) */
INLINE void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; i++) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; i++) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

#endif

/* The tile of rows [n0, n0 + QG_COLS) (rows past N zero): words wt [words][QG_COLS], scales
   and biases st, bt [KG][QG_COLS] in their own precision (bfloat16 bits where bf16 is set,
   else float32). */
static void qg_tile(int n0, int N, int words, int KG, const uint32_t* w, const void* scales, const void* biases,
                    int bf16, uint32_t* wt, void* st, void* bt) {
  int w16 = QVNNI ? words & ~15 : 0; /* AVX2: the plain loop below (tiles are laid out once) */
  for (int h = 0; h < QG_COLS; h += 16) {
    const uint32_t* rows[16];
    for (int i = 0; i < 16; i++) rows[i] = n0 + h + i < N ? w + (size_t)(n0 + h + i) * words : NULL;
#if QVNNI
    for (int w0 = 0; w0 < w16; w0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; i++) {
        if (!rows[i]) { r[i] = _mm512_setzero_si512(); continue; }
        __builtin_prefetch(rows[i] + w0 + QG_AHEAD, 0, 0);
        r[i] = _mm512_loadu_si512(rows[i] + w0);
      }
      transpose16(r);
      for (int j = 0; j < 16; j++) _mm512_storeu_si512(wt + (size_t)(w0 + j) * QG_COLS + h, r[j]);
    }
#endif
    for (int j = w16; j < words; j++)
      for (int i = 0; i < 16; i++) wt[(size_t)j * QG_COLS + h + i] = rows[i] ? rows[i][j] : 0;
  }
  for (int c = 0; c < QG_COLS; c++)
    for (int g = 0; g < KG; g++) {
      int in = n0 + c < N;
      size_t at = (size_t)g * QG_COLS + c, from = (size_t)(n0 + c) * KG + g;
      if (bf16) {
        ((uint16_t*)st)[at] = in ? ((const uint16_t*)scales)[from] : 0;
        ((uint16_t*)bt)[at] = in ? ((const uint16_t*)biases)[from] : 0;
      } else {
        ((float*)st)[at] = in ? ((const float*)scales)[from] : 0.0f;
        ((float*)bt)[at] = in ? ((const float*)biases)[from] : 0.0f;
      }
    }
}

#if QVNNI
/* 16 of a tile's scales or biases as float32 (SB: stored as bfloat16 bits, which widen
   exactly; they are read with the weights, an eighth of a 4-bit tile's bytes at float32) */
INLINE v16 qg_param16(const int SB, const void* p, size_t i) {
  return SB ? bf16x16((const uint16_t*)p + i) : load16((const float*)p + i);
}

/* R rows of x~ (bytes xg [R][K] in the tile's word order, scales xd and group sums xs
   [R][KG]) times one tile -> y [R][N] columns [n0, n0 + cols). */
INLINE void qg_rows(const int R, const int bits, const int SB, int K, int G, int N, int n0, int cols,
                    const int8_t* xg, const float* xd, const float* xs, const uint32_t* wt, const void* st,
                    const void* bt, float* y) {
  const int vpw = 32 / bits, KG = K / G, wpg = G / vpw;
  const __m512i nib = _mm512_set1_epi8(15);
  v16 tot[QG_ROWS][2];
  for (int r = 0; r < R; r++) tot[r][0] = tot[r][1] = (v16){0};
  for (int g = 0; g < KG; g++) {
    __m512i acc[QG_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    for (int w = g * wpg; w < (g + 1) * wpg; w++) {
      /* a laid-out tile streams from memory: ask for its lines QG_PF words ahead */
      __builtin_prefetch(wt + (size_t)(w + QG_PF) * QG_COLS, 0, 0);
      __builtin_prefetch(wt + (size_t)(w + QG_PF) * QG_COLS + 16, 0, 0);
      __m512i v0 = _mm512_loadu_si512(wt + (size_t)w * QG_COLS), v1 = _mm512_loadu_si512(wt + (size_t)w * QG_COLS + 16);
      if (bits == 4) {
        __m512i l0 = _mm512_and_si512(v0, nib), h0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), nib);
        __m512i l1 = _mm512_and_si512(v1, nib), h1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), nib);
        for (int r = 0; r < R; r++) {
          int32_t lo, hi;
          memcpy(&lo, xg + (size_t)r * K + 8 * w, 4);
          memcpy(&hi, xg + (size_t)r * K + 8 * w + 4, 4);
          __m512i xl = _mm512_set1_epi32(lo), xh = _mm512_set1_epi32(hi);
          acc[r][0] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][0], l0, xl), h0, xh);
          acc[r][1] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][1], l1, xl), h1, xh);
        }
      } else {
        for (int r = 0; r < R; r++) {
          int32_t q;
          memcpy(&q, xg + (size_t)r * K + 4 * w, 4);
          __m512i xq = _mm512_set1_epi32(q);
          acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], v0, xq);
          acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], v1, xq);
        }
      }
    }
    const size_t es = SB ? 2 : 4, ahead = (size_t)(g + 4) * QG_COLS * es;
    __builtin_prefetch((const char*)st + ahead, 0, 0);
    __builtin_prefetch((const char*)bt + ahead, 0, 0);
    if (!SB) {
      __builtin_prefetch((const char*)st + ahead + 64, 0, 0);
      __builtin_prefetch((const char*)bt + ahead + 64, 0, 0);
    }
    v16 s0 = qg_param16(SB, st, (size_t)g * QG_COLS), s1 = qg_param16(SB, st, (size_t)g * QG_COLS + 16);
    v16 b0 = qg_param16(SB, bt, (size_t)g * QG_COLS), b1 = qg_param16(SB, bt, (size_t)g * QG_COLS + 16);
    for (int r = 0; r < R; r++) {
      float d = xd[(size_t)r * KG + g], sum = xs[(size_t)r * KG + g];
      tot[r][0] += fma16(b0, (v16){0} + sum, (v16)_mm512_cvtepi32_ps(acc[r][0]) * (s0 * d));
      tot[r][1] += fma16(b1, (v16){0} + sum, (v16)_mm512_cvtepi32_ps(acc[r][1]) * (s1 * d));
    }
  }
  for (int r = 0; r < R; r++) {
    float* yr = y + (size_t)r * N + n0;
    if (cols == QG_COLS) {
      memcpy(yr, &tot[r][0], 64);
      memcpy(yr + 16, &tot[r][1], 64);
    } else {
      float out[QG_COLS];
      memcpy(out, &tot[r][0], 64);
      memcpy(out + 16, &tot[r][1], 64);
      memcpy(yr, out, sizeof(float) * cols);
    }
  }
}

#else
/* 8 of a tile's scales or biases as float32 (SB: bfloat16 bits) */
INLINE v8 qg_param8(const int SB, const void* p, size_t i) {
  return SB ? bf16x8((const uint16_t*)p + i) : load8((const float*)p + i);
}

/* qg_rows with AVX2: the same operations lane for lane, each group's words (in L1 once read)
   passed over for the tile's 32 columns, 16 at a time at 4 bits (x's broadcasts shared by
   two vectors), 8 at 8 bits (whose two sums per vector would not fit in 16 registers). Per
   row the 16-bit pair sums of 4 words add up before widening (each at most 2 x 2 x 15 x 127,
   four of them 30480 < 32767: exact); 8-bit words as 16 x (high nibbles) + (low nibbles). */
INLINE void qg_rows(const int R, const int bits, const int SB, int K, int G, int N, int n0, int cols,
                    const int8_t* xg, const float* xd, const float* xs, const uint32_t* wt, const void* st,
                    const void* bt, float* y) {
  const int vpw = 32 / bits, KG = K / G, wpg = G / vpw, quarters = (cols + 7) / 8;
  const __m256i nib = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
  v8 tot[QG_ROWS][QG_COLS / 8];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < QG_COLS / 8; c++) tot[r][c] = (v8){0};
  for (int g = 0; g < KG; g++) {
    /* a laid-out tile streams from memory: ask for its lines QG_PF words ahead */
    for (int w = g * wpg; w < (g + 1) * wpg; w++) {
      __builtin_prefetch(wt + (size_t)(w + QG_PF) * QG_COLS, 0, 0);
      __builtin_prefetch(wt + (size_t)(w + QG_PF) * QG_COLS + 16, 0, 0);
    }
    v8 dv[QG_ROWS], sv[QG_ROWS];
    for (int r = 0; r < R; r++) dv[r] = splat8(xd[(size_t)r * KG + g]), sv[r] = splat8(xs[(size_t)r * KG + g]);
    const int NV = bits == 4 ? 2 : 1; /* vectors of 8 columns per pass (a pass past cols reads the tile's zeros) */
    for (int c = 0; c < quarters; c += NV) {
      __m256i acc[QG_ROWS][2];
      for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
      for (int w4 = g * wpg; w4 < (g + 1) * wpg; w4 += 4) {
        __m256i p[QG_ROWS][2];
        for (int r = 0; r < R; r++) p[r][0] = p[r][1] = _mm256_setzero_si256();
        for (int w = w4; w < w4 + 4; w++) {
          __m256i lo[2], hi[2];
          for (int j = 0; j < NV; j++) {
            __m256i v = _mm256_loadu_si256((const __m256i*)(wt + (size_t)w * QG_COLS + 8 * (c + j)));
            lo[j] = _mm256_and_si256(v, nib), hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
          }
          for (int r = 0; r < R; r++) {
            if (bits == 4) {
              int32_t xl, xh;
              memcpy(&xl, xg + (size_t)r * K + 8 * w, 4);
              memcpy(&xh, xg + (size_t)r * K + 8 * w + 4, 4);
              __m256i bl = _mm256_set1_epi32(xl), bh = _mm256_set1_epi32(xh);
              for (int j = 0; j < 2; j++)
                p[r][j] = _mm256_add_epi16(p[r][j], _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], bl),
                                                                     _mm256_maddubs_epi16(hi[j], bh)));
            } else {
              int32_t xq;
              memcpy(&xq, xg + (size_t)r * K + 4 * w, 4);
              __m256i xb = _mm256_set1_epi32(xq);
              p[r][0] = _mm256_add_epi16(p[r][0], _mm256_maddubs_epi16(lo[0], xb));
              p[r][1] = _mm256_add_epi16(p[r][1], _mm256_maddubs_epi16(hi[0], xb));
            }
          }
        }
        for (int r = 0; r < R; r++) {
          if (bits == 4) {
            for (int j = 0; j < 2; j++) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(p[r][j], ones));
          } else {
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p[r][0], ones));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p[r][1], sixteen));
          }
        }
      }
      for (int j = 0; j < NV; j++) {
        const size_t at = (size_t)g * QG_COLS + 8 * (c + j);
        v8 sc = qg_param8(SB, st, at), bi = qg_param8(SB, bt, at);
        for (int r = 0; r < R; r++)
          tot[r][c + j] += fma8(bi, sv[r], (v8)_mm256_cvtepi32_ps(acc[r][j]) * (sc * dv[r]));
      }
    }
  }
  for (int r = 0; r < R; r++) {
    float out[QG_COLS];
    memcpy(out, tot[r], sizeof(out));
    memcpy(y + (size_t)r * N + n0, out, sizeof(float) * cols);
  }
}
#endif

#define QG_DEF(bits, R, SB) \
  static __attribute__((noinline)) void qg_##bits##_##R##_##SB(int K, int G, int N, int n0, int cols, \
      const int8_t* xg, const float* xd, const float* xs, const uint32_t* wt, const void* st, const void* bt, \
      float* y) { \
    qg_rows(R, bits, SB, K, G, N, n0, cols, xg, xd, xs, wt, st, bt, y); \
  }
#define QG_DEFS(bits, SB) \
  QG_DEF(bits, 1, SB) QG_DEF(bits, 2, SB) QG_DEF(bits, 3, SB) QG_DEF(bits, 4, SB) QG_DEF(bits, 5, SB) QG_DEF(bits, 6, SB)
QG_DEFS(4, 0) QG_DEFS(4, 1) QG_DEFS(8, 0) QG_DEFS(8, 1)
typedef void (*qg_fn)(int, int, int, int, int, const int8_t*, const float*, const float*, const uint32_t*,
                      const void*, const void*, float*);

/* x~'s bytes in the order the tiles' words meet them: 4-bit, per word of 8 values, its even
   values (the low nibbles) then its odd ones; 8-bit, as they are. */
static void qg_layout(int M, int K, int bits, const int8_t* xi, int8_t* xg) {
  #pragma omp parallel for schedule(static) if (M > FEW_ROWS)
  for (int m = 0; m < M; m++) {
    const int8_t* s = xi + (size_t)m * K;
    int8_t* d = xg + (size_t)m * K;
    if (bits == 8) { memcpy(d, s, K); continue; }
    for (int k = 0; k < K; k += 8)
      for (int j = 0; j < 4; j++) d[k + j] = s[k + 2 * j], d[k + 4 + j] = s[k + 2 * j + 1];
  }
}

/* y_i = x~ @ dequantize(w_i)^T for `count` matrices, every column tile a task. Returns 2
   without memory for the scratch. */
static int qgemm(int count, int M, const int* Ns, int K, int G, int bits, const int8_t* xg, const float* xd,
                 const float* xs, const uint32_t* const* ws, const void* const* scales_, const void* const* biases_,
                 int bf16, const uint32_t* const* packed_w, const void* const* packed_s, float* const* ys) {
#define QG_FNS(bits, SB) {qg_##bits##_1_##SB, qg_##bits##_2_##SB, qg_##bits##_3_##SB, qg_##bits##_4_##SB, \
                          qg_##bits##_5_##SB, qg_##bits##_6_##SB}
  static const qg_fn fns[2][2][QG_ROWS] = {{QG_FNS(4, 0), QG_FNS(4, 1)}, {QG_FNS(8, 0), QG_FNS(8, 1)}};
  const qg_fn* f = fns[bits == 8][bf16 != 0];
  int words = K / (32 / bits), KG = K / G, tasks = 0, failed = 0;
  size_t es = bf16 ? 2 : 4; /* bytes of a tile's scale or bias */
  for (int i = 0; i < count; i++) tasks += (Ns[i] + QG_COLS - 1) / QG_COLS;
  #pragma omp parallel
  {
    uint32_t* scratch = packed_w ? NULL : malloc(sizeof(uint32_t) * (size_t)words * QG_COLS);
    float* scratch_s = packed_w ? NULL : malloc(sizeof(float) * (size_t)KG * QG_COLS * 2);
    if (!packed_w && (!scratch || !scratch_s)) failed = 1;
    /* static: each thread streams one contiguous run of tiles (laid-out tiles for 4 rows
       from memory: 13-16 ms per 32 encoder layers against 17-21 dynamic, BENCHMARKS.md) */
    #pragma omp for schedule(static)
    for (int t = 0; t < tasks; t++) {
      if (!packed_w && (!scratch || !scratch_s)) continue;
      int i = 0, tile = t;
      while (tile >= (Ns[i] + QG_COLS - 1) / QG_COLS) tile -= (Ns[i++] + QG_COLS - 1) / QG_COLS;
      int N = Ns[i], n0 = tile * QG_COLS, cols = N - n0 < QG_COLS ? N - n0 : QG_COLS;
      const uint32_t* wt = scratch;
      const char* st = (const char*)scratch_s;
      if (packed_w) {  /* the tile as qg_pack laid it out once */
        wt = packed_w[i] + (size_t)tile * words * QG_COLS;
        st = (const char*)packed_s[i] + (size_t)tile * KG * QG_COLS * 2 * es;
      } else {
        qg_tile(n0, N, words, KG, ws[i], scales_[i], biases_[i], bf16, scratch, scratch_s,
                (char*)scratch_s + (size_t)KG * QG_COLS * es);
      }
      for (int m0 = 0; m0 < M; m0 += QG_ROWS) {
        int R = M - m0 < QG_ROWS ? M - m0 : QG_ROWS;
        f[R - 1](K, G, N, n0, cols, xg + (size_t)m0 * K, xd + (size_t)m0 * KG, xs + (size_t)m0 * KG, wt, st,
                 st + (size_t)KG * QG_COLS * es, ys[i] + (size_t)m0 * N);
      }
    }
    free(scratch), free(scratch_s);
  }
  return failed ? 2 : 0;
}
#endif

/* The integer tiles of a 4/8-bit matrix w [N, K] laid out once, as qgemm would transpose
   them on every call: tile t's words at wt + t * words * QG_COLS, its scales and biases (in
   their own precision: bfloat16 bits where bf16 is set, else float32) at element
   t * KG * QG_COLS * 2 of st (the N rows padded to whole tiles with zeros). The
   many-row products then read them as they are, which for a few rows (a live stream's
   encoder) spares the transposes that would otherwise cost more than the products. Returns
   the tile width, or 0 where the CPU has neither VNNI nor AVX2 (no tiles) or the format is not taken. */
int mlx_voxtral_qg_pack(int N, int K, int G, int bits, const uint32_t* w, const void* scales, const void* biases,
                        int bf16, uint32_t* wt, void* st) {
#if QVNNI || QAVX2
  int vpw = 32 / bits;
  if ((bits != 4 && bits != 8) || K % G || G % (8 * vpw)) return 0;
  if (!wt || !st) return QG_COLS;
  int words = K / vpw, KG = K / G, tiles = (N + QG_COLS - 1) / QG_COLS;
  size_t es = bf16 ? 2 : 4;
  #pragma omp parallel for schedule(dynamic)
  for (int t = 0; t < tiles; t++) {
    char* s = (char*)st + (size_t)t * KG * QG_COLS * 2 * es;
    qg_tile(t * QG_COLS, N, words, KG, w, scales, biases, bf16, wt + (size_t)t * words * QG_COLS, s,
            s + (size_t)KG * QG_COLS * es);
  }
  return QG_COLS;
#else
  (void)N, (void)K, (void)G, (void)bits, (void)w, (void)scales, (void)biases, (void)bf16, (void)wt, (void)st;
  return 0;
#endif
}

/* x with each block's values reordered (value vpw * i + j of a block, word i slot j, goes
   to j * 16 + i) so that one unpacked slot of 16 words meets 16 contiguous values; rows
   padded to Kp with zeros. */
static void permute_blocks(int M, int K, int Kp, int bits, const float* x, float* xp, int prescale) {
  int vpw = 32 / bits, blk = QBLOCK * vpw;
  #pragma omp parallel for schedule(static) if (M > FEW_ROWS)
  for (int m = 0; m < M; m++)
    for (int b = 0; b < Kp; b += blk)
      for (int i = 0; i < QBLOCK; i++)
        for (int j = 0; j < vpw; j++) {
          int k = b + vpw * i + j;
          float v = k < K ? x[(size_t)m * K + k] : 0.0f;
          /* slot j's values come as q 2^(bits j) (QS), except the top slot (QT) */
          xp[(size_t)m * Kp + b + j * QBLOCK + i] = prescale && j < vpw - 1 ? v * (1.0f / (float)(1u << (bits * j))) : v;
        }
}

/* Many rows: dequantize TILE weight rows at a time (all cores, in the permuted order, so
   x is permuted the same way) into a buffer that stays in cache, and multiply it with the
   BLAS. No full-size float copy of the weights is ever made. */
#define TILE 512
INLINE void dequantize_tile(const int bits, int n0, int nb, int K, int Kp, int G, const uint32_t* w,
                            const void* scales, const void* biases, int bf16, const int* half_group,
                            float* out) {
  const int vpw = 32 / bits, words = K / vpw, KG = K / G;
  #pragma omp parallel for schedule(static)
  for (int r = 0; r < nb; r++) {
    const uint32_t* row = w + (size_t)(n0 + r) * words;
    float* o = out + (size_t)r * Kp;
    for (int w0 = 0; w0 < words; w0 += QBLOCK) {
      v16 s, c;
      v16u v = qblock(row, w0, words, n0 + r, KG, half_group, scales, biases, bf16, &s, &c);
      float* ob = o + (size_t)w0 * vpw;
      for (int j = 0; j < vpw; j++) {
        v16 q = (bits == 4 ? Q(v, 4 * j, 15u) : Q(v, 8 * j, 255u)) * s + c;
        memcpy(ob + QBLOCK * j, &q, 64);
      }
    }
  }
}

static void dequantize_matmul(int bits, int M, int N, int K, int Kp, int G, const float* xp, const uint32_t* w,
                              const void* scales, const void* biases, int bf16, const int* half_group,
                              float* tile, float* y) {
  for (int n0 = 0; n0 < N; n0 += TILE) {
    int nb = N - n0 < TILE ? N - n0 : TILE;
    if (bits == 4) dequantize_tile(4, n0, nb, K, Kp, G, w, scales, biases, bf16, half_group, tile);
    else dequantize_tile(8, n0, nb, K, Kp, G, w, scales, biases, bf16, half_group, tile);
    real_sgemm(RowMajor, NoTrans, Trans, M, nb, Kp, 1.0f, xp, Kp, tile, Kp, 0.0f, y + n0, N);
  }
}

/* y_i [M, N_i] = x~ [M, K] @ dequantize(w_i)^T for `count` matrices of one format (a layer's
   q, k and v, say), x~ being x in 8 bits per group (above): x is rounded once and the
   few-row kernels of all matrices share one parallel region (threads move to the next
   matrix without waiting). Up to MANY_ROWS rows go through the few-row kernels FEW_ROWS
   at a time (integer with VNNI or AVX2 unless allow_integer is 0, else float), more (every M
   when `many` is set) through the integer tiles with VNNI or AVX2, else float tiles and the BLAS. The
   tiles are read from packed_w/packed_s (mlx_voxtral_qg_pack's layout of each matrix) where
   those are given, else transposed per call. Returns nonzero for an unsupported format, 2
   without memory for the scratch. */
#ifndef MANY_ROWS
#define MANY_ROWS 64
#endif

int mlx_voxtral_qmm(int count, int M, const int* Ns, int K, int G, int bits, const float* x,
                    const uint32_t* const* ws, const void* const* scales_, const void* const* biases_, int bf16,
                    int allow_integer, int many, const uint32_t* const* packed_w, const void* const* packed_s,
                    float* const* ys) {
  int vpw = 32 / bits, KG = K / G;
  if ((bits != 4 && bits != 8) || K % G || G % (8 * vpw)) return 1;
  int blk = QBLOCK * vpw, Kp = (K + blk - 1) / blk * blk, halves = K / (8 * vpw);
  /* many rows (or `many`: every M, for a result that does not depend on M) in the integer
     tiles, a few in the few-row integer kernels, both with VNNI or AVX2 */
  int tiles = QINT && allow_integer && (many || M > MANY_ROWS);
  int integer = QINT && allow_integer && !tiles;
  int* half_group = malloc(sizeof(int) * (size_t)(halves + 1));
  float* xt = integer || tiles ? NULL : malloc(sizeof(float) * (size_t)M * K);
  int8_t* xi = malloc((size_t)M * K);
  float* xd = malloc(sizeof(float) * (size_t)M * KG);
  float* xs = malloc(sizeof(float) * (size_t)M * KG);
  /* the integer kernel's x (bytes) and lane scales, or the float kernels' permuted x */
  void* xk = malloc(integer || tiles ? (size_t)M * Kp : sizeof(float) * (size_t)M * Kp);
  float* xl = integer ? malloc(sizeof(float) * (size_t)M * (Kp / blk) * QBLOCK) : NULL;
  int float_tiles = !tiles && M > MANY_ROWS;
  float* tile = float_tiles ? malloc(sizeof(float) * (size_t)TILE * Kp) : NULL;
  int status = 2;
  if (!half_group || (!integer && !tiles && !xt) || !xi || !xd || !xs || !xk || (integer && !xl) || (float_tiles && !tile))
    goto done;
  for (int h = 0; h <= halves; h++) half_group[h] = h * 8 * vpw / G < KG ? h * 8 * vpw / G : KG - 1;
  quantize_rows(M, K, G, x, xt, xi, xd, xs);
  status = 0;
#if QVNNI || QAVX2
  if (tiles) {
    qg_layout(M, K, bits, xi, xk);
    status = qgemm(count, M, Ns, K, G, bits, xk, xd, xs, ws, scales_, biases_, bf16, packed_w, packed_s, ys);
    goto done;
  }
  if (integer) {
    layout_q8(M, K, Kp, G, bits, xi, xd, half_group, xk, xl);
    #pragma omp parallel
    for (int i = 0; i < count; i++)
      for (int m0 = 0; m0 < M; m0 += FEW_ROWS) {
        int mb = M - m0 < FEW_ROWS ? M - m0 : FEW_ROWS;
        qint_rows(bits, mb, Ns[i], K, Kp, G, (int8_t*)xk + (size_t)m0 * Kp, xl + (size_t)m0 * (Kp / blk) * QBLOCK,
                  xs + (size_t)m0 * KG, ws[i], scales_[i], biases_[i], bf16, half_group, ys[i] + (size_t)m0 * Ns[i]);
      }
    goto done;
  }
#endif
  permute_blocks(M, K, Kp, bits, xt, xk, M <= MANY_ROWS);
  if (M > MANY_ROWS) {
    for (int i = 0; i < count; i++)
      dequantize_matmul(bits, M, Ns[i], K, Kp, G, xk, ws[i], scales_[i], biases_[i], bf16, half_group, tile, ys[i]);
    goto done;
  }
  #pragma omp parallel
  for (int i = 0; i < count; i++)
    for (int m0 = 0; m0 < M; m0 += FEW_ROWS) {
      int mb = M - m0 < FEW_ROWS ? M - m0 : FEW_ROWS;
      /* the rows' outputs are columns [m0, m0 + mb) of y: compute into place via offsets */
      qmv_rows(bits, mb, Ns[i], K, Kp, G, (float*)xk + (size_t)m0 * Kp, xs + (size_t)m0 * KG, ws[i], scales_[i],
               biases_[i], bf16, half_group, ys[i] + (size_t)m0 * Ns[i]);
    }
done:
  free(half_group), free(xt), free(xi), free(xd), free(xs), free(xk), free(xl), free(tile);
  return status;
}

/* ---- bfloat16 weights w [N, K] ----
   Few rows: every output is 4 multiply-add chains, chain c over k = 32 i + 8 c + lane,
   summed as hsum((a0 + a1) + (a2 + a3)), then a scalar tail past the last multiple of 32.
   One chain per output is latency-bound (~35 GB/s of weights on this 2-core machine);
   four reach the memory bandwidth (~55 GB/s). Every path below makes exactly these
   chains, so a row's result never depends on how many rows share the call. */
#define BF16_SPAN 32

INLINE float bf16_finish(v8 a0, v8 a1, v8 a2, v8 a3, int K32, int K, const float* x, const uint16_t* row) {
  float s = hsum((a0 + a1) + (a2 + a3));
  for (int k = K32; k < K; k++) s += x[k] * bf16_to_f32(row[k]);
  return s;
}

/* One row: the weights stream straight from memory. */
static void bf16_one_row(int N, int K, const float* x, const uint16_t* w, float* y) {
  int K32 = K & ~(BF16_SPAN - 1);
  #pragma omp for schedule(static) nowait
  for (int n = 0; n < N; n++) {
    const uint16_t* r = w + (size_t)n * K;
    v8 a0 = (v8){0}, a1 = (v8){0}, a2 = (v8){0}, a3 = (v8){0};
    for (int k = 0; k < K32; k += BF16_SPAN) {
      prefetch_ahead(r + k);
      a0 = fma8(bf16x8(r + k), load8(x + k), a0);
      a1 = fma8(bf16x8(r + k + 8), load8(x + k + 8), a1);
      a2 = fma8(bf16x8(r + k + 16), load8(x + k + 16), a2);
      a3 = fma8(bf16x8(r + k + 24), load8(x + k + 24), a3);
    }
    y[n] = bf16_finish(a0, a1, a2, a3, K32, K, x, r);
  }
}

/* R rows of x times one weight row: 4 R chains (32 registers hold R = 8 with AVX-512,
   16 hold R = 2 without); the weights are converted once for all R rows. */
#ifdef __AVX512F__
#define BF16_TILE 8
#else
#define BF16_TILE 2
#endif
INLINE void bf16_tile(const int R, int K, int K32, const float* x, const uint16_t* row, float* y, int ldy) {
  v8 c[BF16_TILE][4];
  for (int i = 0; i < R; i++) c[i][0] = c[i][1] = c[i][2] = c[i][3] = (v8){0};
  for (int k = 0; k < K32; k += BF16_SPAN) {
    prefetch_ahead(row + k);
    v8 w0 = bf16x8(row + k), w1 = bf16x8(row + k + 8), w2 = bf16x8(row + k + 16), w3 = bf16x8(row + k + 24);
    for (int i = 0; i < R; i++) {
      const float* xr = x + (size_t)i * K + k;
      c[i][0] = fma8(w0, load8(xr), c[i][0]);
      c[i][1] = fma8(w1, load8(xr + 8), c[i][1]);
      c[i][2] = fma8(w2, load8(xr + 16), c[i][2]);
      c[i][3] = fma8(w3, load8(xr + 24), c[i][3]);
    }
  }
  for (int i = 0; i < R; i++) y[(size_t)i * ldy] = bf16_finish(c[i][0], c[i][1], c[i][2], c[i][3], K32, K, x + (size_t)i * K, row);
}

/* 2..FEW_ROWS rows: every weight row is read once and multiplied with every row of x. */
static void bf16_few_rows(int M, int N, int K, const float* x, const uint16_t* w, float* y) {
  int K32 = K & ~(BF16_SPAN - 1);
  #pragma omp for schedule(static) nowait
  for (int n = 0; n < N; n++) {
    const uint16_t* row = w + (size_t)n * K;
    for (int m0 = 0; m0 < M; m0 += BF16_TILE) {
      const float* xm = x + (size_t)m0 * K;
      float* ym = y + (size_t)m0 * N + n;
      switch (M - m0 < BF16_TILE ? M - m0 : BF16_TILE) {
        case 1: bf16_tile(1, K, K32, xm, row, ym, N); break;
#if BF16_TILE == 8
        case 2: bf16_tile(2, K, K32, xm, row, ym, N); break;
        case 3: bf16_tile(3, K, K32, xm, row, ym, N); break;
        case 4: bf16_tile(4, K, K32, xm, row, ym, N); break;
        case 5: bf16_tile(5, K, K32, xm, row, ym, N); break;
        case 6: bf16_tile(6, K, K32, xm, row, ym, N); break;
        case 7: bf16_tile(7, K, K32, xm, row, ym, N); break;
#endif
        default: bf16_tile(BF16_TILE, K, K32, xm, row, ym, N); break;
      }
    }
  }
}

/* y [M, N] = x [M, K] @ w^T for bfloat16 w [N, K] by float32 tiles and the BLAS. */
static int bf16_many_rows(int M, int N, int K, const float* x, const uint16_t* w, float* y) {
  float* tile = malloc(sizeof(float) * (size_t)TILE * K);
  if (!tile) return 2;
  int K8 = K & ~7;
  for (int n0 = 0; n0 < N; n0 += TILE) {
    int nb = N - n0 < TILE ? N - n0 : TILE;
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < nb; r++) {
      const uint16_t* src = w + (size_t)(n0 + r) * K;
      float* dst = tile + (size_t)r * K;
      for (int k = 0; k < K8; k += 8) {
        v8 f = bf16x8(src + k);
        memcpy(dst + k, &f, 32);
      }
      for (int k = K8; k < K; k++) dst[k] = bf16_to_f32(src[k]);
    }
    real_sgemm(RowMajor, NoTrans, Trans, M, nb, K, 1.0f, x, K, tile, K, 0.0f, y + n0, N);
  }
  free(tile);
  return 0;
}

/* y_i [M, N_i] = x [M, K] @ w_i^T for `count` bfloat16 matrices w_i [N_i, K]: the few-row
   kernels FEW_ROWS rows at a time up to MANY_ROWS, all matrices in one parallel region,
   then float32 tiles and the BLAS. */
int mlx_voxtral_bf16mm(int count, int M, const int* Ns, int K, const float* x, const uint16_t* const* ws,
                       float* const* ys) {
  if (M > MANY_ROWS) {
    for (int i = 0; i < count; i++)
      if (bf16_many_rows(M, Ns[i], K, x, ws[i], ys[i])) return 2;
    return 0;
  }
  #pragma omp parallel
  for (int i = 0; i < count; i++)
    for (int m0 = 0; m0 < M; m0 += FEW_ROWS) {
      int mb = M - m0 < FEW_ROWS ? M - m0 : FEW_ROWS, N = Ns[i];
      if (mb == 1) bf16_one_row(N, K, x + (size_t)m0 * K, ws[i], ys[i] + (size_t)m0 * N);
      else bf16_few_rows(mb, N, K, x + (size_t)m0 * K, ws[i], ys[i] + (size_t)m0 * N);
    }
  return 0;
}

/* ---- sliding-window causal attention over keys and values read in place ----
   Query i sits at key index p = Sk - Sq + i and attends to keys (p - window, p]. Every
   score is one fused multiply-add chain over the head dimension, every softmax sum and
   every output value runs over the row's own keys in increasing order, so a query's
   result does not depend on how many other queries share the call (streaming in 80 ms
   steps gives the same bits as one offline block). Keys and values are float32 or
   bfloat16 rows of D values, read where they lie (a cache's buffer: heads may lie further
   apart than Sk rows). Each task (a head's block of queries) widens and transposes only
   the keys its queries see into its own scratch and widens values as it reads them;
   memory: that scratch and a score tile per task, never the [Sq, Sk] matrix. */
#define ATT_ROWS 6    /* query rows per register tile */
#if defined(__AVX512F__)
#define AVX512 1
#else
#define AVX512 0
#endif
#define ATT_BLOCK 48  /* query rows per task */

/* e^x for x <= 0 (Cephes expf: range reduction by ln 2, degree-5 polynomial; ~2 ulp). */
INLINE v8 exp8(v8 x) {
  v8i under = x < -87.0f;
  x = (v8)(((v8i)x & ~under) | ((v8i)((v8){0} - 87.0f) & under));
  v8i n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, v8i);  /* round, x <= 0 */
  v8 fn = __builtin_convertvector(n, v8);
  v8 r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  v8 p = (v8){0} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  v8 y = p * (r * r) + r + 1.0f;
  v8i e = (n + 127) << 23;
  v8 scale;
  memcpy(&scale, &e, 32);
  return y * scale;
}
INLINE float exp1(float x) { v8 v = exp8((v8){0} + x); return v[0]; }

/* s[0:n] = exp((s - max s) scale), unnormalized; returns 1 / their sum. The sum runs in 8
   lanes from s[0], so it depends only on the span's values. */
INLINE float softmax_span(float* s, int n, float scale) {
  /* the maximum in 8 lanes (one serial compare per score was a fifth of a live chunk's
     attention): the same value in any order, up to the sign of a zero, which s - m keeps */
  float m = s[0];
  int j0 = 0;
  if (n >= 8) {
    v8 m8 = load8(s);
    for (j0 = 8; j0 + 8 <= n; j0 += 8) {
      v8 x = load8(s + j0);
      v8i gt = x > m8;
      m8 = (v8)(((v8i)x & gt) | ((v8i)m8 & ~gt));
    }
    for (int i = 0; i < 8; i++) m = m8[i] > m ? m8[i] : m;
  }
  for (int j = j0; j < n; j++) m = s[j] > m ? s[j] : m;
  v8 sum = (v8){0};
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    v8 e = exp8((load8(s + j) - m) * scale);
    memcpy(s + j, &e, 32);
    sum += e;
  }
  float tail = 0.0f;
  for (; j < n; j++) tail += s[j] = exp1((s[j] - m) * scale);
  return 1.0f / (hsum(sum) + tail);
}

/* 8 float32 or bfloat16 values at p (element i of the row), as float32 */
INLINE v8 row8(const int BF, const void* p, size_t i) {
  return BF ? bf16x8((const uint16_t*)p + i) : load8((const float*)p + i);
}

/* out[r][0:16] = sum_t a[r][t] b[t][0:16] over t in [t0, t1): the R x 16 register tile of
   the values' product (a = probabilities, b = V, float32 or bfloat16 rows when BF) for head
   sizes other than 64; the scores have att_scores. */
INLINE void att_product(const int R, const int BF, int t0, int t1, const float* a, int lda, const void* b,
                        int ldb, float* out, int ldo) {
  v8 acc[ATT_ROWS][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = (v8){0};
  for (int t = t0; t < t1; t++) {
    v8 b0 = row8(BF, b, (size_t)t * ldb), b1 = row8(BF, b, (size_t)t * ldb + 8);
    for (int r = 0; r < R; r++) {
      v8 ab = splat8(a[(size_t)r * lda + t]);
      acc[r][0] = fma8(ab, b0, acc[r][0]);
      acc[r][1] = fma8(ab, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; r++) {
    memcpy(out + (size_t)r * ldo, &acc[r][0], 32);
    memcpy(out + (size_t)r * ldo + 8, &acc[r][1], 32);
  }
}

/* The scores out[r][0:16 B] = q[r] . K^T (kt: keys transposed to float32, ldk apart) for B
   blocks of 16 keys (B = 1, 2), each block one 16-lane vector: one multiply-add per
   dimension per key, in dimension order (the chains the 8-lane products before them made,
   so the same bits, in half the instructions); two blocks give twice the independent chains
   (R per block were bound by the multiply-add's latency). The scores were most of a live
   chunk's attention. */
#if !defined(__AVX512F__)
/* Without AVX-512 (GCC keeps 64-byte vectors in memory there): att_product's 8-lane
   chains, which att_scores and att_values64 reproduce lane for lane. */
INLINE void att_scores(const int R, const int B, int D, const float* q, const float* kt, int ldk, float* out,
                       int ldo) {
  for (int b = 0; b < B; b++) att_product(R, 0, 0, D, q, D, kt + 16 * b, ldk, out + 16 * b, ldo);
}
#else
INLINE void att_scores(const int R, const int B, int D, const float* q, const float* kt, int ldk, float* out,
                       int ldo) {
  v16 acc[ATT_ROWS][2];
  for (int r = 0; r < R; r++)
    for (int b = 0; b < B; b++) acc[r][b] = (v16){0};
  for (int t = 0; t < D; t++) {
    v16 k[2];
    for (int b = 0; b < B; b++) k[b] = load16(kt + (size_t)t * ldk + 16 * b);
    for (int r = 0; r < R; r++) {
      v16 a = splat16(q[(size_t)r * D + t]);
      for (int b = 0; b < B; b++) acc[r][b] = fma16(a, k[b], acc[r][b]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int b = 0; b < B; b++) memcpy(out + (size_t)r * ldo + 16 * b, &acc[r][b], 64);
}

#endif

/* out[r][0:64] = sum_t a[r][t] v[t][0:64] over t in [t0, t1) for a head size of 64: every
   dimension in one pass over the keys, each value row read once (att_product, 16
   dimensions a pass, reads them four times). Each output is att_product's chain, the same
   fused multiply-add per key in key order, so the bits are the same. */
INLINE void att_values64(const int R, const int BF, int t0, int t1, const float* a, int lda, const void* v,
                         float* out, int ldo) {
  v16 acc[ATT_ROWS][4];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < 4; c++) acc[r][c] = (v16){0};
  for (int t = t0; t < t1; t++) {
    v16 x[4];
    for (int c = 0; c < 4; c++)
      x[c] = BF ? bf16x16((const uint16_t*)v + (size_t)t * 64 + 16 * c) : load16((const float*)v + (size_t)t * 64 + 16 * c);
    for (int r = 0; r < R; r++) {
      v16 p = splat16(a[(size_t)r * lda + t]);
      for (int c = 0; c < 4; c++) acc[r][c] = fma16(p, x[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < 4; c++) memcpy(out + (size_t)r * ldo + 16 * c, &acc[r][c], 64);
}

/* One register tile of R rows: scores over the tile's keys, softmax per row, values. kt
   (transposed, ldk apart) and v start at the task's first key jlo. */
INLINE void att_tile(const int R, const int BF, int D, int window, float scale, int pos0, int jlo,
                     const float* q, const float* kt, int ldk, const void* v, float* s, int lds, float* out,
                     int ldo) {
  int lo0 = pos0 - window + 1 > jlo ? pos0 - window + 1 - jlo : 0; /* first row's first key */
  int hi = pos0 + R - 1 - jlo;                                       /* last row's last key */
  int jb0 = lo0 & ~15;
  int jb = jb0;
  for (; jb + 16 <= hi; jb += 32) att_scores(R, 2, D, q, kt + jb, ldk, s + jb, lds);
  if (jb <= hi) att_scores(R, 1, D, q, kt + jb, ldk, s + jb, lds);
  float inv[ATT_ROWS];
  for (int r = 0; r < R; r++) {
    float* sr = s + (size_t)r * lds;
    int a = pos0 + r - window + 1 > jlo ? pos0 + r - window + 1 - jlo : 0, b = pos0 + r - jlo + 1, j;
    inv[r] = softmax_span(sr + a, b - a, scale);
    for (j = lo0; j < a; j++) sr[j] = 0.0f;
    for (j = b; j <= hi; j++) sr[j] = 0.0f;
  }
  if (D == 64 && AVX512) att_values64(R, BF, lo0, hi + 1, s, lds, v, out, ldo);
  else
    for (int dd = 0; dd < D; dd += 16) {
      const void* vd = BF ? (const void*)((const uint16_t*)v + dd) : (const void*)((const float*)v + dd);
      att_product(R, BF, lo0, hi + 1, s, lds, vd, D, out + dd, ldo);
    }
  for (int r = 0; r < R; r++)
    for (int d = 0; d < D; d++) out[(size_t)r * ldo + d] *= inv[r];
}

/* kt[d * ldk + j] = k[j * D + d] as float32 for keys j < n (float32 or bfloat16 rows of D,
   D a multiple of 8), zeros for j in [n, ldk): 8 x 8 blocks transposed in registers. */
#ifndef ATT_AHEAD
#define ATT_AHEAD 32 /* keys: how far ahead the transpose asks for the cached keys' rows */
#endif
INLINE void widen_transpose(const int BF, int n, int D, const void* k, const void* v, float* kt, int ldk) {
  int j = 0;
  size_t row = (size_t)D * (BF ? 2 : 4);
#if defined(__AVX__)
  for (; j + 8 <= n; j += 8) {
    /* the cache's rows come from memory (a chunk reads the whole window once, cold): ask
       for the keys ATT_AHEAD rows ahead and for these rows' values (read next, by the
       products), so that the misses overlap instead of one row at a time */
    for (int i = 0; i < 8; i++)
      for (size_t b = 0; b < row; b += 64) {
        if (j + ATT_AHEAD + i < n) __builtin_prefetch((const char*)k + (size_t)(j + ATT_AHEAD + i) * row + b, 0, 3);
        __builtin_prefetch((const char*)v + (size_t)(j + i) * row + b, 0, 2);
      }
    for (int d = 0; d < D; d += 8) {
      __m256 r[8], t[8], u[8];
      for (int i = 0; i < 8; i++) r[i] = (__m256)row8(BF, k, (size_t)(j + i) * D + d);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(kt + (size_t)(d + i) * ldk + j, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(kt + (size_t)(d + i + 4) * ldk + j, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
      }
    }
  }
#endif
  for (; j < n; j++)
    for (int d = 0; d < D; d++)
      kt[(size_t)d * ldk + j] = BF ? bf16_to_f32(((const uint16_t*)k)[(size_t)j * D + d]) : ((const float*)k)[(size_t)j * D + d];
  for (int d = 0; d < D; d++) memset(kt + (size_t)d * ldk + n, 0, sizeof(float) * (ldk - n));
}

INLINE int att_task(const int BF, int H, int Hkv, int Sq, int Sk, int D, int window, float scale, const float* q,
                    const void* k, size_t ldhk, const void* v, size_t ldhv, float* out, int h, int i0, int i1) {
  int p0 = Sk - Sq + i0;  /* key index of the block's first query */
  int jlo = p0 - window + 1 > 0 ? p0 - window + 1 : 0;
  int n = Sk - Sq + i1 - jlo;  /* keys the block sees: [jlo, jlo + n) */
  int ldk = (n + 31) & ~15;    /* tiles read up to 15 keys past the last one */
  int lds = ldk;
  float* kt = malloc(sizeof(float) * ((size_t)D * ldk + (size_t)ATT_ROWS * lds));
  if (!kt) return 1;
  float* s = kt + (size_t)D * ldk;
  size_t es = BF ? 2 : 4, hk = (size_t)(h / (H / Hkv));
  const char* kh = (const char*)k + (hk * ldhk + (size_t)jlo * D) * es;
  const char* vh = (const char*)v + (hk * ldhv + (size_t)jlo * D) * es;
  widen_transpose(BF, n, D, kh, vh, kt, ldk);
  for (int i = i0; i < i1; i += ATT_ROWS) {
    const float* qi = q + ((size_t)h * Sq + i) * D;
    float* oi = out + ((size_t)i * H + h) * D;
    int pos = Sk - Sq + i, ldo = H * D;
    switch (i1 - i < ATT_ROWS ? i1 - i : ATT_ROWS) {
      case 1: att_tile(1, BF, D, window, scale, pos, jlo, qi, kt, ldk, vh, s, lds, oi, ldo); break;
      case 2: att_tile(2, BF, D, window, scale, pos, jlo, qi, kt, ldk, vh, s, lds, oi, ldo); break;
      case 3: att_tile(3, BF, D, window, scale, pos, jlo, qi, kt, ldk, vh, s, lds, oi, ldo); break;
      case 4: att_tile(4, BF, D, window, scale, pos, jlo, qi, kt, ldk, vh, s, lds, oi, ldo); break;
      case 5: att_tile(5, BF, D, window, scale, pos, jlo, qi, kt, ldk, vh, s, lds, oi, ldo); break;
      default: att_tile(6, BF, D, window, scale, pos, jlo, qi, kt, ldk, vh, s, lds, oi, ldo); break;
    }
  }
  free(kt);
  return 0;
}

/* out [Sq, H, D] = attention of q [H, Sq, D] over k, v [Hkv, Sk, D] (H a multiple of Hkv,
   D a multiple of 16, Sq <= Sk), float32 or bfloat16 bits (bf16 nonzero), kv head h's
   rows starting ldhk / ldhv elements after head h - 1's. Returns nonzero when out of
   memory or unsupported. */
int mlx_voxtral_attention(int H, int Hkv, int Sq, int Sk, int D, int window, float scale, const float* q,
                          int bf16, const void* k, size_t ldhk, const void* v, size_t ldhv, float* out) {
  if (D % 16 || H % Hkv || Sq > Sk || Sq < 1 || window < 1) return 1;
  int blocks = (Sq + ATT_BLOCK - 1) / ATT_BLOCK, failed = 0;
  #pragma omp parallel for schedule(dynamic)
  for (int t = 0; t < H * blocks; t++) {
    int h = t / blocks, i0 = (t % blocks) * ATT_BLOCK;
    int i1 = i0 + ATT_BLOCK < Sq ? i0 + ATT_BLOCK : Sq;
    int bad = bf16 ? att_task(1, H, Hkv, Sq, Sk, D, window, scale, q, k, ldhk, v, ldhv, out, h, i0, i1)
                   : att_task(0, H, Hkv, Sq, Sk, D, window, scale, q, k, ldhk, v, ldhv, out, h, i0, i1);
    if (bad) failed = 1;
  }
  return failed ? 2 : 0;
}

/* One query per head over a bfloat16 KV cache (a decode step): q [H, D] float32, k/v
   [Hkv, capacity, D] bfloat16 of which the first n keys are used, every one visible (the
   cache holds only the window; its ring order does not matter to one query). Each kv head
   is one task: scores for its H / Hkv query heads two keys at a time, softmax, then the
   values 32 dimensions at a time over tiles of keys. */


/* The totals of 4 vectors (a transposing tree: a third of the instructions of 4 hsum16) */
INLINE void hsum16x4(const v16* a, float* out) {
#if defined(__AVX__)
  __m256 h0 = (__m256)(lo8(a[0]) + hi8(a[0])), h1 = (__m256)(lo8(a[1]) + hi8(a[1]));
  __m256 h2 = (__m256)(lo8(a[2]) + hi8(a[2])), h3 = (__m256)(lo8(a[3]) + hi8(a[3]));
  __m256 p = _mm256_hadd_ps(_mm256_hadd_ps(h0, h1), _mm256_hadd_ps(h2, h3));
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(p), _mm256_extractf128_ps(p, 1));
  _mm_storeu_ps(out, r);
#else
  for (int i = 0; i < 4; i++) out[i] = hsum16(a[i]);
#endif
}

#if !defined(__AVX512F__)
/* Without AVX-512: each key's G chains as 8-lane halves (the lanes of the 16-lane form),
   one key at a time (two would not fit in 16 registers). */
INLINE void one_scores(const int G, int n, int D, const float* q, const uint16_t* k, float* s) {
  for (int j = 0; j < n; j++) {
    const uint16_t* kj = k + (size_t)j * D;
    v8 lo[4], hi[4];
    for (int g = 0; g < G; g++) lo[g] = hi[g] = (v8){0};
    for (int d = 0; d < D; d += 16) {
      v8 x0 = bf16x8(kj + d), x1 = bf16x8(kj + d + 8);
      for (int g = 0; g < G; g++) {
        lo[g] = fma8(load8(q + (size_t)g * D + d), x0, lo[g]);
        hi[g] = fma8(load8(q + (size_t)g * D + d + 8), x1, hi[g]);
      }
    }
    for (int g = 0; g < G; g++) s[(size_t)g * n + j] = hsum(lo[g] + hi[g]);
  }
}

/* as below, 16 dims at a time (2 G accumulators) */
INLINE void one_values_part(const int G, const int C, int d0, int j0, int j1, int n, int D, const float* s,
                            const float* inv, const uint16_t* v, float* out, int ldo) {
  for (int c = 0; c < C; c++) {
    int dc = d0 + 16 * c;
    v8 lo[4], hi[4];
    for (int g = 0; g < G; g++) {
      lo[g] = j0 ? load8(out + (size_t)g * ldo + dc) : (v8){0};
      hi[g] = j0 ? load8(out + (size_t)g * ldo + dc + 8) : (v8){0};
    }
    for (int j = j0; j < j1; j++) {
      v8 x0 = bf16x8(v + (size_t)j * D + dc), x1 = bf16x8(v + (size_t)j * D + dc + 8);
      for (int g = 0; g < G; g++) {
        v8 p = splat8(s[(size_t)g * n + j]);
        lo[g] = fma8(p, x0, lo[g]);
        hi[g] = fma8(p, x1, hi[g]);
      }
    }
    for (int g = 0; g < G; g++) {
      v8 a = j1 == n ? lo[g] * inv[g] : lo[g], b = j1 == n ? hi[g] * inv[g] : hi[g];
      memcpy(out + (size_t)g * ldo + dc, &a, 32);
      memcpy(out + (size_t)g * ldo + dc + 8, &b, 32);
    }
  }
}
#else
INLINE void one_scores(const int G, int n, int D, const float* q, const uint16_t* k, float* s) {
  for (int j = 0; j < n; j += 2) {
    const uint16_t* k0 = k + (size_t)j * D;
    const uint16_t* k1 = j + 1 < n ? k0 + D : k0;
    v16 a0[4], a1[4];
    for (int g = 0; g < G; g++) a0[g] = a1[g] = (v16){0};
    for (int d = 0; d < D; d += 16) {
      v16 x0 = bf16x16(k0 + d), x1 = bf16x16(k1 + d);
      for (int g = 0; g < G; g++) {
        v16 qg = load16(q + (size_t)g * D + d);
        a0[g] = fma16(qg, x0, a0[g]);
        a1[g] = fma16(qg, x1, a1[g]);
      }
    }
    if (G == 4) {
      float t0[4], t1[4];
      hsum16x4(a0, t0);
      hsum16x4(a1, t1);
      for (int g = 0; g < 4; g++) {
        s[(size_t)g * n + j] = t0[g];
        if (j + 1 < n) s[(size_t)g * n + j + 1] = t1[g];
      }
      continue;
    }
    for (int g = 0; g < G; g++) {
      s[(size_t)g * n + j] = hsum16(a0[g]);
      if (j + 1 < n) s[(size_t)g * n + j + 1] = hsum16(a1[g]);
    }
  }
}

/* dims [d0, d0 + 16 C) of the G outputs over keys [j0, j1): C x 16 dims at a time keep
   C G accumulators, kept in out between key tiles (from zero at the first, scaled by inv
   at the last: the same sums in the same order as one pass over all keys). */
INLINE void one_values_part(const int G, const int C, int d0, int j0, int j1, int n, int D, const float* s,
                            const float* inv, const uint16_t* v, float* out, int ldo) {
  v16 acc[4][4], x[4];
  for (int g = 0; g < G; g++)
    for (int c = 0; c < C; c++) acc[g][c] = j0 ? load16(out + (size_t)g * ldo + d0 + 16 * c) : (v16){0};
  for (int j = j0; j < j1; j++) {
    const uint16_t* vj = v + (size_t)j * D + d0;
    for (int c = 0; c < C; c++) x[c] = bf16x16(vj + 16 * c);
    for (int g = 0; g < G; g++) {
      v16 p = splat16(s[(size_t)g * n + j]);
      for (int c = 0; c < C; c++) acc[g][c] = fma16(p, x[c], acc[g][c]);
    }
  }
  for (int g = 0; g < G; g++)
    for (int c = 0; c < C; c++) {
      v16 o = j1 == n ? acc[g][c] * inv[g] : acc[g][c];
      memcpy(out + (size_t)g * ldo + d0 + 16 * c, &o, 64);
    }
}
#endif

/* Keys a tile at a time, so that the tile's values (64 x 256 bytes) stay in L1 while the
   dims pass over them: one strided pass over all values per 32 dims read each line twice
   over (the adjacent-line prefetch) and ran at 15 GB/s at 7500 keys. */
#define ONE_TILE 64
INLINE void one_values(const int G, int n, int D, const float* s, const float* inv, const uint16_t* v,
                       float* out, int ldo) {
  for (int j0 = 0; j0 < n; j0 += ONE_TILE) {
    int j1 = n - j0 < ONE_TILE ? n : j0 + ONE_TILE, d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) one_values_part(G, 4, d0, j0, j1, n, D, s, inv, v, out, ldo);
    switch ((D - d0) / 16) {
      case 3: one_values_part(G, 3, d0, j0, j1, n, D, s, inv, v, out, ldo); break;
      case 2: one_values_part(G, 2, d0, j0, j1, n, D, s, inv, v, out, ldo); break;
      case 1: one_values_part(G, 1, d0, j0, j1, n, D, s, inv, v, out, ldo); break;
    }
  }
}

INLINE void one_group(const int G, int n, int D, float scale, const float* q, const uint16_t* k,
                      const uint16_t* v, float* s, float* out) {
  float inv[4];
  one_scores(G, n, D, q, k, s);
  for (int g = 0; g < G; g++) {
    inv[g] = softmax_span(s + (size_t)g * n, n, scale);
  }
  one_values(G, n, D, s, inv, v, out, D);
}

/* out [H, D]; returns nonzero when unsupported (D not a multiple of 16) or out of memory. */
#define ATT_ONE_PARALLEL (1u << 20)
int mlx_voxtral_attention_one(int H, int Hkv, int n, int capacity, int D, float scale, const float* q,
                              const uint16_t* k, const uint16_t* v, float* out) {
  if (D % 16 || H % Hkv || n < 1 || n > capacity) return 1;
  int G = H / Hkv, failed = 0;
  /* a short cache is read on one core: for a step's 26 layers of 32 heads x 128 over
     ~100 keys, waking the other threads cost more than the work they took over */
  #pragma omp parallel for schedule(dynamic) if ((size_t)H * n * D >= ATT_ONE_PARALLEL)
  for (int t = 0; t < Hkv * ((G + 3) / 4); t++) {
    int h = t / ((G + 3) / 4), g0 = (t % ((G + 3) / 4)) * 4, gb = G - g0 < 4 ? G - g0 : 4;
    float* s = malloc(sizeof(float) * (size_t)4 * n);
    if (!s) { failed = 1; continue; }
    const float* qh = q + (size_t)(h * G + g0) * D;
    const uint16_t* kh = k + (size_t)h * capacity * D;
    const uint16_t* vh = v + (size_t)h * capacity * D;
    float* oh = out + (size_t)(h * G + g0) * D;
    switch (gb) {
      case 1: one_group(1, n, D, scale, qh, kh, vh, s, oh); break;
      case 2: one_group(2, n, D, scale, qh, kh, vh, s, oh); break;
      case 3: one_group(3, n, D, scale, qh, kh, vh, s, oh); break;
      default: one_group(4, n, D, scale, qh, kh, vh, s, oh); break;
    }
    free(s);
  }
  return failed ? 2 : 0;
}

/* Sum of n floats read once on all cores, 4 independent chains per thread: the
   benchmark's probe of sustained read bandwidth (what a decode step is bound by). */
float mlx_voxtral_read_sum(const float* p, size_t n) {
  float total = 0.0f;
  size_t n32 = n & ~(size_t)31;
  #pragma omp parallel for schedule(static) reduction(+ : total)
  for (size_t i = 0; i < n32; i += 32) {
    v8 a = load8(p + i) + load8(p + i + 8), b = load8(p + i + 16) + load8(p + i + 24);
    total += hsum(a + b);
  }
  for (size_t i = n32; i < n; i++) total += p[i];
  return total;
}

/* Elementwise kernels run on all cores from this many values: below, waking the other
   threads costs more than they take over (a decode step's 9216-wide SwiGLU gate after its
   matmul: 34 us on both cores, 23 on one). */
#define ELEMENTWISE_PARALLEL 65536

/* y = silu(a) * b = a * sigmoid(a) * b elementwise (the SwiGLU gate). */
void mlx_voxtral_silu_mul(size_t n, const float* a, const float* b, float* y) {
  size_t n8 = n & ~(size_t)7;
  #pragma omp parallel for schedule(static) if (n >= ELEMENTWISE_PARALLEL)
  for (size_t i = 0; i < n8; i += 8) {
    v8 x = load8(a + i);
    v8i neg = x < 0.0f;
    v8 e = exp8((v8)((v8i)x | INT32_MIN));  /* e^-|x|: the sign bit set */
    v8 num = (v8)(((v8i)e & neg) | ((v8i)((v8){0} + 1.0f) & ~neg));
    v8 out = x * (num / (e + 1.0f)) * load8(b + i);
    memcpy(y + i, &out, 32);
  }
  for (size_t i = n8; i < n; i++) {
    float x = a[i], e = exp1(x < 0 ? x : -x);
    y[i] = x * ((x < 0 ? e : 1.0f) / (e + 1.0f)) * b[i];
  }
}

/* y = x (1 + erf(x / sqrt 2)) / 2 elementwise (the exact GELU, as MLX's nn.gelu writes it),
   on all cores. */
void mlx_voxtral_gelu(size_t n, const float* x, float* y) {
  const float root2 = 1.41421356237309504880f;
  #pragma omp parallel for schedule(static) if (n >= 16384)
  for (size_t i = 0; i < n; i++) y[i] = x[i] * (1.0f + erff(x[i] / root2)) / 2.0f;
}

/* RoPE on interleaved pairs of x [rows, heads, D] at rows' angles cos, sin [rows, D / 2]:
   y[2i] = x[2i] c - x[2i+1] s, y[2i+1] = x[2i] s + x[2i+1] c, each product rounded (no
   contraction: numpy's bits). */
void mlx_voxtral_rope(size_t rows, int heads, int D, const float* x, const float* cos, const float* sin,
                      float* y) {
  int half = D / 2;
  #pragma omp parallel for schedule(static) if (rows * heads * D >= ELEMENTWISE_PARALLEL)
  for (size_t r = 0; r < rows; r++)
    for (int h = 0; h < heads; h++) {
      const float *xr = x + (r * heads + h) * D, *c = cos + r * half, *sn = sin + r * half;
      float* yr = y + (r * heads + h) * D;
      for (int i = 0; i < half; i++) {
        float e = xr[2 * i], o = xr[2 * i + 1];
        yr[2 * i] = e * c[i] - o * sn[i];
        yr[2 * i + 1] = e * sn[i] + o * c[i];
      }
    }
}

/* y = x / sqrt(mean(x^2) + eps) * w (then * s, where s is given: a row every ld_s values,
   0 for one row for all) for float32 rows x [rows, K], the mean's sum in 16 lanes (one
   order for a row whatever the number of rows). */
void mlx_voxtral_rms_norm(size_t rows, int K, const float* x, const float* w, float eps, const float* s,
                          size_t ld_s, float* y) {
  #pragma omp parallel for schedule(static) if (rows * K >= ELEMENTWISE_PARALLEL)
  for (size_t r = 0; r < rows; r++) {
    const float* xr = x + r * K;
    float* yr = y + r * K;
    v16 acc = (v16){0};
    int k = 0;
    for (; k + 16 <= K; k += 16) {
      v16 v = load16(xr + k);
      acc += v * v;
    }
    float sum = hsum16(acc);
    for (; k < K; k++) sum += xr[k] * xr[k];
    float inv = 1.0f / sqrtf(sum / (float)K + eps);
    const float* sr = s ? s + r * ld_s : NULL;
    for (k = 0; k < K; k++) {
      float v = xr[k] * inv * w[k];
      yr[k] = sr ? v * sr[k] : v;
    }
  }
}

int mlx_voxtral_kernels(void) { return 1; }
#else
int mlx_voxtral_kernels(void) { return 0; }
#endif

/* y_i [M, N_i] = x [M, K] @ w_i^T for `count` float32 matrices w_i [N_i, K]: the few-row
   kernel up to FEW_ROWS rows, the BLAS beyond (one sgemv for a single row without OpenMP). */
int mlx_voxtral_f32mm(int count, int M, const int* Ns, int K, const float* x, const float* const* ws,
                      float* const* ys) {
  for (int i = 0; i < count; i++) {
#ifdef _OPENMP
    if (M <= FEW_ROWS) {
      few_rows_sgemm_nt(M, Ns[i], K, 1.0f, x, K, ws[i], K, 0.0f, ys[i], Ns[i]);
      continue;
    }
#endif
    if (M == 1)
      real_sgemv(RowMajor, NoTrans, Ns[i], K, 1.0f, ws[i], K, x, 1, 0.0f, ys[i], 1);
    else
      real_sgemm(RowMajor, NoTrans, Trans, M, Ns[i], K, 1.0f, x, K, ws[i], K, 0.0f, ys[i], Ns[i]);
  }
  return 0;
}
