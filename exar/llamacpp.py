"""llama-cpp-python as every exar stage loads it, with the CPU backend's known crash worked around.

On CPUs with AMX (Intel Sapphire Rapids and later Xeons), a llama.cpp built natively there moves
q4_0/q8_0 weights into its AMX buffer type, and the first decode then segfaults in
``ggml_backend_amx_mul_mat`` (ggml-org/llama.cpp#20824, seen here with llama-cpp-python 0.3.36 on
SmolLM2 and stories260K). Loading with ``use_extra_bufts = false`` keeps every weight in the plain
CPU buffer, which computes the same results. exar turns it off only where the AMX buffer type is
active, so other machines keep llama.cpp's repacked fast paths; ``extra_buffers_disabled`` says
which applies (edge results and benchmarks record it).

llama.cpp's native log (load reports; warnings such as "lora for 'blk.0.attn_q.weight' cannot use
buft 'CPU_REPACK'") goes through one callback installed here for every stage: into a short tail
that ``native_reason`` turns into one-line errors, into the file of an active ``native_log_file``,
and to stderr only after ``show_native_log(True)`` (the commands' --verbose).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections import deque
from pathlib import Path
from typing import Iterator

_LOG_TAIL: deque[bytes] = deque(maxlen=30)
_LOG = {"verbose": False, "files": [], "callback": None}


@functools.cache
def amx_active() -> bool:
    """Whether this llama.cpp build would put weights in its AMX buffer type on this CPU."""
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


def extra_buffers_disabled() -> bool:
    return amx_active()


@functools.cache
def load_llama_cpp():
    """The ``llama_cpp`` module, its default model parameters patched once per process as the
    module docstring says (so ``llama_cpp.Llama`` and exar's own loaders both get them), its log routed."""
    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    if amx_active():
        default = bindings.llama_model_default_params

        def model_default_params():
            params = default()
            params.use_extra_bufts = False
            return params

        bindings.llama_model_default_params = model_default_params
        llama_cpp.llama_model_default_params = model_default_params
    _route_log(llama_cpp)
    llama_cpp.llama_backend_init()  # for the C API users (edge's runtime); llama_cpp.Llama does it too
    return llama_cpp


def _route_log(llama_cpp) -> None:
    """Install exar's log callback (again each time: llama-cpp-python sets its own when imported)."""
    if _LOG["callback"] is None:
        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            text = text or b""
            _LOG_TAIL.append(text)
            for log in _LOG["files"]:
                log.write(text)
            if _LOG["verbose"]:
                os.write(2, text)

        _LOG["callback"] = callback  # keep a reference: llama.cpp calls it until the process exits
    llama_cpp.llama_log_set(_LOG["callback"], ctypes.c_void_p(0))


def show_native_log(verbose: bool) -> None:
    """Whether llama.cpp's native log also reaches stderr (a command's --verbose)."""
    _LOG["verbose"] = verbose
    _route_log(load_llama_cpp())


@contextlib.contextmanager
def native_log_file(path: Path | str) -> Iterator[None]:
    """Also append llama.cpp's native log to ``path`` while inside (quantization keeps its log beside the files)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as log:
        _route_log(load_llama_cpp())
        _LOG["files"].append(log)
        try:
            yield
        finally:
            _LOG["files"].remove(log)


def native_reason() -> str:
    """The last error-looking line llama.cpp logged, for a one-line message."""
    lines = [line.decode("utf-8", errors="replace").strip() for line in _LOG_TAIL]
    lines = [line for line in lines if line]
    errors = [line for line in lines if any(w in line.lower() for w in ("error", "failed", "invalid"))]
    return (errors or lines or ["no details from llama.cpp"])[-1]
