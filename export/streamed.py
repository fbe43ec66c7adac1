"""Checkpoint files written one tensor at a time: safetensors and torch's ``.pth`` zip.

``safetensors.torch.save_file`` and ``torch.save`` want every tensor of a file in memory at once;
a 7B shard is 13.5 GB. These writers lay out the header from the tensors' names, dtypes and
shapes, then ask for each tensor only when its bytes are due, so memory holds one tensor. The
files are byte-identical to what ``save_file`` and ``torch.save`` write for the same tensors
(tested), so every loader that reads those reads these.
"""

from __future__ import annotations

import collections
import io
import json
import math
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


@dataclass(frozen=True)
class OutTensor:
    """A tensor still to be made: its name, dtype and shape now, its data from ``make()`` when written."""

    name: str
    dtype: object          # torch dtype
    shape: tuple[int, ...]
    make: Callable[[], object]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _check(tensor, spec: OutTensor):
    if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
        raise ValueError(f"{spec.name}: made {tensor.dtype} {tuple(tensor.shape)}, declared {spec.dtype} {spec.shape}")
    return tensor.contiguous()


# --- safetensors ------------------------------------------------------------------------------------

def _safetensors_names():
    import torch

    # name in the header, and rank in safetensors' Dtype order (it lays data out by dtype, descending)
    return {torch.float32: ("F32", 2), torch.bfloat16: ("BF16", 1), torch.float16: ("F16", 0)}


def write_safetensors(path: Path | str, tensors: Sequence[OutTensor], metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` as one safetensors file, one tensor in memory at a time; returns the file's bytes."""
    names = _safetensors_names()
    order = sorted(tensors, key=lambda t: (-names[t.dtype][1], t.name))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in order:
        header[spec.name] = {"dtype": names[spec.dtype][0], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in order:
            tensor = _check(spec.make(), spec)
            f.write(memoryview(tensor.reshape(-1).view(dtype=_uint8()).numpy()))
            del tensor
    return 8 + len(raw) + offset


def _uint8():
    import torch

    return torch.uint8


# --- torch.save's zip ---------------------------------------------------------------------------------

class _StorageRef:
    def __init__(self, key: str, dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStandIn:
    """Pickles exactly as a contiguous CPU tensor does (``torch._utils._rebuild_tensor_v2``)."""

    def __init__(self, ref: _StorageRef, shape: tuple[int, ...]):
        self.ref, self.shape = ref, tuple(shape)

    def __reduce_ex__(self, protocol):
        import torch

        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.ref, 0, self.shape, stride, False, collections.OrderedDict())


def write_torch_checkpoint(path: Path | str, tensors: Sequence[OutTensor]) -> int:
    """Write ``{name: tensor}`` as ``torch.save`` would (zip, pickle protocol 2, 64-byte aligned records)."""
    import torch

    storage_types = {torch.float16: torch.HalfStorage, torch.bfloat16: torch.BFloat16Storage,
                     torch.float32: torch.FloatStorage}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _StorageRef):
                return "storage", storage_types[obj.dtype], obj.key, "cpu", obj.numel
            return None

    state = {spec.name: _TensorStandIn(_StorageRef(str(i), spec.dtype, math.prod(spec.shape)), spec.shape)
             for i, spec in enumerate(tensors)}
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(state)
    data = buffer.getvalue()
    writer = torch._C.PyTorchFileWriter(str(path), True, 64)
    writer.write_record("data.pkl", data, len(data))
    writer.write_record(".format_version", "1", 1)
    writer.write_record(".storage_alignment", "64", 2)
    writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    for i, spec in enumerate(tensors):
        tensor = _check(spec.make(), spec)
        storage = tensor.untyped_storage()
        if storage.nbytes() != spec.nbytes:  # a view into a larger buffer: give it its own
            tensor = tensor.clone()
            storage = tensor.untyped_storage()
        writer.write_record(f"data/{i}", storage, storage.nbytes())
        del tensor, storage
    writer.write_end_of_file()
    return Path(path).stat().st_size
