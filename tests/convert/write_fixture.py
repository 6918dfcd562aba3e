"""Writes a safetensors file with struct + json only (no safetensors package), independently of
moecore's writer, for safetensors_tests to read back. Values follow simple formulas the test
recomputes: f32 "a" [2, 3] = i * 0.5 - 1; f64 "b" [5] = i / 3; i32 "c" [4] = i - 2;
i64 "d" [3] = 2^40 + i; bf16 "e" [2, 2] = top 16 bits of float32(i + 0.25); f16 "f" [3] = i - 1.
Tensors are stored in the order e, a, f, b, d, c, unlike their names' order."""
import json
import struct
import sys


def main(path):
    tensors = {
        "a": ("F32", [2, 3], struct.pack("<6f", *[i * 0.5 - 1 for i in range(6)])),
        "b": ("F64", [5], struct.pack("<5d", *[i / 3 for i in range(5)])),
        "c": ("I32", [4], struct.pack("<4i", *[i - 2 for i in range(4)])),
        "d": ("I64", [3], struct.pack("<3q", *[2**40 + i for i in range(3)])),
        "e": ("BF16", [2, 2],
              b"".join(struct.pack("<f", i + 0.25)[2:] for i in range(4))),
        "f": ("F16", [3], struct.pack("<3e", *[i - 1.0 for i in range(3)])),
    }
    header = {"__metadata__": {"format": "pt", "writer": "write_fixture.py"}}
    data = b""
    for name in ["e", "a", "f", "b", "d", "c"]:
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text + data)


if __name__ == "__main__":
    main(sys.argv[1])
