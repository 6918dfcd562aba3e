"""What the independent Hugging Face references (qwen_moe_reference.py, deepseek_reference.py,
mixtral_reference.py) share: safetensors files read and written by hand (struct + json, no
safetensors package) and the numpy pieces of the forward. The scripts run as
`/usr/bin/python3 tests/convert/NAME.py`, so this directory is on sys.path."""
import json
import os
import struct

import numpy as np


def safetensors_entries(model_dir):
    """Yields (name, dtype, shape, raw bytes) of every tensor in MODEL_DIR's *.safetensors files,
    the files in name order."""
    for file in sorted(os.listdir(model_dir)):
        if not file.endswith(".safetensors"):
            continue
        with open(os.path.join(model_dir, file), "rb") as f:
            raw = f.read()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + length])
        data = raw[8 + length:]
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            yield name, entry["dtype"], entry["shape"], data[begin:end]


NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def load_float64(model_dir):
    """Every tensor of MODEL_DIR as a float64 numpy array, by name."""
    tensors = {}
    for name, dtype, shape, raw in safetensors_entries(model_dir):
        if dtype == "BF16":  # the top 16 bits of an fp32
            array = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=NUMPY_DTYPES[dtype])
        tensors[name] = array.reshape(shape).astype(np.float64)
    return tensors


def write_model(model_dir, tensors, config, metadata=None):
    """MODEL_DIR/model.safetensors holding TENSORS (float64 or float32 numpy arrays) in their
    dict order, after METADATA as __metadata__ if given, and MODEL_DIR/config.json."""
    header, blobs, offset = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        dtype = "F64" if array.dtype == np.float64 else "F32"
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def silu(x):
    return x / (1.0 + np.exp(-x))


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate((-x[..., half:], x[..., :half]), axis=-1)
