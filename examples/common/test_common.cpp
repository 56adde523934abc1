// The examples' shared support code: command lines and their errors, table cells, routing
// heatmaps (SVG, PNG copy, quoting) and any_layer against the smear::layer it holds.

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <smear/smear.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/any_layer.hpp"
#include "common/args.hpp"
#include "common/heatmap.hpp"
#include "common/methods.hpp"
#include "common/table.hpp"

namespace {

examples::arguments parse(std::vector<const char*> argv) {
  argv.insert(argv.begin(), {"prog", "cmd"});
  return {"prog", static_cast<int>(argv.size()), argv.data(), 2, {"quiet"}};
}

/// The message of the value_error `f` throws ("" when it throws none).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const smear::value_error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("arguments: options, flags, lists and positional arguments, with their defaults") {
  const auto a = parse({"--lr", "3e-3", "DIR", "--quiet", "--steps", "1e3", "--seeds", "0,,2", "--out", "x y"});
  CHECK(a.real("lr", 1) == doctest::Approx(3e-3));
  CHECK(a.count("steps", 5) == 1000);
  CHECK(a.count("batch", 32) == 32);
  CHECK(a.flag("quiet"));
  CHECK_FALSE(a.flag("relu"));
  CHECK(a.counts("seeds", {7}) == std::vector<std::size_t>{0, 2});
  CHECK(a.counts("blocks", {2, 2}) == std::vector<std::size_t>{2, 2});
  CHECK(a.list("names", "a,b") == std::vector<std::string>{"a", "b"});
  CHECK(a.text("out", "") == "x y");
  CHECK(a.positional() == std::vector<std::string>{"DIR"});
  CHECK_NOTHROW(a.finish());
}

TEST_CASE("arguments: errors name the program and the option") {
  CHECK(error_of([] { parse({"--bogus", "1"}).finish(); }) ==
        "prog: unknown option --bogus for this command (see `prog help`)");
  CHECK(error_of([] { parse({"--bogus"}).finish(); }).find("unknown option --bogus") != std::string::npos);
  CHECK(error_of([] { parse({"--steps"}).count("steps", 1); }) == "prog: option --steps needs a value");
  CHECK(error_of([] { parse({"--out", "--quiet"}).text("out", ""); }) == "prog: option --out needs a value");
  CHECK(error_of([] { parse({"--lr", "fast"}).real("lr", 1); }) == "prog: --lr expects a number, got 'fast'");
  CHECK(error_of([] { parse({"--steps", "1.5"}).count("steps", 1); }) ==
        "prog: --steps expects a non-negative integer, got '1.5'");
  CHECK(error_of([] { parse({"--steps", "-2"}).count("steps", 1); }).find("non-negative") != std::string::npos);
  CHECK(error_of([] { parse({"--seeds", "0,x"}).counts("seeds", {}); }) == "prog: --seeds expects a number, got 'x'");
  CHECK(error_of([] { parse({"stray"}).finish(); }) == "prog: unexpected argument 'stray' (see `prog help`)");
}

TEST_CASE("methods: every strategy smear::parse_strategy knows, and the two baselines") {
  for (const auto& m : examples::all_methods())
    if (!examples::one_expert(m)) CHECK_NOTHROW(smear::parse_strategy(m));
  CHECK(examples::known_method("dense"));
  CHECK_FALSE(examples::known_method("nonsense"));
  CHECK(examples::method_list().starts_with("smear, tag, "));
}

TEST_CASE("table cells: mean ± sample standard deviation, fixed point, Markdown rows") {
  CHECK(examples::mean({}) == 0.0);
  CHECK(examples::mean({1, 2, 6}) == 3.0);
  CHECK(examples::sample_std({5}) == 0.0);
  CHECK(examples::sample_std({1, 3}) == doctest::Approx(std::sqrt(2.0)));
  CHECK(examples::mean_std({0.5}, 100, 1) == "50.0");
  CHECK(examples::mean_std({0.5, 0.6}, 100, 1) == "55.0 ± 7.1");
  CHECK(examples::mean_std({12.4, 13.6}, 1, 0) == "13 ± 1");
  CHECK(examples::fixed(2.25, 1) == "2.2");
  CHECK(examples::markdown_header({"a", "b"}) == "| a | b |\n|---|---|\n");
  CHECK(examples::markdown_row({"1", "**2**"}) == "| 1 | **2** |\n");
}

namespace {

/// A [rows, cols] routing distribution, like smear::matrix_ref.
struct fake_routing {
  std::size_t rows = 0, cols = 0;
  std::vector<float> v;
  float operator()(std::size_t i, std::size_t e) const { return v[i * cols + e]; }
};

}  // namespace

TEST_CASE("routing_means: the mean distribution per group and block") {
  examples::routing_means m{3};
  const std::vector<int> groups{0, 2, 0};
  const fake_routing p{3, 2, {1, 0, 0.5f, 0.5f, 0, 1}};
  m.add(std::span<const int>(groups), 1, [&](std::size_t) { return p; });
  const auto means = m.means();
  REQUIRE(means.size() == 1);
  CHECK(means[0] == std::vector<double>{0.5, 0.5, 0, 0, 0.5, 0.5});  // group 1 has no example
}

TEST_CASE("heatmaps: one grid per panel, escaped labels, a legend, and a PNG copy") {
  examples::heatmap h;
  h.title = "smear & co";
  h.subtitle = "rows <tasks>";
  h.rows = {"a\"b", "c"};
  h.columns = 2;
  h.panels = {{"block 1", {0.25, 0.75, 1, 0}}, {"block 2", {0, 0, 0, 0.5}}};
  h.panels_per_line = 1;
  const std::string svg = examples::heatmap_svg(h);
  CHECK(svg.find("smear &amp; co") != std::string::npos);
  CHECK(svg.find("rows &lt;tasks&gt;") != std::string::npos);
  CHECK(svg.find("<title>a&quot;b, expert 1: 0.75</title>") != std::string::npos);
  CHECK(svg.find("<title>c, expert 1: 0.5</title>") != std::string::npos);
  CHECK(svg.find("block 2") != std::string::npos);
  CHECK(svg.find("fill=\"rgb(0,0,255)\"") != std::string::npos);  // the largest value is the darkest
  CHECK(svg.find("1 (the largest value)") != std::string::npos);
  std::size_t cells = 0;
  for (auto at = svg.find("<title>"); at != std::string::npos; at = svg.find("<title>", at + 1)) ++cells;
  CHECK(cells == 8);

  CHECK(examples::detail::shell_quote("it's") == "'it'\\''s'");
  const auto dir = std::filesystem::temp_directory_path() / "smear examples' heatmap";
  std::filesystem::create_directories(dir);
  const auto path = dir / "routing $x.svg";
  CHECK(examples::write_heatmap(h, path));
  CHECK(std::filesystem::file_size(path) == svg.size());
  if (std::system("command -v rsvg-convert > /dev/null 2>&1") == 0)
    CHECK(std::filesystem::file_size(dir / "routing $x.png") > 0);
  CHECK_FALSE(examples::write_heatmap(h, dir / "no such folder" / "x.svg"));  // reported, not thrown
  std::filesystem::remove_all(dir);
}

TEST_CASE("any_layer: the smear::layer of the requested size, behind one interface") {
  const smear::adapter<double> proto{4, 2};
  auto a = examples::make_layer<1, 3>(3, proto, {}, 7);
  smear::layer<smear::adapter<double>, 3> direct{proto, {}, 7};
  CHECK(a.experts() == 3);
  CHECK(a.parameters().size() == direct.parameters().size());
  const std::size_t B = 2, L = 3, d = 4;
  std::vector<double> x(B * L * d), y1(x.size()), y2(x.size()), dy(x.size(), 0.1), dx1(x.size()), dx2(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(static_cast<double>(i));
  const auto tokens = smear::make_tokens<const double>(x.data(), B, L, d);
  a.forward(tokens, y1);
  direct.forward(tokens, y2);
  CHECK(y1 == y2);
  a.backward(dy, dx1);
  direct.backward(dy, dx2);
  CHECK(dx1 == dx2);
  CHECK(a.routing().rows == B);
  CHECK(a.routing().cols == 3);
  CHECK(examples::make_layer<1, 3>(1, proto, {}, 7).experts() == 1);
  CHECK(error_of([&] { examples::make_layer<1, 3>(2, proto, {}, 7); }) ==
        "make_layer: 2 experts; the compiled sizes are 1, 3");
}
