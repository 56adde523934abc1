#pragma once
/// \file backend/cpu/thread_pool.hpp
/// The cpu backend's threads: one pool per process, built at first use, whose idle workers
/// spin for a few microseconds and then sleep in the kernel (a futex), so that on a machine
/// shared with other busy processes they do not take the cores they wait for.
///
/// How many threads: `SMEAR_NUM_THREADS` if set, else `OMP_NUM_THREADS` (its first value),
/// else the CPUs this process may run on (its affinity mask), read once when the pool is made.
/// A smaller count for one layer (layer_options::threads) or for a stretch of code on one
/// thread (smear::backend::thread_limit) takes fewer of them.
///
/// One job runs at a time: a caller that finds the pool busy (another thread of the program is
/// using it) or that calls from inside a job runs its chunks on its own thread, each as a
/// worker would run it, so results never depend on who ran what.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace smear::backend {

namespace detail {

/// The value of a thread-count variable: a whole number ≥ 1 at its start, else 0.
inline std::size_t parse_thread_count(const char* text) noexcept {
  if (text == nullptr) return 0;
  char* end = nullptr;
  const long v = std::strtol(text, &end, 10);
  return end != text && v >= 1 && v <= 4096 ? static_cast<std::size_t>(v) : 0;
}

/// SMEAR_NUM_THREADS, OMP_NUM_THREADS, or the CPUs of the affinity mask (at least 1).
inline std::size_t default_thread_count() noexcept {
  if (const std::size_t n = parse_thread_count(std::getenv("SMEAR_NUM_THREADS"))) return n;
  if (const std::size_t n = parse_thread_count(std::getenv("OMP_NUM_THREADS"))) return n;
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return static_cast<std::size_t>(CPU_COUNT(&set));
#endif
  return std::max<std::size_t>(1, std::thread::hardware_concurrency());
}

inline void spin_pause() noexcept {
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

/// Waits until `pred()`: spinning for at most `spin`, then sleeping on `word` until it differs
/// from what it held (every change of the condition changes the word and notifies it).
template <class Word, class Pred>
void spin_then_wait(const std::atomic<Word>& word, Pred pred) {
  constexpr auto spin = std::chrono::microseconds(20);
  const auto start = std::chrono::steady_clock::now();
  for (unsigned i = 1;; ++i) {
    if (pred()) return;
    spin_pause();
    if (i % 64 == 0 && std::chrono::steady_clock::now() - start > spin) break;
  }
  for (;;) {
    const Word seen = word.load(std::memory_order_acquire);
    if (pred()) return;
    word.wait(seen, std::memory_order_acquire);
  }
}

/// Set in the child of a fork(): the pool's workers are not there, so everything runs inline.
inline std::atomic<bool>& forked() noexcept {
  static std::atomic<bool> flag{false};
  return flag;
}

/// Sets `slot` to `value` for its lifetime, then back to what it held (also on a throw).
template <class T>
class scoped_set {
 public:
  scoped_set(T& slot, T value) noexcept : slot_(slot), outer_(std::exchange(slot, value)) {}
  scoped_set(const scoped_set&) = delete;
  scoped_set& operator=(const scoped_set&) = delete;
  ~scoped_set() { slot_ = outer_; }

 private:
  T& slot_;
  T outer_;
};

/// True on a thread while it runs a chunk of a job: a nested parallel call runs inline.
inline bool& inside_job() noexcept {
  thread_local bool inside = false;
  return inside;
}

}  // namespace detail

/// A fixed set of worker threads that runs one job at a time: task(c) for each chunk c of
/// [0, chunks), the chunks claimed one by one by the caller and the workers alike.
class thread_pool {
 public:
  /// A pool of `threads` threads in all: the caller of run() and threads − 1 workers.
  explicit thread_pool(std::size_t threads) {
    threads = std::max<std::size_t>(threads, 1);
    workers_.reserve(threads - 1);
    for (std::size_t i = 1; i < threads; ++i) workers_.emplace_back([this] { work_loop(); });
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  ~thread_pool() {
    stop_.store(true, std::memory_order_release);
    wake_.fetch_add(1, std::memory_order_release);
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  /// The caller and the workers.
  std::size_t size() const noexcept { return workers_.size() + 1; }

  /// The process's pool, made at the first call with default_thread_count() threads. It is
  /// never destroyed (its workers sleep until the process exits), so smear may be called from
  /// static destructors.
  static thread_pool& shared() {
    static thread_pool* pool = [] {
#if defined(__unix__) || defined(__APPLE__)
      pthread_atfork(nullptr, nullptr, [] { detail::forked().store(true); });
#endif
      return new thread_pool(detail::default_thread_count());
    }();
    return *pool;
  }

  /// Runs task(c) for every c in [0, chunks) and returns after all have run, rethrowing the
  /// first exception a chunk threw. The workers and the caller share the chunks; when the pool
  /// cannot take the job (busy, called from a job, or a forked child) the caller runs them all.
  /// Either way a chunk runs as inside a job (a nested call runs inline). Returns whether the
  /// workers took part.
  template <class F>
  bool run(std::size_t chunks, F& task) {
    if (chunks < 2 || workers_.empty() || detail::inside_job() || chunks > max_chunks ||
        detail::forked().load(std::memory_order_relaxed))
      return run_here(chunks, task);
    std::unique_lock lock(submit_, std::try_to_lock);
    if (!lock.owns_lock()) return run_here(chunks, task);
    invoke_ = [](void* ctx, std::size_t c) { (*static_cast<F*>(ctx))(c); };
    ctx_ = &task;
    error_ = nullptr;
    remaining_.store(static_cast<std::uint32_t>(chunks), std::memory_order_relaxed);
    generation_ = (generation_ + 1) & generation_mask;
    state_.store(pack(generation_, chunks, 0), std::memory_order_release);
    wake_.fetch_add(1, std::memory_order_release);
    wake_.notify_all();
    work(generation_);
    detail::spin_then_wait(remaining_, [&] { return remaining_.load(std::memory_order_acquire) == 0; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
    return true;
  }

 private:
  template <class F>
  static bool run_here(std::size_t chunks, F& task) {
    const detail::scoped_set<bool> inside(detail::inside_job(), true);
    for (std::size_t c = 0; c < chunks; ++c) task(c);
    return false;
  }

  // The claim word: generation (24 bits) | chunk count (20 bits) | next chunk (20 bits). A
  // worker claims a chunk only of the job whose generation it read, so one that wakes late
  // cannot take a chunk of the next job with the previous job's task.
  static constexpr std::uint64_t field_bits = 20, field_mask = (std::uint64_t{1} << field_bits) - 1,
                                 generation_mask = (std::uint64_t{1} << 24) - 1;
  static constexpr std::size_t max_chunks = field_mask;
  static std::uint64_t pack(std::uint64_t generation, std::uint64_t chunks, std::uint64_t next) noexcept {
    return generation << (2 * field_bits) | chunks << field_bits | next;
  }

  /// Claims and runs chunks of job `generation` until none is left.
  void work(std::uint64_t generation) {
    std::uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      const std::uint64_t next = s & field_mask, chunks = (s >> field_bits) & field_mask;
      if ((s >> (2 * field_bits)) != generation || next >= chunks) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      // the job cannot end before this chunk does: invoke_ and ctx_ are this job's
      detail::inside_job() = true;
      try {
        invoke_(ctx_, static_cast<std::size_t>(next));
      } catch (...) {
        const std::lock_guard guard(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      detail::inside_job() = false;
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) remaining_.notify_all();
      s = state_.load(std::memory_order_acquire);
    }
  }

  void work_loop() {
    // the value before any job or stop: a worker that starts late still sees every bump
    std::uint32_t seen = 0;
    for (;;) {
      detail::spin_then_wait(wake_, [&] { return wake_.load(std::memory_order_acquire) != seen; });
      seen = wake_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_acquire)) return;
      work(state_.load(std::memory_order_acquire) >> (2 * field_bits));
    }
  }

  std::vector<std::thread> workers_;
  std::mutex submit_;  // held by the caller whose job runs
  std::atomic<std::uint64_t> state_{0};
  std::atomic<std::uint32_t> wake_{0};       // bumped (and notified) when a job starts
  std::atomic<std::uint32_t> remaining_{0};  // chunks not finished
  std::atomic<bool> stop_{false};
  std::uint64_t generation_ = 0;  // the caller's copy (under submit_)
  void (*invoke_)(void*, std::size_t) = nullptr;
  void* ctx_ = nullptr;
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

namespace detail {
/// The smallest limit of the thread_limit scopes open on this thread; 0 when none is.
inline std::size_t& thread_limit_value() noexcept {
  thread_local std::size_t limit = 0;
  return limit;
}
}  // namespace detail

/// While it lives, the cpu backend's work started on this thread uses at most `threads`
/// threads (0: no limit). Scopes nest, the smallest limit winning; a layer opens one for its
/// layer_options::threads around each call.
class thread_limit {
 public:
  explicit thread_limit(std::size_t threads) noexcept : previous_(detail::thread_limit_value()) {
    if (threads != 0 && (previous_ == 0 || threads < previous_)) detail::thread_limit_value() = threads;
  }
  thread_limit(const thread_limit&) = delete;
  thread_limit& operator=(const thread_limit&) = delete;
  ~thread_limit() { detail::thread_limit_value() = previous_; }

 private:
  std::size_t previous_;
};

}  // namespace smear::backend
