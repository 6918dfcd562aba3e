#!/usr/bin/env bash
# Prepares the default corpus under data/ (git-ignored): the English text of the Debian `fortunes`
# packages as JSON lines, a SentencePiece BPE model trained on it, and the Megatron indexed
# dataset data/fortunes_text_document.{bin,idx} made by moe-preprocess-data. Each step is skipped
# when its output exists; outputs are written under temporary names and moved into place, so an
# interrupted run redoes only the unfinished step. Needs the built tools (MOE_BUILD_DIR, default
# build; the program is <build>/tools/moe-preprocess-data) and /usr/bin/python3.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=${MOE_BUILD_DIR:-build}
data_dir=data
fortunes_dir=/usr/share/games/fortunes
vocab_size=${MOE_CORPUS_VOCAB_SIZE:-4096}
mkdir -p "$data_dir"

jsonl=$data_dir/fortunes.jsonl
text=$data_dir/fortunes.txt
model=$data_dir/tokenizer.model
prefix=$data_dir/fortunes
dataset=${prefix}_text_document

if [[ -f $dataset.bin && -f $dataset.idx && -f $model ]]; then
  echo "prepare_data: $dataset.{bin,idx} and $model present, nothing to do"
  exit 0
fi
echo "prepare_data: fortunes -> $jsonl -> SentencePiece ($vocab_size pieces) -> $dataset.{bin,idx}"

if [[ ! -f $jsonl || ! -f $text ]]; then
  [[ -d $fortunes_dir ]] || { echo "prepare_data: $fortunes_dir missing (install fortunes fortunes-min)" >&2; exit 1; }
  # One fortune per JSON line (the %-separated entries of every text file; the ascii-art file is
  # pictures, not prose). Terminal overstrike (x BACKSPACE x) and other control characters are
  # removed. The plain-text copy, one line per text line, is what SentencePiece trains on.
  /usr/bin/python3 - "$fortunes_dir" "$jsonl.tmp" "$text.tmp" <<'PY'
import json, os, re, sys
source, jsonl_path, text_path = sys.argv[1:4]
overstrike = re.compile(r".\x08")
control = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
count = 0
with open(jsonl_path, "w", encoding="utf-8") as jsonl, open(text_path, "w", encoding="utf-8") as text:
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if "." in name or os.path.islink(path) or not os.path.isfile(path) or name == "ascii-art":
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            entries = f.read().split("\n%\n")
        for entry in entries:
            entry = control.sub("", overstrike.sub("", entry)).strip("\n%").rstrip()
            if not entry.strip():
                continue
            jsonl.write(json.dumps({"text": entry, "source": name}, ensure_ascii=False) + "\n")
            text.write(entry + "\n")
            count += 1
print(f"prepare_data: {count} fortunes")
PY
  mv "$text.tmp" "$text"
  mv "$jsonl.tmp" "$jsonl"
fi

if [[ ! -f $model ]]; then
  # A byte-fallback BPE model like Llama 2's (unk 0, bos 1, eos 2, no pad).
  spm_train --input="$text" --model_prefix="$data_dir/tokenizer.tmp" --vocab_size="$vocab_size" \
    --model_type=bpe --character_coverage=1.0 --byte_fallback=true --split_digits=true \
    --num_threads="$(nproc)" --minloglevel=2 >/dev/null
  mv "$data_dir/tokenizer.tmp.vocab" "$data_dir/tokenizer.vocab"
  mv "$data_dir/tokenizer.tmp.model" "$model"
fi

preprocess=$build_dir/tools/moe-preprocess-data
[[ -x $preprocess ]] || { echo "prepare_data: $preprocess not built" >&2; exit 1; }
"$preprocess" --input "$jsonl" --output-prefix "$prefix" --json-keys text \
  --tokenizer-type Llama2Tokenizer --tokenizer-model "$model" --append-eod \
  --workers "$(nproc)" --log-interval 100000 | tail -n 2
