"""4-bit (and every other) quantization with llama.cpp's own quantizer, through llama-cpp-python.

The type table is read from llama-cpp-python's ``LLAMA_FTYPE_MOSTLY_*`` constants, so it is
exactly what the installed llama.cpp offers. llama.cpp's native log goes to a file (to the
terminal too only under --verbose); the summary says which tensors llama.cpp stored at another
type than asked, and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path

from exar.errors import ExarError
from exar.rundir import atomic_path

# llama-quantize refuses these without an importance matrix (quantize.cpp).
NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s")
_PREFIX = "LLAMA_FTYPE_MOSTLY_"
_FLOAT_TYPES = ("f16", "bf16")


def quant_types() -> dict[str, int]:
    """Every quantized file type the installed llama.cpp offers: name (q4_0, q4_k_m, ...) -> ftype."""
    import llama_cpp

    return {name[len(_PREFIX):].lower(): getattr(llama_cpp, name) for name in dir(llama_cpp)
            if name.startswith(_PREFIX) and name[len(_PREFIX):].lower() not in _FLOAT_TYPES}


def check_quant(qtype: str) -> int:
    """The llama.cpp ftype of ``qtype``, or an error naming the choices or the reason it is refused."""
    types = quant_types()
    if qtype not in types:
        raise ExarError(f"unknown quant type {qtype!r}; llama.cpp offers {', '.join(sorted(types))}")
    if qtype in NEEDS_IMATRIX:
        raise ExarError(f"quant type {qtype} needs an importance matrix (imatrix), which exar does not compute; "
                        "use q4_k_m, q4_0 or another type")
    return types[qtype]


def quantize_gguf(src: Path | str, dst: Path | str, qtype: str, *, pure: bool = False,
                  log_path: Path | str | None = None, threads: int | None = None) -> dict:
    """Quantize the GGUF ``src`` to ``qtype`` at ``dst`` with ``llama_model_quantize``.

    ``pure`` quantizes every matrix to ``qtype`` (llama-quantize --pure: no higher-precision
    output or embedding, no k-quant mixes). llama.cpp's log is appended to ``log_path`` (and
    shown only under ``exar.llamacpp.show_native_log``). Returns ``summarize_types(dst, qtype)``.
    """
    from exar.llamacpp import load_llama_cpp, native_log_file

    llama_cpp = load_llama_cpp()
    ftype = check_quant(qtype)
    src, dst = Path(src), Path(dst)
    read_gguf_header(src)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    params.pure = pure
    log = native_log_file(log_path) if log_path is not None else contextlib.nullcontext()
    with atomic_path(dst) as tmp, log:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            where = f"; see {log_path}" if log_path else ""
            raise ExarError(f"{src}: llama.cpp could not quantize it to {qtype} (status {status}){where}")
    return summarize_types(dst, qtype, pure=pure)


def read_gguf_header(path: Path | str):
    """A GGUFReader over ``path``, or a one-line error if the file is not a complete GGUF.

    Parsing a header with a 49k-token vocabulary takes seconds in gguf-py, and an export reads
    each file up to three times (quantize, summary, verify): readers are kept per file version.
    """
    path = Path(path)
    if not path.is_file():
        raise ExarError(f"{path}: no such GGUF file")
    stat = path.stat()
    return _read_gguf_header(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=16)
def _read_gguf_header(name: str, size: int, mtime_ns: int, inode: int):
    from gguf import GGUFReader

    path = Path(name)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, struct.error, IndexError on damaged files
        raise ExarError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise ExarError(f"{path}: truncated ({path.stat().st_size} bytes, its tensors need {end})")
    return reader


def summarize_types(path: Path | str, qtype: str, *, pure: bool = False) -> dict:
    """How many tensors of each type ``path`` stores, and each matrix not stored as ``qtype`` with the reason."""
    import gguf

    reader = read_gguf_header(path)
    base = base_type(qtype)
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[base.upper()]][0] if base.upper() in gguf.GGMLQuantizationType.__members__ else 1
    counts: dict[str, int] = {}
    kept = []
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name.lower()
        counts[type_name] = counts.get(type_name, 0) + 1
        if len(tensor.shape) < 2 or type_name == base:
            continue
        row = int(tensor.shape[0])
        if row % block:
            reason = f"rows of {row} are not a multiple of the {block}-value block; llama.cpp fell back to {type_name}"
        elif tensor.name in ("output.weight", "token_embd.weight") and not pure:
            reason = f"llama.cpp keeps {tensor.name.split('.')[0]} at higher precision ({type_name}); --pure quantizes it too"
        else:
            reason = f"llama.cpp's {qtype} mix gives this tensor {type_name}"
        kept.append({"tensor": tensor.name, "type": type_name, "reason": reason})
    return {"quant": qtype, "pure": pure, "types": counts, "kept": kept}


def base_type(qtype: str) -> str:
    """The ggml tensor type a file type is named after: q4_k_m -> q4_k, q4_0 -> q4_0."""
    for suffix in ("_s", "_m", "_l", "_xs", "_xxs"):
        if qtype.endswith(suffix) and qtype[: -len(suffix)].endswith("_k"):
            return qtype[: -len(suffix)]
    return {"iq2_m": "iq2_s", "iq3_m": "iq3_s", "iq3_xs": "iq3_s"}.get(qtype, qtype)
