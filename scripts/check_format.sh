#!/usr/bin/env bash
# Fails, naming the files, when clang-format (the repo's .clang-format) would change any tracked
# C++ source or header. scripts/test.sh runs it before the tests; fix with clang-format -i.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v clang-format >/dev/null || { echo "check_format: clang-format is not installed" >&2; exit 1; }
listing=$(git ls-files '*.cc' '*.h' '*.cu' '*.inc')
mapfile -t sources <<<"$listing"
unformatted=()
for file in "${sources[@]}"; do
  clang-format --dry-run -Werror "$file" >/dev/null || unformatted+=("$file")
done
if ((${#unformatted[@]})); then
  echo "check_format: clang-format would change ${#unformatted[@]} file(s):" >&2
  printf '  %s\n' "${unformatted[@]}" >&2
  exit 1
fi
echo "check_format: ${#sources[@]} files formatted"
