// The allocation counter of tests/support/allocations.hpp: every replaceable form of global
// operator new and delete and, outside sanitizer builds on glibc, malloc and its relatives,
// counted while a count_allocations call runs. Linked into each test program that counts.

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#include "support/allocations.hpp"

#if defined(__SANITIZE_ADDRESS__)
#define SMEAR_TEST_COUNT_MALLOC 0  // the sanitizer owns malloc; count operator new only
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SMEAR_TEST_COUNT_MALLOC 0
#endif
#endif
#if !defined(SMEAR_TEST_COUNT_MALLOC) && defined(__GLIBC__)
#define SMEAR_TEST_COUNT_MALLOC 1
#endif
#ifndef SMEAR_TEST_COUNT_MALLOC
#define SMEAR_TEST_COUNT_MALLOC 0
#endif

namespace {
std::atomic<bool> counting{false};
std::atomic<std::size_t> allocations{0};

void note_allocation() noexcept {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
}

void* allocate(std::size_t n, std::size_t align) {
  note_allocation();
  if (n == 0) n = 1;
  void* p = align > alignof(std::max_align_t) ? std::aligned_alloc(align, (n + align - 1) / align * align)
                                              : std::malloc(n);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

/// Out of line, so the compiler does not see operator new's memory reach std::free (which is
/// how replacement operators are written) and warn about a mismatch.
[[gnu::noinline]] void release(void* p) noexcept { std::free(p); }

}  // namespace

// Every replaceable form of global new and delete.
void* operator new(std::size_t n) { return allocate(n, 0); }
void* operator new[](std::size_t n) { return allocate(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return allocate(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return allocate(n, static_cast<std::size_t>(a)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return allocate(n, 0);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return allocate(n, 0);
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p) noexcept { release(p); }
void operator delete[](void* p) noexcept { release(p); }
void operator delete(void* p, std::size_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t) noexcept { release(p); }
void operator delete(void* p, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::align_val_t) noexcept { release(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { release(p); }

#if SMEAR_TEST_COUNT_MALLOC
// glibc lets a program replace malloc and its relatives; these count and forward to glibc's own.
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

void* malloc(std::size_t n) {
  note_allocation();
  return __libc_malloc(n);
}
void* calloc(std::size_t count, std::size_t n) {
  note_allocation();
  return __libc_calloc(count, n);
}
void* realloc(void* p, std::size_t n) {
  note_allocation();
  return __libc_realloc(p, n);
}
void* memalign(std::size_t align, std::size_t n) {
  note_allocation();
  return __libc_memalign(align, n);
}
void* aligned_alloc(std::size_t align, std::size_t n) {
  note_allocation();
  return __libc_memalign(align, n);
}
int posix_memalign(void** out, std::size_t align, std::size_t n) {
  note_allocation();
  void* p = __libc_memalign(align, n);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}
void free(void* p) { __libc_free(p); }
}
#endif

namespace smear::testing {

std::size_t count_allocations(const std::function<void()>& f) {
  allocations = 0;
  counting = true;
  f();
  counting = false;
  return allocations.load();
}

bool counts_malloc() noexcept { return SMEAR_TEST_COUNT_MALLOC != 0; }

}  // namespace smear::testing
