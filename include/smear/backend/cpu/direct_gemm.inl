// The direct GEMM kernels, written once against `simd<T>` (a vector of T: batch, lanes, set1,
// load, store, mul, fma, and load_partial / store_partial of the first n < lanes values) and
// `block_bytes`, and included by direct_gemm.hpp into one namespace
// per instruction set, each compiled for its own (see backend/cpu/isa.hpp). No include guard:
// it is meant to be included several times, and includes nothing itself.

template <class T>
using batch = typename simd<T>::batch;
template <class T>
inline constexpr std::size_t lanes = simd<T>::lanes;

/// Register tiles are sized to the architecture's vector registers: 32 with AVX-512, 16
/// assumed otherwise (R × C accumulators, C loaded batches of B and one broadcast).
template <class T>
inline constexpr bool wide_registers = sizeof(batch<T>) >= 64;

/// C[R × C·w] = alpha · op(A)[R × depth] · B[depth × C·w] + beta · C. op(A)(i, k) is a[i·lda + k],
/// or a[k·lda + i] when TransA. beta = 0 does not read C.
template <class T, std::size_t R, std::size_t C, bool TransA>
inline void micro_tile(std::size_t depth, const T* a, std::size_t lda, const T* b, std::size_t ldb, T* c,
                       std::size_t ldc, T alpha, T beta) {
  constexpr std::size_t w = lanes<T>;
  batch<T> acc[R][C];
  SMEAR_UNROLL
  for (std::size_t r = 0; r < R; ++r)
    SMEAR_UNROLL
    for (std::size_t j = 0; j < C; ++j) acc[r][j] = simd<T>::set1(T(0));
  for (std::size_t k = 0; k < depth; ++k) {
    const T* bk = b + k * ldb;
    batch<T> bv[C];
    SMEAR_UNROLL
    for (std::size_t j = 0; j < C; ++j) {
      bv[j] = simd<T>::load(bk + j * w);
      SMEAR_PREFETCH(bk + (C + j) * w);  // the next tile's columns
    }
    if constexpr (TransA) SMEAR_PREFETCH(a + k * lda + 16);  // the next rows' values of op(A)
    SMEAR_UNROLL
    for (std::size_t r = 0; r < R; ++r) {
      const batch<T> av = simd<T>::set1(TransA ? a[k * lda + r] : a[r * lda + k]);
      SMEAR_UNROLL
      for (std::size_t j = 0; j < C; ++j) acc[r][j] = simd<T>::fma(av, bv[j], acc[r][j]);
    }
  }
  const batch<T> va = simd<T>::set1(alpha), vb = simd<T>::set1(beta);
  SMEAR_UNROLL
  for (std::size_t r = 0; r < R; ++r)
    SMEAR_UNROLL
    for (std::size_t j = 0; j < C; ++j) {
      T* p = c + r * ldc + j * w;
      batch<T> v = simd<T>::mul(va, acc[r][j]);
      if (beta != T(0)) v = simd<T>::fma(vb, simd<T>::load(p), v);
      simd<T>::store(p, v);
    }
}

/// The last n < lanes columns of R rows: micro_tile's one batch, loaded and stored masked.
template <class T, std::size_t R, bool TransA>
inline void micro_tail(std::size_t n, std::size_t depth, const T* a, std::size_t lda, const T* b, std::size_t ldb, T* c,
                       std::size_t ldc, T alpha, T beta) {
  batch<T> acc[R];
  SMEAR_UNROLL
  for (std::size_t r = 0; r < R; ++r) acc[r] = simd<T>::set1(T(0));
  for (std::size_t k = 0; k < depth; ++k) {
    const batch<T> bv = simd<T>::load_partial(b + k * ldb, n);
    SMEAR_UNROLL
    for (std::size_t r = 0; r < R; ++r)
      acc[r] = simd<T>::fma(simd<T>::set1(TransA ? a[k * lda + r] : a[r * lda + k]), bv, acc[r]);
  }
  const batch<T> va = simd<T>::set1(alpha), vb = simd<T>::set1(beta);
  SMEAR_UNROLL
  for (std::size_t r = 0; r < R; ++r) {
    T* p = c + r * ldc;
    batch<T> v = simd<T>::mul(va, acc[r]);
    if (beta != T(0)) v = simd<T>::fma(vb, simd<T>::load_partial(p, n), v);
    simd<T>::store_partial(p, v, n);
  }
}

/// R rows of C (R known at compile time) over the columns [0, cols), C batches at a time, then
/// one batch at a time, then the partial last batch.
template <class T, std::size_t R, std::size_t C, bool TransA>
inline void row_panel(std::size_t cols, std::size_t depth, const T* a, std::size_t lda, const T* b, std::size_t ldb,
                      T* c, std::size_t ldc, T alpha, T beta) {
  constexpr std::size_t w = lanes<T>;
  std::size_t j = 0;
  for (; j + C * w <= cols; j += C * w) micro_tile<T, R, C, TransA>(depth, a, lda, b + j, ldb, c + j, ldc, alpha, beta);
  for (; j + w <= cols; j += w) micro_tile<T, R, 1, TransA>(depth, a, lda, b + j, ldb, c + j, ldc, alpha, beta);
  if (j < cols) micro_tail<T, R, TransA>(cols - j, depth, a, lda, b + j, ldb, c + j, ldc, alpha, beta);
}

/// The last rows - fewer than a whole tile of R - with their count chosen at compile time.
template <class T, std::size_t R, std::size_t C, bool TransA>
inline void row_remainder(std::size_t rows, std::size_t cols, std::size_t depth, const T* a, std::size_t lda,
                          const T* b, std::size_t ldb, T* c, std::size_t ldc, T alpha, T beta) {
  if constexpr (R > 1) {
    if (rows == R - 1) return row_panel<T, R - 1, C, TransA>(cols, depth, a, lda, b, ldb, c, ldc, alpha, beta);
    row_remainder<T, R - 1, C, TransA>(rows, cols, depth, a, lda, b, ldb, c, ldc, alpha, beta);
  }
}

/// C = alpha · op(A) · B + beta · C with R × C register tiles.
template <class T, std::size_t R, std::size_t C, bool TransA>
void gemm_tiled(std::size_t rows, std::size_t cols, std::size_t depth, const T* a, std::size_t lda, const T* b,
                std::size_t ldb, T* c, std::size_t ldc, T alpha, T beta) {
  constexpr std::size_t unit = C * lanes<T>;
  const std::size_t width = std::max(unit, block_bytes / (sizeof(T) * std::max<std::size_t>(depth, 1)) / unit * unit);
  for (std::size_t j0 = 0; j0 < cols; j0 += width) {
    const std::size_t n = std::min(width, cols - j0);
    std::size_t i = 0;
    for (; i + R <= rows; i += R) {
      const T* ai = TransA ? a + i : a + i * lda;
      row_panel<T, R, C, TransA>(n, depth, ai, lda, b + j0, ldb, c + i * ldc + j0, ldc, alpha, beta);
    }
    if (i < rows)
      row_remainder<T, R, C, TransA>(rows - i, n, depth, TransA ? a + i : a + i * lda, lda, b + j0, ldb,
                                     c + i * ldc + j0, ldc, alpha, beta);
  }
}

/// C = alpha · op(A) · B + beta · C, all row-major; op(A) is rows × depth, any cols (a last
/// partial batch masked). With 32 vector
/// registers, a C several tiles wide gets 8 × 3 tiles (fewer loads of B per multiply-add: the
/// faster shape when B comes from L2), a narrow one 6 × 4 (a 64-wide C in one tile).
template <class T, bool TransA>
void gemm(std::size_t rows, std::size_t cols, std::size_t depth, const T* a, std::size_t lda, const T* b,
          std::size_t ldb, T* c, std::size_t ldc, T alpha, T beta) {
  if constexpr (wide_registers<T>) {
    if (cols >= 4 * 3 * lanes<T>)
      return gemm_tiled<T, 8, 3, TransA>(rows, cols, depth, a, lda, b, ldb, c, ldc, alpha, beta);
    return gemm_tiled<T, 6, 4, TransA>(rows, cols, depth, a, lda, b, ldb, c, ldc, alpha, beta);
  } else {
    return gemm_tiled<T, 4, 2, TransA>(rows, cols, depth, a, lda, b, ldb, c, ldc, alpha, beta);
  }
}

/// C[rows × cols] at (i, j) = alpha · A[i]·B[j] + beta · C for `rows` rows of A and `cols` rows
/// of B (at most the tile), over depth values.
template <class T, std::size_t R, std::size_t C>
inline void dot_tile(std::size_t depth, const T* a, std::size_t lda, const T* b, std::size_t ldb, T* c,
                     std::size_t ldc, T alpha, T beta) {
  constexpr std::size_t w = lanes<T>;
  batch<T> acc[R * C];
  SMEAR_UNROLL
  for (std::size_t l = 0; l < R * C; ++l) acc[l] = simd<T>::set1(T(0));
  std::size_t k = 0;
  for (; k + w <= depth; k += w) {
    batch<T> av[R], bv[C];
    SMEAR_UNROLL
    for (std::size_t r = 0; r < R; ++r) av[r] = simd<T>::load(a + r * lda + k);
    SMEAR_UNROLL
    for (std::size_t j = 0; j < C; ++j) bv[j] = simd<T>::load(b + j * ldb + k);
    SMEAR_UNROLL
    for (std::size_t r = 0; r < R; ++r)
      SMEAR_UNROLL
      for (std::size_t j = 0; j < C; ++j) acc[r * C + j] = simd<T>::fma(av[r], bv[j], acc[r * C + j]);
  }
  for (std::size_t r = 0; r < R; ++r)
    for (std::size_t j = 0; j < C; ++j) {
      T part[w];
      simd<T>::store(part, acc[r * C + j]);
      T s = T(0);
      for (std::size_t l = 0; l < w; ++l) s += part[l];
      for (std::size_t kk = k; kk < depth; ++kk) s += a[r * lda + kk] * b[j * ldb + kk];
      T& out = c[r * ldc + j];
      out = beta == T(0) ? alpha * s : alpha * s + beta * out;
    }
}

/// C = alpha · A · Bᵀ + beta · C, row-major A [rows × depth], B [cols × depth], C [rows × cols],
/// as dot products along the rows of both, for a deep product: tiles of R rows of A × C rows
/// of B, one accumulator batch each, summed across its lanes at the end (little next to the
/// depth). The depth is split into chunks whose rows of B stay in L2.
template <class T>
void gemm_nt(std::size_t rows, std::size_t cols, std::size_t depth, const T* a, std::size_t lda, const T* b,
             std::size_t ldb, T* c, std::size_t ldc, T alpha, T beta) {
  constexpr std::size_t R = wide_registers<T> ? 4 : 2, C = 4, w = lanes<T>;
  const std::size_t chunk = std::max<std::size_t>(256, block_bytes / (sizeof(T) * cols) / w * w);
  for (std::size_t k0 = 0; k0 < depth; k0 += chunk) {
    const std::size_t kc = std::min(chunk, depth - k0);
    const T beta_k = k0 == 0 ? beta : T(1);
    for (std::size_t i = 0; i < rows; i += R) {
      const std::size_t nr = std::min(R, rows - i);
      for (std::size_t j = 0; j < cols; j += C) {
        const std::size_t nc = std::min(C, cols - j);
        const T* ai = a + i * lda + k0;
        const T* bj = b + j * ldb + k0;
        T* cij = c + i * ldc + j;
        if (nr == R && nc == C)
          dot_tile<T, R, C>(kc, ai, lda, bj, ldb, cij, ldc, alpha, beta_k);
        else  // an edge tile, one dot product at a time
          for (std::size_t r = 0; r < nr; ++r)
            for (std::size_t q = 0; q < nc; ++q)
              dot_tile<T, 1, 1>(kc, ai + r * lda, lda, bj + q * ldb, ldb, cij + r * ldc + q, ldc, alpha, beta_k);
      }
    }
  }
}

