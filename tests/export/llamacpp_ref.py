"""llama.cpp's own converters and fixtures, from the llama-cpp-python source distribution in pip's cache.

The conformance tests compare exar with ``convert_hf_to_gguf.py`` and ``convert_legacy_llama.py``
of the llama.cpp that the installed llama-cpp-python was built from, run with its vendored
gguf-py. Nothing is downloaded: put the sdist into pip's cache once with

    pip download --no-binary :all: --no-deps llama-cpp-python==<version> -d "$(pip cache dir)/sdists"

(or into ``$EXAR_TEST_CACHE/sdist``, or let ``pip install`` of llama-cpp-python leave it in pip's HTTP cache), or point
``EXAR_LLAMA_CPP_SDIST`` at the ``.tar.gz``. Without it the tests skip and say this.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

SDIST_ENV = "EXAR_LLAMA_CPP_SDIST"
VENDOR = "vendor/llama.cpp/"
# What the suite needs from the sdist (paths below vendor/llama.cpp/).
MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-", "examples/convert_legacy_llama.py",
           "tools/perplexity/README.md")
# Metadata a converter derives from the folder name or its own heuristics, not from the model.
NAMING_KEYS = ("general.name", "general.basename", "general.finetune", "general.size_label", "general.version",
               "general.quantized_by", "general.organization", "general.base_model.", "general.tags", "general.languages")


def llama_cpp_version() -> str:
    return version("llama_cpp_python")


def sdist_name() -> str:
    return f"llama_cpp_python-{llama_cpp_version()}.tar.gz"


def _pip_cache_dir() -> Path | None:
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None
    return path if path and path.is_dir() else None


def _is_the_sdist(path: Path) -> bool:
    """A gzip'd tar whose first member is llama_cpp_python-<version>/ (pip's HTTP cache stores bodies unnamed)."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                return False
        with tarfile.open(path, "r:gz") as tar:
            first = tar.next()
        return first is not None and first.name.split("/")[0] == sdist_name()[: -len(".tar.gz")]
    except (OSError, tarfile.TarError, EOFError, gzip.BadGzipFile):
        return False


def find_sdist() -> tuple[Path | None, str]:
    """(path, "") of the sdist of the installed llama-cpp-python, or (None, why not)."""
    explicit = os.environ.get(SDIST_ENV)
    if explicit:
        path = Path(explicit)
        return (path, "") if path.is_file() else (None, f"{SDIST_ENV}={explicit} is not a file")
    test_cache = os.environ.get("EXAR_TEST_CACHE")
    if test_cache and (Path(test_cache) / "sdist" / sdist_name()).is_file():  # pip download ... -d $EXAR_TEST_CACHE/sdist
        return Path(test_cache) / "sdist" / sdist_name(), ""
    cache = _pip_cache_dir()
    how = (f"pip download --no-binary :all: --no-deps llama-cpp-python=={llama_cpp_version()} "
           f"-d \"$(pip cache dir)/sdists\"")
    if cache is None:
        return None, f"no pip cache; {how} (or set {SDIST_ENV})"
    for path in cache.rglob(sdist_name()):
        return path, ""
    for path in cache.rglob("*"):  # HTTP cache bodies: big gzip files
        if path.is_file() and path.stat().st_size > 20_000_000 and _is_the_sdist(path):
            return path, ""
    return None, f"{sdist_name()} is not in pip's cache ({cache}); {how} (or set {SDIST_ENV})"


def unpack(sdist: Path, dest: Path) -> Path:
    """The parts of vendor/llama.cpp the suite uses, unpacked once into ``dest``; returns the llama.cpp folder."""
    root = dest / "llama.cpp"
    done = dest / ".unpacked"
    if done.is_file() and done.read_text() == str(sdist):
        return root
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            rel = member.name.split("/", 1)[1] if "/" in member.name else ""
            if not rel.startswith(VENDOR) or not member.isfile():
                continue
            inner = rel[len(VENDOR):]
            if inner.startswith(MEMBERS):
                target = root / inner
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src:
                    target.write_bytes(src.read())
    done.write_text(str(sdist))
    return root


_DRIVER = r"""
import json, sys
from pathlib import Path
llama_cpp_dir, jobs = Path(sys.argv[1]), json.loads(sys.argv[2])
sys.path.insert(0, str(llama_cpp_dir))
sys.argv = ["convert_hf_to_gguf.py"]
import convert_hf_to_gguf  # inserts the vendored gguf-py in front of the installed one
for model, out, outtype in jobs:
    sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", outtype]
    convert_hf_to_gguf.main()
"""


def convert_hf(llama_cpp_dir: Path, jobs: list[tuple[Path, Path, str]]) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py on each (HF folder, out file, outtype), in one child process."""
    payload = json.dumps([[str(m), str(o), t] for m, o, t in jobs])
    env = dict(os.environ, PYTHONPATH=str(llama_cpp_dir / "gguf-py"))
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(llama_cpp_dir), payload], capture_output=True, text=True,
                          env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-4000:]}")


def convert_legacy(llama_cpp_dir: Path, folder: Path, out: Path, outtype: str = "f16") -> None:
    """llama.cpp's examples/convert_legacy_llama.py on a Meta consolidated folder."""
    env = dict(os.environ, PYTHONPATH=str(llama_cpp_dir / "gguf-py"))
    done = subprocess.run([sys.executable, str(llama_cpp_dir / "examples" / "convert_legacy_llama.py"), str(folder),
                           "--outfile", str(out), "--outtype", outtype], capture_output=True, text=True, env=env,
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"convert_legacy_llama.py failed:\n{done.stderr[-4000:]}")


def gguf_contents(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (type, shape, sha256 of the bytes)) of a GGUF, via the installed gguf-py."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    fields = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            fields[name] = hashlib.sha256(json.dumps(field.contents(), ensure_ascii=False).encode()).hexdigest()
        else:
            fields[name] = field.contents()
    tensors = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), hashlib.sha256(bytes(t.data)).hexdigest())
               for t in reader.tensors}
    return fields, tensors


def differences(ours: Path, theirs: Path) -> dict:
    """What differs between two GGUFs: metadata (naming keys aside), tensor order, names, types, shapes, bytes."""
    our_fields, our_tensors = gguf_contents(ours)
    their_fields, their_tensors = gguf_contents(theirs)
    keep = lambda fields: {k: v for k, v in fields.items() if not k.startswith(NAMING_KEYS)}  # noqa: E731
    a, b = keep(our_fields), keep(their_fields)
    return {
        "metadata": {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)},
        "tensors": {n: (our_tensors.get(n), their_tensors.get(n)) for n in sorted(set(our_tensors) | set(their_tensors))
                    if our_tensors.get(n) != their_tensors.get(n)},
        "tensor_order_equal": list(our_tensors) == list(their_tensors),
    }


def vocab_fixture(llama_cpp_dir: Path, name: str) -> tuple[Path, list[str], list[list[int]]]:
    """llama.cpp's ggml-vocab-<name>.gguf and its test strings (.inp) with the expected ids (.out)."""
    models = llama_cpp_dir / "models"
    texts = (models / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = [[int(i) for i in line.split()] for line in (models / f"ggml-vocab-{name}.gguf.out").read_text().split("\n")]
    return models / f"ggml-vocab-{name}.gguf", texts, ids[: len(texts)]


def pre_tokenizer_table(llama_cpp_dir: Path) -> dict[str, str]:
    """chkhsh -> pre-tokenizer name as convert_hf_to_gguf's get_vocab_base_pre decides it (later ifs win)."""
    import re

    source = (llama_cpp_dir / "conversion" / "base.py").read_text(encoding="utf-8")
    body = source.split("# Marker: Start get_vocab_base_pre", 1)[1].split("# Marker: End get_vocab_base_pre", 1)[0]
    table: dict[str, str] = {}
    for chkhsh, name in re.findall(r'if chkhsh == "([0-9a-f]{64})":\s*\n\s*#[^\n]*\n\s*res = "([^"]+)"', body):
        table[chkhsh] = name
    return table
