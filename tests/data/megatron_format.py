#!/usr/bin/python3
"""Independent Python statements of Megatron's data formats and index builders, used by the data
tests as a cross-check of the C++ (numpy only; no Megatron import).

  megatron_format.py write-index PREFIX DTYPE_CODE DOCS_JSON [--multimodal]
      Writes PREFIX.bin/.idx as megatron/core/datasets/indexed_dataset.py does. DOCS_JSON is a
      list of documents, each a list of sequences (lists of ids).
  megatron_format.py gpt-indices IDX_PATH BEGIN END SEQ_LENGTH SEED NUM_SAMPLES|none DROP_LAST
      Prints JSON {document_index, sample_index, shuffle_index} as gpt_dataset.py +
      helpers.cpp build them, with numpy.random.RandomState for the shuffles.
"""
import json
import math
import struct
import sys

import numpy

DTYPES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64,
          6: numpy.float64, 7: numpy.float32, 8: numpy.uint16}


def write_index(prefix, code, documents, multimodal):
    dtype = DTYPES[code]
    lengths, pointers, doc_idx, modes = [], [], [0], []
    position = 0
    with open(prefix + ".bin", "wb") as data:
        for document in documents:
            for sequence in document:
                array = numpy.array(sequence, dtype=dtype)
                data.write(array.tobytes(order="C"))
                pointers.append(position)
                position += array.size * array.itemsize
                lengths.append(array.size)
                modes.append(len(lengths) % 3)
            doc_idx.append(len(lengths))
    with open(prefix + ".idx", "wb") as index:
        index.write(b"MMIDIDX\x00\x00")
        index.write(struct.pack("<Q", 1))
        index.write(struct.pack("<B", code))
        index.write(struct.pack("<Q", len(lengths)))
        index.write(struct.pack("<Q", len(doc_idx)))
        index.write(numpy.array(lengths, dtype=numpy.int32).tobytes())
        index.write(numpy.array(pointers, dtype=numpy.int64).tobytes())
        index.write(numpy.array(doc_idx, dtype=numpy.int64).tobytes())
        if multimodal:
            index.write(numpy.array(modes, dtype=numpy.int8).tobytes())


def read_lengths(idx_path):
    with open(idx_path, "rb") as f:
        raw = f.read()
    count = struct.unpack("<Q", raw[18:26])[0]
    return numpy.frombuffer(raw, dtype=numpy.int32, count=count, offset=34)


def document_index(documents, epochs, random, separate_final_epoch):
    if not separate_final_epoch or epochs == 1:
        index = numpy.mgrid[0:epochs, 0:len(documents)][1]
        index[:] = documents
        index = index.reshape(-1).astype(numpy.int32)
        random.shuffle(index)
        return index
    first = document_index(documents, epochs - 1, random, False)
    last = document_index(documents, 1, random, False)
    return numpy.concatenate((first, last))


def sample_index(sizes, doc_idx, seq_length, epochs, tokens_per_epoch, drop_last, extra=1):
    if drop_last:
        num_samples = (epochs * tokens_per_epoch - extra) // seq_length
    else:
        num_samples = math.ceil(numpy.float32(epochs * tokens_per_epoch - extra) / seq_length)
    result = [(0, 0)]
    position, offset = 0, 0
    while len(result) <= num_samples:
        remaining = seq_length + extra
        while remaining != 0:
            length = int(sizes[doc_idx[position]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - extra
                remaining = 0
            elif position == len(doc_idx) - 1:
                offset = int(sizes[doc_idx[position]]) - extra
                break
            else:
                position += 1
                offset = 0
        result.append((position, offset))
    return result


def shuffle_index(num_samples, total, random):
    first = numpy.arange(0, num_samples, dtype=numpy.uint32)
    random.shuffle(first)
    if num_samples == total:
        return first
    last = numpy.arange(num_samples, total, dtype=numpy.uint32)
    random.shuffle(last)
    return numpy.concatenate((first, last))


def gpt_indices(idx_path, begin, end, seq_length, seed, num_samples, drop_last):
    sizes = read_lengths(idx_path)
    documents = numpy.arange(begin, end, dtype=numpy.int32)
    tokens_per_epoch = int(numpy.sum(sizes[documents]))
    epochs = 1
    if num_samples is not None:
        tokens = tokens_per_epoch
        while tokens < num_samples * seq_length + 1:
            epochs += 1
            tokens += tokens_per_epoch
    separate = False
    before_final = 0
    if epochs > 1:
        before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        from_final = num_samples - before_final
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = from_final < int(0.80 * per_epoch)
    random = numpy.random.RandomState(seed)
    doc_idx = document_index(documents, epochs, random, separate)
    samples = sample_index(sizes, doc_idx, seq_length, epochs, tokens_per_epoch, drop_last)
    total = len(samples) - 1
    shuffle = shuffle_index(before_final if separate else total, total, random)
    return {"document_index": doc_idx.tolist(),
            "sample_index": [v for pair in samples for v in pair],
            "shuffle_index": [int(v) for v in shuffle]}


def main():
    if sys.argv[1] == "write-index":
        write_index(sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]),
                    "--multimodal" in sys.argv[5:])
    elif sys.argv[1] == "gpt-indices":
        idx_path, begin, end, seq_length, seed, num_samples, drop_last = sys.argv[2:9]
        result = gpt_indices(idx_path, int(begin), int(end), int(seq_length), int(seed),
                             None if num_samples == "none" else int(num_samples),
                             drop_last == "1")
        print(json.dumps(result))
    else:
        sys.exit(f"unknown command {sys.argv[1]}")


if __name__ == "__main__":
    main()
