#pragma once
/// \file args.hpp
/// The examples' command lines: `--name value` options, `--name` flags and positional
/// arguments. A command reads the options it uses, each with its default, then calls finish(),
/// which rejects whatever it did not read. Every error is a smear::value_error naming the
/// program and the option: an unknown option, a missing value, a value that is not a number.

#include <smear/error.hpp>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace examples {

class arguments {
 public:
  /// Reads argv[first], ..., argv[argc - 1]. `flags` are the options that take no value
  /// ("quiet" for --quiet); every other --name takes the next argument as its value.
  arguments(std::string program, int argc, const char* const* argv, int first, std::initializer_list<const char*> flags)
      : program_(std::move(program)), flags_(flags.begin(), flags.end()) {
    for (int i = first; i < argc; ++i) {
      const std::string a = argv[i];
      if (a.rfind("--", 0) != 0 || a.size() == 2) {
        positional_.push_back(a);
        continue;
      }
      const std::string name = a.substr(2);
      if (flags_.contains(name)) {
        values_[name] = "";
        continue;
      }
      if (i + 1 >= argc || std::string(argv[i + 1]).rfind("--", 0) == 0) {
        missing_.insert(name);  // reported when read (an unknown option is reported as unknown)
        values_[name] = "";
        continue;
      }
      missing_.erase(name);
      values_[name] = argv[++i];
    }
  }

  const std::string& program() const { return program_; }

  /// Whether --name was given (a flag or an option).
  bool has(const std::string& name) const { return values_.contains(name); }
  /// A flag: whether --name was given.
  bool flag(const std::string& name) const {
    read_.insert(name);
    return has(name);
  }
  /// The value of --name, or `fallback`.
  std::string text(const std::string& name, const std::string& fallback) const {
    read_.insert(name);
    if (missing_.contains(name)) throw error("option --" + name + " needs a value");
    const auto it = values_.find(name);
    return it == values_.end() ? fallback : it->second;
  }
  /// A real number.
  double real(const std::string& name, double fallback) const {
    const std::string v = text(name, "");
    return has(name) ? to_real(name, v) : fallback;
  }
  /// A non-negative integer (written as any number: 1000, 1e3).
  std::size_t count(const std::string& name, std::size_t fallback) const {
    const std::string v = text(name, "");
    return has(name) ? to_count(name, v) : fallback;
  }
  /// A comma-separated list (empty items dropped).
  std::vector<std::string> list(const std::string& name, const std::string& fallback) const {
    std::vector<std::string> out;
    std::istringstream in(text(name, fallback));
    for (std::string item; std::getline(in, item, ',');)
      if (!item.empty()) out.push_back(item);
    return out;
  }
  /// A comma-separated list of non-negative integers.
  std::vector<std::size_t> counts(const std::string& name, std::vector<std::size_t> fallback) const {
    const auto items = list(name, "");
    if (!has(name)) return fallback;
    std::vector<std::size_t> out;
    for (const auto& item : items) out.push_back(to_count(name, item));
    return out;
  }
  /// The arguments that are not options, in order; reading them accepts them.
  const std::vector<std::string>& positional() const {
    positional_read_ = true;
    return positional_;
  }

  /// Throws value_error naming the first option (or stray argument) no one read.
  void finish() const {
    for (const auto& [name, value] : values_)
      if (!read_.contains(name))
        throw error("unknown option --" + name + " for this command (see `" + program_ + " help`)");
    if (!positional_read_ && !positional_.empty())
      throw error("unexpected argument '" + positional_.front() + "' (see `" + program_ + " help`)");
  }

  /// "<program>: <what>" as a value_error.
  smear::value_error error(const std::string& what) const { return smear::value_error(program_ + ": " + what); }

 private:
  double to_real(const std::string& name, const std::string& v) const {
    errno = 0;
    char* end = nullptr;
    const double d = std::strtod(v.c_str(), &end);
    if (v.empty() || end != v.c_str() + v.size() || errno == ERANGE || !std::isfinite(d))
      throw error("--" + name + " expects a number, got '" + v + "'");
    return d;
  }
  std::size_t to_count(const std::string& name, const std::string& v) const {
    const double d = to_real(name, v);
    if (d < 0 || d != std::floor(d) || d > 9007199254740992.0)  // 2^53: every integer below is exact
      throw error("--" + name + " expects a non-negative integer, got '" + v + "'");
    return static_cast<std::size_t>(d);
  }

  std::string program_;
  std::set<std::string> flags_, missing_;
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_;
  mutable std::set<std::string> read_;
  mutable bool positional_read_ = false;
};

/// Where the examples' data lives by default: $SMEAR_DATA, else ~/.cache/smear.
inline std::filesystem::path data_root() {
  const char* env = std::getenv("SMEAR_DATA");
  const char* home = std::getenv("HOME");
  return env ? std::filesystem::path(env) : std::filesystem::path(home ? home : ".") / ".cache" / "smear";
}

}  // namespace examples
