#pragma once
// A small ResNet (BasicBlocks in ResNet-18's stage layout, width and depth scalable) with
// forward and backward passes, and SMEAR routing blocks inside its residual blocks.
//
// Feature maps are NHWC ([batch, height, width, channels], row-major), so a convolution is an
// im2col followed by one GEMM and a map's positions are directly smear's tokens.
//
// Two modes:
//  - pre-training: every backbone weight trains, batch norm uses batch statistics and updates
//    its running statistics; no routing blocks;
//  - adaptation: the backbone is frozen (batch norm in inference mode, no backbone gradients),
//    each residual block starts with a routing block x ← x + f(norm(x)), the classifier head and
//    the routing blocks train. norm is a frozen per-channel standardisation, f is a smear::layer
//    over the positions of the map (tokens), its router reading their mean: the global average
//    pool of the normalised block input. The expert type and N are chosen at run time
//    (adapter_config): the blocks hold them as examples::any_layer.

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <smear/smear.hpp>

#include "common/any_layer.hpp"

namespace resnet {

template <class T>
using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using mmap = Eigen::Map<matrix<T>>;
template <class T>
using cmap = Eigen::Map<const matrix<T>>;

/// Shape of an NHWC batch of feature maps.
struct shape4 {
  std::size_t n = 0, h = 0, w = 0, c = 0;
  std::size_t size() const { return n * h * w * c; }
  std::size_t positions() const { return n * h * w; }
};

/// A trainable tensor with its gradient.
template <class T>
struct tensor {
  std::string name;
  std::vector<std::size_t> shape;
  std::vector<T> value, grad;
  bool decay = true;

  tensor(std::string n, std::vector<std::size_t> s, bool d = true) : name(std::move(n)), shape(std::move(s)), decay(d) {
    std::size_t count = 1;
    for (auto v : shape) count *= v;
    value.assign(count, T(0));
    grad.assign(count, T(0));
  }
  void zero_grad() { std::fill(grad.begin(), grad.end(), T(0)); }
  smear::parameter<T> parameter() { return {name, value, grad, decay}; }
};

/// k×k convolution, no bias (batch norm follows), zero padding k/2.
template <class T>
class conv2d {
 public:
  conv2d(std::string name, std::size_t cin, std::size_t cout, std::size_t k, std::size_t stride)
      : weight(name + ".weight", {k, k, cin, cout}), cin_(cin), cout_(cout), k_(k), stride_(stride) {}

  tensor<T> weight;  ///< [k, k, cin, cout]: row (u·k + v)·cin + c of a [k²·cin, cout] matrix

  shape4 output_shape(shape4 s) const {
    const std::size_t pad = k_ / 2;
    return {s.n, (s.h + 2 * pad - k_) / stride_ + 1, (s.w + 2 * pad - k_) / stride_ + 1, cout_};
  }

  /// He-normal initialisation.
  void initialize(smear::rng& gen) {
    const double std = std::sqrt(2.0 / static_cast<double>(k_ * k_ * cin_));
    for (auto& v : weight.value) v = static_cast<T>(std * gen.normal());
  }

  void forward(const std::vector<T>& x, shape4 s, std::vector<T>& y) {
    const shape4 o = output_shape(s);
    y.resize(o.size());
    const T* cols = unrolled(x, s);
    mmap<T>(y.data(), static_cast<Eigen::Index>(o.positions()), static_cast<Eigen::Index>(cout_)).noalias() =
        cmap<T>(cols, static_cast<Eigen::Index>(o.positions()), static_cast<Eigen::Index>(rows())) *
        cmap<T>(weight.value.data(), static_cast<Eigen::Index>(rows()), static_cast<Eigen::Index>(cout_));
  }

  /// dx ← ∂ℓ/∂x (when `dx` is given); weight.grad += ∂ℓ/∂W when `weight_grad`.
  void backward(const std::vector<T>& x, shape4 s, const std::vector<T>& dy, std::vector<T>* dx,
                bool weight_grad) {
    const shape4 o = output_shape(s);
    const auto P = static_cast<Eigen::Index>(o.positions());
    const auto R = static_cast<Eigen::Index>(rows()), C = static_cast<Eigen::Index>(cout_);
    cmap<T> dym(dy.data(), P, C);
    if (weight_grad) {
      const T* cols = unrolled(x, s);
      mmap<T>(weight.grad.data(), R, C).noalias() += cmap<T>(cols, P, R).transpose() * dym;
    }
    if (dx != nullptr) {
      dx->resize(s.size());
      if (direct(s)) {
        mmap<T>(dx->data(), P, R).noalias() = dym * cmap<T>(weight.value.data(), R, C).transpose();
        return;
      }
      cols_.resize(o.positions() * rows());
      mmap<T>(cols_.data(), P, R).noalias() = dym * cmap<T>(weight.value.data(), R, C).transpose();
      col2im(s, *dx);
    }
  }

 private:
  std::size_t rows() const { return k_ * k_ * cin_; }
  bool direct(shape4) const { return k_ == 1 && stride_ == 1; }

  /// The im2col matrix [positions, k²·cin] of x (x itself for a 1×1 stride-1 convolution).
  const T* unrolled(const std::vector<T>& x, shape4 s) {
    if (direct(s)) return x.data();
    const shape4 o = output_shape(s);
    const std::size_t pad = k_ / 2;
    cols_.resize(o.positions() * rows());
    T* out = cols_.data();
    for (std::size_t n = 0; n < s.n; ++n)
      for (std::size_t i = 0; i < o.h; ++i)
        for (std::size_t j = 0; j < o.w; ++j)
          for (std::size_t u = 0; u < k_; ++u)
            for (std::size_t v = 0; v < k_; ++v, out += cin_) {
              const std::size_t si = i * stride_ + u, sj = j * stride_ + v;  // shifted by pad
              if (si < pad || si >= s.h + pad || sj < pad || sj >= s.w + pad) {
                std::fill(out, out + cin_, T(0));
              } else {
                const T* in = x.data() + ((n * s.h + si - pad) * s.w + sj - pad) * cin_;
                std::copy(in, in + cin_, out);
              }
            }
    return cols_.data();
  }

  /// Adjoint of unrolled(): adds each column back onto the position it was read from.
  void col2im(shape4 s, std::vector<T>& dx) const {
    const shape4 o = output_shape(s);
    const std::size_t pad = k_ / 2;
    std::fill(dx.begin(), dx.end(), T(0));
    const T* in = cols_.data();
    for (std::size_t n = 0; n < s.n; ++n)
      for (std::size_t i = 0; i < o.h; ++i)
        for (std::size_t j = 0; j < o.w; ++j)
          for (std::size_t u = 0; u < k_; ++u)
            for (std::size_t v = 0; v < k_; ++v, in += cin_) {
              const std::size_t si = i * stride_ + u, sj = j * stride_ + v;
              if (si < pad || si >= s.h + pad || sj < pad || sj >= s.w + pad) continue;
              T* out = dx.data() + ((n * s.h + si - pad) * s.w + sj - pad) * cin_;
              for (std::size_t c = 0; c < cin_; ++c) out[c] += in[c];
            }
  }

  std::size_t cin_, cout_, k_, stride_;
  std::vector<T> cols_;
};

/// Batch normalisation over N·H·W per channel. `training`: batch statistics (and running
/// statistics updated with momentum 0.1); otherwise the running statistics (inference mode).
template <class T>
class batch_norm {
 public:
  batch_norm(std::string name, std::size_t c)
      : gamma(name + ".weight", {c}, false), beta(name + ".bias", {c}, false),
        running_mean(c, T(0)), running_var(c, T(1)), c_(c) {
    std::fill(gamma.value.begin(), gamma.value.end(), T(1));
  }

  tensor<T> gamma, beta;
  std::vector<T> running_mean, running_var;
  static constexpr double eps = 1e-5;
  static constexpr double momentum = 0.1;

  void forward(const std::vector<T>& x, shape4 s, std::vector<T>& y, bool training) {
    const std::size_t M = s.positions();
    y.resize(x.size());
    xhat_.resize(x.size());
    inv_std_.resize(c_);
    std::vector<double> mean(c_, 0.0), var(c_, 0.0);
    if (training) {
      for (std::size_t p = 0; p < M; ++p)
        for (std::size_t c = 0; c < c_; ++c) mean[c] += static_cast<double>(x[p * c_ + c]);
      for (auto& m : mean) m /= static_cast<double>(M);
      for (std::size_t p = 0; p < M; ++p)
        for (std::size_t c = 0; c < c_; ++c) {
          const double d = static_cast<double>(x[p * c_ + c]) - mean[c];
          var[c] += d * d;
        }
      for (std::size_t c = 0; c < c_; ++c) {
        var[c] /= static_cast<double>(M);
        const double unbiased = M > 1 ? var[c] * static_cast<double>(M) / static_cast<double>(M - 1) : var[c];
        running_mean[c] = static_cast<T>((1 - momentum) * static_cast<double>(running_mean[c]) + momentum * mean[c]);
        running_var[c] = static_cast<T>((1 - momentum) * static_cast<double>(running_var[c]) + momentum * unbiased);
      }
    } else {
      for (std::size_t c = 0; c < c_; ++c) {
        mean[c] = static_cast<double>(running_mean[c]);
        var[c] = static_cast<double>(running_var[c]);
      }
    }
    std::vector<T> m(c_);
    for (std::size_t c = 0; c < c_; ++c) {
      inv_std_[c] = static_cast<T>(1.0 / std::sqrt(var[c] + eps));
      m[c] = static_cast<T>(mean[c]);
    }
    for (std::size_t p = 0; p < M; ++p)
      for (std::size_t c = 0; c < c_; ++c) {
        const std::size_t i = p * c_ + c;
        xhat_[i] = (x[i] - m[c]) * inv_std_[c];
        y[i] = xhat_[i] * gamma.value[c] + beta.value[c];
      }
  }

  /// dx ← ∂ℓ/∂x; gamma/beta gradients accumulate when `weight_grad`. `training` must match the
  /// forward's.
  void backward(const std::vector<T>& dy, shape4 s, std::vector<T>& dx, bool training, bool weight_grad) {
    const std::size_t M = s.positions();
    dx.resize(dy.size());
    std::vector<double> sum_dy(c_, 0.0), sum_dy_xhat(c_, 0.0);
    if (weight_grad || training)
      for (std::size_t p = 0; p < M; ++p)
        for (std::size_t c = 0; c < c_; ++c) {
          const std::size_t i = p * c_ + c;
          sum_dy[c] += static_cast<double>(dy[i]);
          sum_dy_xhat[c] += static_cast<double>(dy[i]) * static_cast<double>(xhat_[i]);
        }
    if (weight_grad)
      for (std::size_t c = 0; c < c_; ++c) {
        gamma.grad[c] += static_cast<T>(sum_dy_xhat[c]);
        beta.grad[c] += static_cast<T>(sum_dy[c]);
      }
    if (!training) {
      for (std::size_t p = 0; p < M; ++p)
        for (std::size_t c = 0; c < c_; ++c) dx[p * c_ + c] = dy[p * c_ + c] * gamma.value[c] * inv_std_[c];
      return;
    }
    // dx = γ/σ · (dy − mean(dy) − x̂·mean(dy·x̂))
    std::vector<T> a(c_), b(c_), k(c_);
    for (std::size_t c = 0; c < c_; ++c) {
      k[c] = gamma.value[c] * inv_std_[c];
      a[c] = static_cast<T>(sum_dy[c] / static_cast<double>(M));
      b[c] = static_cast<T>(sum_dy_xhat[c] / static_cast<double>(M));
    }
    for (std::size_t p = 0; p < M; ++p)
      for (std::size_t c = 0; c < c_; ++c) {
        const std::size_t i = p * c_ + c;
        dx[i] = k[c] * (dy[i] - a[c] - xhat_[i] * b[c]);
      }
  }

  std::size_t channels() const { return c_; }

 private:
  std::size_t c_;
  std::vector<T> xhat_, inv_std_;
};

template <class T>
void relu_inplace(std::vector<T>& x) {
  for (auto& v : x) v = std::max(v, T(0));
}
/// g ← g where the ReLU's output y > 0, else 0.
template <class T>
void relu_backward(const std::vector<T>& y, std::vector<T>& g) {
  for (std::size_t i = 0; i < g.size(); ++i)
    if (!(y[i] > T(0))) g[i] = T(0);
}

/// x ← x + f(norm(x)) over the positions of each example's map, f a SMEAR layer (built
/// without its own residual: the block adds x itself, not norm(x)).
template <class T>
class routing_block {
 public:
  routing_block(examples::any_layer<T> layer, std::size_t channels)
      : mean(channels, T(0)), inv_std(channels, T(1)), c_(channels), layer_(std::move(layer)) {}

  std::vector<T> mean, inv_std;  ///< the frozen standardisation norm(x) = (x − mean)·inv_std

  examples::any_layer<T>& layer() { return layer_; }

  /// Sets mean and inv_std from the statistics of the maps seen by accumulate().
  void begin_statistics() {
    sum_.assign(c_, 0.0);
    sum2_.assign(c_, 0.0);
    count_ = 0;
  }
  void accumulate(const std::vector<T>& x) {
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double v = static_cast<double>(x[i]);
      sum_[i % c_] += v;
      sum2_[i % c_] += v * v;
    }
    count_ += x.size() / c_;
  }
  void end_statistics() {
    for (std::size_t c = 0; c < c_; ++c) {
      const double m = sum_[c] / static_cast<double>(count_);
      const double var = std::max(sum2_[c] / static_cast<double>(count_) - m * m, 0.0);
      mean[c] = static_cast<T>(m);
      inv_std[c] = static_cast<T>(1.0 / std::sqrt(var + 1e-5));
    }
  }

  /// `in`: what the strategy needs (tags for tag routing and latent skills, ids for hashing).
  void forward(std::vector<T>& x, shape4 s, smear::route_inputs in = {}) {
    tokens_.resize(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) tokens_[i] = (x[i] - mean[i % c_]) * inv_std[i % c_];
    out_.resize(x.size());
    layer_.forward(smear::map_tokens<const T>(tokens_.data(), {s.n, s.c, s.h, s.w}), out_, in);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += out_[i];
  }

  /// g = ∂ℓ/∂(block output) on entry, ∂ℓ/∂(block input) on return; the layer's gradients
  /// accumulate. `example_losses`: each example's loss, for REINFORCE.
  void backward(std::vector<T>& g, std::span<const T> example_losses = {}) {
    dtokens_.resize(g.size());
    layer_.backward(g, dtokens_, example_losses);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] += dtokens_[i] * inv_std[i % c_];
  }

 private:
  std::size_t c_;
  examples::any_layer<T> layer_;
  std::vector<T> tokens_, out_, dtokens_;
  std::vector<double> sum_, sum2_;
  std::size_t count_ = 0;
};

/// Architecture of the network.
struct architecture {
  std::size_t image = 32;                     ///< input side (square RGB images)
  std::size_t width = 16;                     ///< channels of the first stage (ResNet-18: 64)
  std::vector<std::size_t> blocks{2, 2, 2, 2};///< BasicBlocks per stage (ResNet-18: 2, 2, 2, 2)
  std::size_t stem_stride = 2;                ///< stride of the 3×3 stem convolution
};

/// How the routing blocks are built.
struct adapter_config {
  bool conv = false;            ///< smear::conv_adapter (3×3) instead of smear::adapter (per position)
  std::size_t experts = 6;      ///< N: 1, 6 or 12, the sizes compiled (see network::make_layer)
  std::size_t reduction = 4;    ///< bottleneck = max(1, channels / reduction) · widen
  std::size_t widen = 1;        ///< bottleneck multiplier ("dense": one expert as large as N)
  smear::layer_options layer{};
};

/// A ResNet BasicBlock: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x)), optionally preceded
/// (inside the block) by a routing block.
template <class T>
class basic_block {
 public:
  basic_block(const std::string& name, std::size_t cin, std::size_t cout, std::size_t stride)
      : conv1(name + ".conv1", cin, cout, 3, stride), bn1(name + ".bn1", cout),
        conv2(name + ".conv2", cout, cout, 3, 1), bn2(name + ".bn2", cout) {
    if (stride != 1 || cin != cout) {
      sc_conv = std::make_unique<conv2d<T>>(name + ".downsample.0", cin, cout, 1, stride);
      sc_bn = std::make_unique<batch_norm<T>>(name + ".downsample.1", cout);
    }
  }

  conv2d<T> conv1;
  batch_norm<T> bn1;
  conv2d<T> conv2;
  batch_norm<T> bn2;
  std::unique_ptr<conv2d<T>> sc_conv;
  std::unique_ptr<batch_norm<T>> sc_bn;
  std::unique_ptr<routing_block<T>> route;

  /// x is the block input on entry and the block output on return.
  shape4 forward(std::vector<T>& x, shape4 s, bool training, smear::route_inputs in = {}) {
    if (route) route->forward(x, s, in);
    in_ = x;
    in_shape_ = s;
    conv1.forward(in_, s, a1_);
    const shape4 o = conv1.output_shape(s);
    bn1.forward(a1_, o, h1_, training);
    relu_inplace(h1_);
    conv2.forward(h1_, o, a2_);
    bn2.forward(a2_, o, x, training);
    if (sc_conv) {
      sc_conv->forward(in_, s, sa_);
      sc_bn->forward(sa_, o, sb_, training);
      for (std::size_t i = 0; i < x.size(); ++i) x[i] += sb_[i];
    } else {
      for (std::size_t i = 0; i < x.size(); ++i) x[i] += in_[i];
    }
    relu_inplace(x);
    out_ = x;
    return o;
  }

  /// g = ∂ℓ/∂output on entry, ∂ℓ/∂input on return. `training` (pre-training) also
  /// accumulates the backbone's gradients.
  void backward(std::vector<T>& g, bool training, std::span<const T> example_losses = {}) {
    const shape4 s = in_shape_, o = conv1.output_shape(s);
    relu_backward(out_, g);
    bn2.backward(g, o, t1_, training, training);
    conv2.backward(h1_, o, t1_, &t2_, training);
    relu_backward(h1_, t2_);
    bn1.backward(t2_, o, t1_, training, training);
    conv1.backward(in_, s, t1_, &t2_, training);  // t2_ = ∂ℓ/∂in through the main path
    if (sc_conv) {
      sc_bn->backward(g, o, t1_, training, training);
      sc_conv->backward(in_, s, t1_, &g, training);
    }
    // g now holds ∂ℓ/∂in through the shortcut (identity: the sum's gradient itself)
    for (std::size_t i = 0; i < g.size(); ++i) g[i] += t2_[i];
    if (route) route->backward(g, example_losses);
  }

  const std::vector<T>& input() const { return in_; }
  shape4 input_shape() const { return in_shape_; }

  void collect(std::vector<tensor<T>*>& out) {
    out.push_back(&conv1.weight);
    out.push_back(&bn1.gamma);
    out.push_back(&bn1.beta);
    out.push_back(&conv2.weight);
    out.push_back(&bn2.gamma);
    out.push_back(&bn2.beta);
    if (sc_conv) {
      out.push_back(&sc_conv->weight);
      out.push_back(&sc_bn->gamma);
      out.push_back(&sc_bn->beta);
    }
  }
  void collect_norms(std::vector<batch_norm<T>*>& out) {
    out.push_back(&bn1);
    out.push_back(&bn2);
    if (sc_bn) out.push_back(sc_bn.get());
  }

 private:
  std::vector<T> in_, a1_, h1_, a2_, sa_, sb_, out_, t1_, t2_;
  shape4 in_shape_;
};

/// Stem, stages of BasicBlocks, global average pool, linear classifier.
template <class T>
class network {
 public:
  using block_type = basic_block<T>;
  using routing_type = routing_block<T>;

 private:
  architecture arch_;  // first: the members below are built from it

 public:
  network(architecture arch, std::size_t classes, std::uint64_t seed)
      : arch_(std::move(arch)), stem("stem.conv", 3, arch_.width, 3, arch_.stem_stride), stem_bn("stem.bn", arch_.width),
        head_w("head.weight", {1, 1}), head_b("head.bias", {1}, false) {
    std::size_t cin = arch_.width;
    for (std::size_t st = 0; st < arch_.blocks.size(); ++st) {
      const std::size_t cout = arch_.width << st;
      for (std::size_t b = 0; b < arch_.blocks[st]; ++b) {
        const std::string name = "layer" + std::to_string(st + 1) + "." + std::to_string(b);
        blocks.push_back(std::make_unique<block_type>(name, cin, cout, (b == 0 && st > 0) ? 2 : 1));
        cin = cout;
      }
    }
    features_ = cin;
    smear::rng gen{seed};
    stem.initialize(gen);
    for (auto& b : blocks) {
      b->conv1.initialize(gen);
      b->conv2.initialize(gen);
      if (b->sc_conv) b->sc_conv->initialize(gen);
    }
    reset_head(classes, seed + 1);
  }

  conv2d<T> stem;
  batch_norm<T> stem_bn;
  std::vector<std::unique_ptr<block_type>> blocks;
  tensor<T> head_w, head_b;  ///< [features, classes], [classes]

  const architecture& arch() const { return arch_; }
  std::size_t features() const { return features_; }
  std::size_t classes() const { return classes_; }

  /// A fresh classifier for `classes` classes.
  void reset_head(std::size_t classes, std::uint64_t seed) {
    classes_ = classes;
    head_w = tensor<T>("head.weight", {features_, classes});
    head_b = tensor<T>("head.bias", {classes}, false);
    smear::rng gen{seed};
    const double bound = 1.0 / std::sqrt(static_cast<double>(features_));
    for (auto& v : head_w.value) v = static_cast<T>(bound * (2 * gen.uniform() - 1));
  }

  /// The input shape of each block for a batch of `n` images.
  std::vector<shape4> block_shapes(std::size_t n) const {
    std::vector<shape4> out;
    shape4 s = stem.output_shape({n, arch_.image, arch_.image, 3});
    for (const auto& b : blocks) {
      out.push_back(s);
      s = b->conv1.output_shape(s);
    }
    return out;
  }

  /// Adds a routing block to every residual block.
  void add_routing(const adapter_config& cfg, std::uint64_t seed) {
    const auto shapes = block_shapes(1);
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      const shape4 s = shapes[i];
      const std::size_t m = std::max<std::size_t>(1, s.c / cfg.reduction) * cfg.widen;
      blocks[i]->route = std::make_unique<routing_type>(make_layer(cfg, s, m, seed + 7919 * (i + 1)), s.c);
    }
  }

  bool routed() const { return !blocks.empty() && blocks.front()->route != nullptr; }

  /// Logits [n, classes] of NHWC images [n, image, image, 3]. `training` selects batch
  /// statistics in batch norm (pre-training); `in` goes to every routing block.
  const std::vector<T>& forward(const std::vector<T>& images, std::size_t n, bool training,
                                smear::route_inputs in = {}) {
    training_ = training;
    n_ = n;
    const shape4 s{n, arch_.image, arch_.image, 3};
    input_ = &images;
    stem.forward(images, s, a0_);
    const shape4 o = stem.output_shape(s);
    stem_bn.forward(a0_, o, x_, training);
    relu_inplace(x_);
    h0_ = x_;
    shape4 cur = o;
    for (auto& b : blocks) cur = b->forward(x_, cur, training, in);
    last_ = cur;
    // global average pool
    pooled_.assign(n * features_, T(0));
    const std::size_t hw = cur.h * cur.w;
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t p = 0; p < hw; ++p)
        for (std::size_t c = 0; c < features_; ++c) pooled_[i * features_ + c] += x_[(i * hw + p) * features_ + c];
    for (auto& v : pooled_) v /= static_cast<T>(hw);
    logits_.resize(n * classes_);
    mmap<T> lg(logits_.data(), static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(classes_));
    lg.noalias() = cmap<T>(pooled_.data(), static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(features_)) *
                   cmap<T>(head_w.value.data(), static_cast<Eigen::Index>(features_), static_cast<Eigen::Index>(classes_));
    lg.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(head_b.value.data(),
                                                                         static_cast<Eigen::Index>(classes_));
    return logits_;
  }

  /// Given ∂ℓ/∂logits, accumulates the gradients of the head, of the routing blocks and, in
  /// training (pre-training) mode, of the backbone. Returns ∂ℓ/∂images. `example_losses`
  /// (each example's loss) is passed to the routing blocks, for REINFORCE.
  const std::vector<T>& backward(const std::vector<T>& dlogits, std::span<const T> example_losses = {}) {
    const std::size_t n = n_, F = features_, K = classes_;
    const auto En = static_cast<Eigen::Index>(n), EF = static_cast<Eigen::Index>(F), EK = static_cast<Eigen::Index>(K);
    cmap<T> dl(dlogits.data(), En, EK);
    mmap<T>(head_w.grad.data(), EF, EK).noalias() += cmap<T>(pooled_.data(), En, EF).transpose() * dl;
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t k = 0; k < K; ++k) head_b.grad[k] += dlogits[i * K + k];
    dpooled_.resize(n * F);
    mmap<T>(dpooled_.data(), En, EF).noalias() = dl * cmap<T>(head_w.value.data(), EF, EK).transpose();
    const std::size_t hw = last_.h * last_.w;
    g_.resize(last_.size());
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t p = 0; p < hw; ++p)
        for (std::size_t c = 0; c < F; ++c) g_[(i * hw + p) * F + c] = dpooled_[i * F + c] / static_cast<T>(hw);
    for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) (*it)->backward(g_, training_, example_losses);
    const shape4 s{n, arch_.image, arch_.image, 3};
    const shape4 o = stem.output_shape(s);
    relu_backward(h0_, g_);
    stem_bn.backward(g_, o, t_, training_, training_);
    stem.backward(*input_, s, t_, &dinput_, training_);
    return dinput_;
  }

  /// Backbone tensors (stem, blocks), in a fixed order.
  std::vector<tensor<T>*> backbone_tensors() {
    std::vector<tensor<T>*> out{&stem.weight, &stem_bn.gamma, &stem_bn.beta};
    for (auto& b : blocks) b->collect(out);
    return out;
  }
  std::vector<batch_norm<T>*> norms() {
    std::vector<batch_norm<T>*> out{&stem_bn};
    for (auto& b : blocks) b->collect_norms(out);
    return out;
  }

  /// Pre-training: the backbone and the head. Adaptation: the routing blocks and the head.
  smear::parameter_list<T> parameters(bool backbone) {
    smear::parameter_list<T> out;
    if (backbone)
      for (auto* t : backbone_tensors()) out.push_back(t->parameter());
    for (std::size_t i = 0; i < blocks.size(); ++i)
      if (blocks[i]->route)
        for (auto& p : blocks[i]->route->layer().parameters()) {
          p.name = "block" + std::to_string(i) + "." + p.name;
          out.push_back(p);
        }
    out.push_back(head_w.parameter());
    out.push_back(head_b.parameter());
    return out;
  }

  void zero_grad() {
    for (auto* t : backbone_tensors()) t->zero_grad();
    for (auto& b : blocks)
      if (b->route) b->route->layer().zero_grad();
    head_w.zero_grad();
    head_b.zero_grad();
  }

  /// Sets every routing block's standardisation from the block inputs over `batches` (calls
  /// `next(images, n)` until it returns false; inference mode).
  template <class Next>
  void calibrate_routing(Next&& next) {
    for (auto& b : blocks) b->route->begin_statistics();
    std::vector<T> images;
    std::size_t n = 0;
    // forward without routing: the routing blocks start as the identity anyway, but their
    // statistics must not depend on their own (untrained) output
    std::vector<std::unique_ptr<routing_type>> held;
    for (auto& b : blocks) held.push_back(std::move(b->route));
    while (next(images, n)) {
      forward(images, n, false);
      for (std::size_t i = 0; i < blocks.size(); ++i) held[i]->accumulate(blocks[i]->input());
    }
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      blocks[i]->route = std::move(held[i]);
      blocks[i]->route->end_statistics();
    }
  }

 private:
  /// The SMEAR layer of a routing block on maps shaped `s`, bottleneck m.
  static examples::any_layer<T> make_layer(const adapter_config& cfg, shape4 s, std::size_t m, std::uint64_t seed) {
    smear::layer_options options = cfg.layer;
    options.residual = false;  // the block adds x itself, not norm(x)
    if (cfg.conv)
      return examples::make_layer<1, 6, 12>(cfg.experts, smear::conv_adapter<T>{s.h, s.w, s.c, m}, options, seed);
    return examples::make_layer<1, 6, 12>(cfg.experts, smear::adapter<T>{s.c, m}, options, seed);
  }

  std::size_t features_ = 0, classes_ = 0, n_ = 0;
  bool training_ = false;
  const std::vector<T>* input_ = nullptr;
  std::vector<T> a0_, x_, h0_, pooled_, logits_, dpooled_, g_, t_, dinput_;
  shape4 last_;
};

/// Mean softmax cross-entropy over the batch; writes ∂ℓ/∂logits and each example's loss.
template <class T>
double cross_entropy(const std::vector<T>& logits, std::span<const std::int32_t> labels, std::size_t classes,
                     std::vector<T>& dlogits, std::vector<T>* example_losses = nullptr) {
  const std::size_t n = labels.size();
  dlogits.resize(n * classes);
  if (example_losses) example_losses->resize(n);
  double total = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const T* z = logits.data() + i * classes;
    const T zmax = *std::max_element(z, z + classes);
    double sum = 0;
    for (std::size_t k = 0; k < classes; ++k) sum += std::exp(static_cast<double>(z[k] - zmax));
    const auto y = static_cast<std::size_t>(labels[i]);
    const double loss = std::log(sum) - static_cast<double>(z[y] - zmax);
    total += loss;
    if (example_losses) (*example_losses)[i] = static_cast<T>(loss);
    for (std::size_t k = 0; k < classes; ++k) {
      const double p = std::exp(static_cast<double>(z[k] - zmax)) / sum;
      dlogits[i * classes + k] = static_cast<T>((p - (k == y ? 1.0 : 0.0)) / static_cast<double>(n));
    }
  }
  return total / static_cast<double>(n);
}

}  // namespace resnet
