// --mock-data: a deterministic synthetic corpus in place of --data-path (Megatron's
// MockGPTDataset). Documents of random length count upward from a random start token
// (t, t+1, t+2, ... modulo the vocabulary, eod excluded) and end with eod, so a model can learn
// them and the loss visibly falls; samples concatenate documents like GPTDataset does.
#pragma once

#include <cstdint>

#include "moe/data/gpt_dataset.h"

namespace moe::train {

class MockGPTDataset final : public data::SampleSource {
 public:
  // vocab_size: ids [0, vocab_size) with `eod` among them. Each split gets its own documents.
  MockGPTDataset(int64_t num_samples, int64_t seq_length, int64_t vocab_size, int64_t eod,
                 uint64_t seed, data::Split split);

  int64_t size() const override { return num_samples_; }
  int64_t seq_length() const override { return seq_length_; }
  int64_t text_length() const override { return seq_length_ + 1; }
  data::Split split() const override { return split_; }
  void text(int64_t index, int64_t* out) const override;

 private:
  int64_t num_samples_, seq_length_, vocab_size_, eod_;
  uint64_t seed_;
  data::Split split_;
};

}  // namespace moe::train
