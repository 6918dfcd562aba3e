// Where the logged scalars go besides the terminal: a TensorBoard event file (--tensorboard-dir)
// and a CSV file (--log-file, rows "iteration,tag,value"). Rank 0 owns one ScalarLog.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "moe/train/tensorboard.h"

namespace moe::train {

class ScalarLog {
 public:
  // Either destination may be absent. Throws moe::Error naming a path that cannot be created.
  // append_csv: continue an existing CSV file (a resumed run) instead of starting it afresh; the
  // header row is written only into an empty file.
  ScalarLog(const std::optional<std::string>& tensorboard_dir,
            const std::optional<std::string>& csv_path, bool append_csv = false);
  ~ScalarLog();
  ScalarLog(const ScalarLog&) = delete;
  ScalarLog& operator=(const ScalarLog&) = delete;

  void add(std::string_view tag, double value, int64_t iteration);
  void flush();
  // The event file's path, when TensorBoard logging is on.
  std::optional<std::string> tensorboard_path() const;

 private:
  std::unique_ptr<TensorBoardWriter> tensorboard_;
  std::FILE* csv_ = nullptr;
  std::string csv_path_;
};

}  // namespace moe::train
