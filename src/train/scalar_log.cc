#include "moe/train/scalar_log.h"

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "moe/tensor/error.h"

namespace moe::train {

ScalarLog::ScalarLog(const std::optional<std::string>& tensorboard_dir,
                     const std::optional<std::string>& csv_path, bool append_csv) {
  if (tensorboard_dir) tensorboard_ = std::make_unique<TensorBoardWriter>(*tensorboard_dir);
  if (csv_path) {
    csv_path_ = *csv_path;
    std::filesystem::path parent = std::filesystem::path(csv_path_).parent_path();
    std::error_code error;
    if (!parent.empty()) std::filesystem::create_directories(parent, error);
    const bool continues = append_csv && std::filesystem::exists(csv_path_, error) &&
                           std::filesystem::file_size(csv_path_, error) > 0;
    csv_ = std::fopen(csv_path_.c_str(), continues ? "a" : "w");
    MOE_CHECK(csv_ != nullptr, "--log-file: cannot open '", csv_path_,
              "' for writing: ", std::strerror(errno));
    if (!continues) {
      MOE_CHECK(std::fputs("iteration,tag,value\n", csv_) >= 0, "--log-file: cannot write '",
                csv_path_, "'");
    }
  }
}

ScalarLog::~ScalarLog() {
  if (csv_) std::fclose(csv_);
}

void ScalarLog::add(std::string_view tag, double value, int64_t iteration) {
  if (tensorboard_) tensorboard_->add_scalar(tag, value, iteration);
  if (csv_) {
    MOE_CHECK(std::fprintf(csv_, "%lld,%.*s,%.9g\n", static_cast<long long>(iteration),
                           int(tag.size()), tag.data(), value) > 0,
              "--log-file: cannot write '", csv_path_, "': ", std::strerror(errno));
  }
}

void ScalarLog::flush() {
  if (tensorboard_) tensorboard_->flush();
  if (csv_) {
    MOE_CHECK(std::fflush(csv_) == 0, "--log-file: cannot write '", csv_path_,
              "': ", std::strerror(errno));
  }
}

std::optional<std::string> ScalarLog::tensorboard_path() const {
  if (!tensorboard_) return std::nullopt;
  return tensorboard_->path();
}

}  // namespace moe::train
