#pragma once
/// \file data.hpp
/// The pre-tokenised multi-task data written by prepare_data (or by `smear-t5 tiny-data`):
/// tasks.tsv (name, classes, label names) and {train,validation,test}.tsv (task, label, ids).

#include <smear/smear.hpp>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace t5ex {

struct task_info {
  std::string name;
  std::size_t classes = 0;
  std::vector<std::string> labels;
};

struct example {
  std::int32_t task = 0;
  std::int32_t label = 0;
  std::vector<std::int32_t> ids;
};

struct dataset {
  std::vector<task_info> tasks;
  std::vector<example> train, validation, test;
  std::int32_t max_id = 0;
};

/// A batch padded to its longest example.
struct batch {
  std::size_t size = 0, length = 0;
  std::vector<std::int32_t> ids, lengths, tasks, labels;
};

inline std::vector<example> read_split(const std::string& path, std::size_t tasks, std::size_t max_len,
                                       std::int32_t& max_id) {
  std::ifstream in(path);
  if (!in) throw smear::io_error("smear-t5: cannot open '" + path + "' (run examples/t5_adapter/prepare_data)");
  std::vector<example> out;
  std::string line;
  std::size_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty()) continue;
    std::istringstream s(line);
    example e;
    if (!(s >> e.task >> e.label) || e.task < 0 || static_cast<std::size_t>(e.task) >= tasks)
      throw smear::io_error(smear::detail::message("smear-t5: '", path, "' line ", lineno,
                                                   ": expected `task label ids...` with task < ", tasks));
    std::int32_t id;
    while (s >> id) {
      if (id < 0) throw smear::io_error(smear::detail::message("smear-t5: '", path, "' line ", lineno, ": negative id"));
      e.ids.push_back(id);
      max_id = std::max(max_id, id);
    }
    if (e.ids.empty()) continue;
    if (e.ids.size() > max_len) {
      e.ids.resize(max_len);
      e.ids.back() = 1;  // keep </s> at the end
    }
    out.push_back(std::move(e));
  }
  return out;
}

/// Reads DIR/tasks.tsv and the three splits; examples are cut to `max_len` tokens.
inline dataset read_dataset(const std::string& dir, std::size_t max_len) {
  dataset d;
  std::ifstream in(dir + "/tasks.tsv");
  if (!in) throw smear::io_error("smear-t5: cannot open '" + dir + "/tasks.tsv' (run examples/t5_adapter/prepare_data)");
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    std::istringstream s(line);
    task_info t;
    std::string labels;
    std::getline(s, t.name, '\t');
    s >> t.classes >> labels;
    std::istringstream ls(labels);
    for (std::string l; std::getline(ls, l, ',');) t.labels.push_back(l);
    if (t.classes < 2) throw smear::io_error("smear-t5: task '" + t.name + "' in tasks.tsv has fewer than 2 classes");
    d.tasks.push_back(t);
  }
  d.train = read_split(dir + "/train.tsv", d.tasks.size(), max_len, d.max_id);
  d.validation = read_split(dir + "/validation.tsv", d.tasks.size(), max_len, d.max_id);
  d.test = read_split(dir + "/test.tsv", d.tasks.size(), max_len, d.max_id);
  for (const auto* split : {&d.train, &d.validation, &d.test})
    for (const auto& e : *split)
      if (static_cast<std::size_t>(e.label) >= d.tasks[static_cast<std::size_t>(e.task)].classes || e.label < 0)
        throw smear::io_error(smear::detail::message("smear-t5: label ", e.label, " of task '",
                                                     d.tasks[static_cast<std::size_t>(e.task)].name,
                                                     "' is outside its ", d.tasks[static_cast<std::size_t>(e.task)].classes,
                                                     " classes"));
  if (d.train.empty() || d.validation.empty() || d.test.empty())
    throw smear::io_error("smear-t5: a split of '" + dir + "' is empty");
  return d;
}

/// Packs examples [first, first + count) of `order` into a right-padded batch.
inline batch make_batch(const std::vector<example>& data, const std::vector<std::size_t>& order,
                        std::size_t first, std::size_t count) {
  batch b;
  b.size = count;
  for (std::size_t i = 0; i < count; ++i) b.length = std::max(b.length, data[order[first + i]].ids.size());
  b.ids.assign(count * b.length, 0);
  for (std::size_t i = 0; i < count; ++i) {
    const example& e = data[order[first + i]];
    std::copy(e.ids.begin(), e.ids.end(), b.ids.begin() + static_cast<long>(i * b.length));
    b.lengths.push_back(static_cast<std::int32_t>(e.ids.size()));
    b.tasks.push_back(e.task);
    b.labels.push_back(e.label);
  }
  return b;
}

/// Writes a small generated data set in prepare_data's format (no download): `tasks` tasks over
/// a vocabulary of 60 ids; task t's label is which of its two marker tokens occurs more often,
/// and each task draws its other tokens from its own range, so the task shows in the input.
inline void write_tiny_dataset(const std::string& dir, std::size_t tasks, std::size_t per_task, std::uint64_t seed) {
  smear::rng gen{seed};
  std::ofstream(dir + "/tasks.tsv") << [&] {
    std::string s;
    for (std::size_t t = 0; t < tasks; ++t) s += "tiny" + std::to_string(t) + "\t2\tfirst,second\n";
    return s;
  }();
  const char* names[] = {"train", "validation", "test"};
  const std::size_t counts[] = {per_task, per_task / 4 + 1, per_task / 4 + 1};
  for (int s = 0; s < 3; ++s) {
    std::ofstream out(dir + "/" + names[s] + ".tsv");
    for (std::size_t i = 0; i < counts[s] * tasks; ++i) {
      const auto t = static_cast<std::int32_t>(i % tasks);
      const auto len = 4 + gen.below(10);
      const std::int32_t a = 3 + 2 * t, b = 4 + 2 * t;
      std::size_t na = 0, nb = 0;
      std::string ids;
      for (std::size_t k = 0; k < len; ++k) {
        std::int32_t id;
        const double u = gen.uniform();
        if (u < 0.3) {
          id = a;
          ++na;
        } else if (u < 0.6) {
          id = b;
          ++nb;
        } else {
          id = static_cast<std::int32_t>(20 + 10 * static_cast<std::size_t>(t) % 40 + gen.below(10));
        }
        ids += std::to_string(id) + " ";
      }
      const int label = na >= nb ? 0 : 1;
      out << t << '\t' << label << '\t' << ids << "1\n";
    }
  }
}

}  // namespace t5ex
