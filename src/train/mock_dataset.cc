#include "mock_dataset.h"

#include "moe/tensor/error.h"
#include "moe/tensor/rng.h"

namespace moe::train {

MockGPTDataset::MockGPTDataset(int64_t num_samples, int64_t seq_length, int64_t vocab_size,
                               int64_t eod, uint64_t seed, data::Split split)
    : num_samples_(num_samples),
      seq_length_(seq_length),
      vocab_size_(vocab_size),
      eod_(eod),
      seed_(seed),
      split_(split) {
  MOE_CHECK(num_samples >= 0 && seq_length >= 1, "mock dataset: bad size (", num_samples,
            " samples of ", seq_length, " tokens)");
  MOE_CHECK(vocab_size >= 3 && eod >= 0 && eod < vocab_size,
            "--mock-data needs a vocabulary of "
            "at least 3 tokens including eod (vocab ",
            vocab_size, ", eod ", eod, ")");
}

void MockGPTDataset::text(int64_t index, int64_t* out) const {
  MOE_CHECK(index >= 0 && index < num_samples_, "mock dataset: sample ", index,
            " out of range [0, ", num_samples_, ")");
  // Each sample draws its own documents, so samples are independent of each other and of the
  // order they are read in.
  Rng rng = Rng::derived(seed_, uint64_t(index) * 3 + uint64_t(split_));
  const int64_t content = vocab_size_ - 1;  // ids other than eod, renumbered around it
  int64_t remaining = 0, next = 0;
  for (int64_t position = 0; position < text_length(); ++position) {
    if (remaining == 0) {
      remaining = 1 + int64_t(rng.below(uint64_t(2 * seq_length_)));
      next = int64_t(rng.below(uint64_t(content)));
    }
    if (--remaining == 0) {
      out[position] = eod_;
    } else {
      int64_t id = next++ % content;
      out[position] = id < eod_ ? id : id + 1;
    }
  }
}

}  // namespace moe::train
