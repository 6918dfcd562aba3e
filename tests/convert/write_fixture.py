"""Writes a safetensors file independently of moecore's writer, for safetensors_tests to read
back: numpy makes the raw little-endian bytes and this script writes the 8-byte header length,
the JSON header and the data section itself (no safetensors package).

usage: write_fixture.py OUT.safetensors EXPECTED.json

Values come from numpy's own generator (seed 2024) plus awkward ones (signed zeros, subnormals,
infinities, NaN, the extremes of each integer type); bf16, which numpy lacks, is the upper half of
float32 words rounded to nearest even. Tensors are stored in an order unlike their names', with a
0-d scalar and an empty tensor among them. EXPECTED.json maps each name to its dtype, shape and
values (floats as float.hex() strings, so every bit, sign and infinity survives JSON).
"""
import json
import struct
import sys

import numpy as np


def bf16_words(values):
    """float32 values -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    words = np.asarray(values, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (words + 0x7FFF + ((words >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(values, dtype="<f4"))
    rounded[nan] = (words[nan] >> 16) | 0x40
    return rounded.astype("<u2")


def bf16_values(words):
    return (words.astype("<u4") << 16).view("<f4")


def main(path, expected_path):
    rng = np.random.default_rng(2024)
    awkward = [0.0, -0.0, 1e-40, -3e-39, np.inf, -np.inf, np.nan, 65504.0, -1.5]
    f32 = np.concatenate([rng.standard_normal(15), awkward]).astype("<f4").reshape(4, 6)
    f64 = np.concatenate([rng.standard_normal(6) * 1e300, [5e-324, -0.0, np.nan]]).astype("<f8")
    f16 = np.concatenate([rng.standard_normal(7), [6e-8, -0.0, np.inf, np.nan, 65504]])
    f16 = f16.astype("<f2").reshape(3, 1, 4)
    bf16 = bf16_words(np.concatenate([rng.standard_normal(5) * 100, [1e-39, -np.inf, np.nan]]))
    i32 = np.array([-2**31, 2**31 - 1, 0, -1, 7], dtype="<i4")
    i64 = np.concatenate([rng.integers(-2**62, 2**62, 4), [-2**63, 2**63 - 1]]).astype("<i8")
    tensors = {
        "layers.0.weight": ("F32", f32, f32.tobytes()),
        "b_f64": ("F64", f64, f64.tobytes()),
        "half": ("F16", f16, f16.tobytes()),
        "brain": ("BF16", bf16_values(bf16).reshape(2, 4), bf16.tobytes()),
        "ints": ("I32", i32, i32.tobytes()),
        "longs": ("I64", i64.reshape(3, 2), i64.tobytes()),
        "scalar": ("F32", np.array(2.5, dtype="<f4"), np.array(2.5, dtype="<f4").tobytes()),
        "empty": ("F32", np.zeros((0, 3), dtype="<f4"), b""),
    }
    header = {"__metadata__": {"format": "pt", "writer": "write_fixture.py (numpy)"}}
    expected = {}
    data = b""
    for name in ["half", "longs", "empty", "layers.0.weight", "scalar", "brain", "ints", "b_f64"]:
        dtype, values, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(values.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
        flat = values.reshape(-1)
        as_text = [int(v) for v in flat] if dtype.startswith("I") else \
            [float(v).hex() for v in flat.astype(np.float64)]
        expected[name] = {"dtype": dtype, "shape": list(values.shape), "values": as_text}
    text = json.dumps(header).encode()
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text + data)
    with open(expected_path, "w") as out:
        json.dump(expected, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
