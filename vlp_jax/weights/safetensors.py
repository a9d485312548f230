"""The safetensors file format, read and written with numpy only (no torch, no pickle): an 8-byte little-endian
header length, a JSON header naming each tensor's dtype, shape and byte range, then the raw little-endian bytes."""

import json
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}


def load(path: str) -> dict[str, np.ndarray]:
    """name -> array of a .safetensors file (memory-mapped: a large checkpoint is read as it is used)."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which is not supported "
                             f"({', '.join(DTYPES)})")
        begin, end = entry["data_offsets"]
        arrays[name] = data[begin:end].view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return arrays


def save(arrays: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Writes name -> array as a .safetensors file (tensors in name order, the header padded to 8 bytes)."""
    header, chunks, offset = {}, [], 0
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for chunk in chunks:
            f.write(chunk)
