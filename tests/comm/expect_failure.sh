#!/bin/sh
# expect_failure.sh PATTERN COMMAND...: passes when COMMAND exits non-zero and its output
# contains PATTERN (a fixed string).
pattern="$1"
shift
output=$("$@" 2>&1)
status=$?
printf '%s\n' "$output"
if [ "$status" -eq 0 ]; then
  echo "expected a non-zero exit status"
  exit 1
fi
printf '%s\n' "$output" | grep -qF -- "$pattern" || { echo "missing: $pattern"; exit 1; }
