// Runs a callable and returns the text of the moe::Error it throws ("<no error>" when none).
#pragma once

#include <string>

#include "moe/tensor/error.h"

namespace moe::testing {

template <class Body>
std::string error_text(Body&& body) {
  try {
    body();
  } catch (const Error& error) {
    return error.what();
  }
  return "<no error>";
}

}  // namespace moe::testing
