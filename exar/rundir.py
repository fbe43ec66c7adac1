"""The run directory: the only contract between stages.

``models/<run>/run.json`` holds the resolved settings of every stage that ran, and
``manifest.json`` every artifact (relative path, kind, role, bytes, sha256, created, made from).
Every artifact is written under a temporary name in its final folder and renamed when complete,
so a crash never leaves a half file under a final name; a stage refuses an input whose recorded
hash no longer matches, or whose base is not the run's base.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from exar import __version__
from exar.constants import BASE_MODELS_DIR, MANIFEST, MODELS_DIR_ENV, RUN_SETTINGS
from exar.errors import ExarError

_TMP_TAG = ".exar-tmp-"


def models_dir() -> Path:
    """The artifact root: $EXAR_MODELS, else ./models."""
    return Path(os.environ.get(MODELS_DIR_ENV, "models"))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- atomic writes -----------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(final: Path | str, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it onto ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}{_TMP_TAG}{uuid.uuid4().hex[:8]}")
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if not tmp.exists():
            raise ExarError(f"{final}: nothing was written")
        _replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: Path | str, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: Path | str, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _replace(tmp: Path, final: Path) -> None:
    if tmp.is_dir() and final.exists():
        old = final.with_name(f"{final.name}{_TMP_TAG}old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        tmp.rename(final)
        _remove(old)
    else:
        os.replace(tmp, final)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


# --- hashing ----------------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def digest_path(path: Path) -> tuple[int, str]:
    """(bytes, sha256) of a file, or of a folder as the hash of its files' relative paths and hashes."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size, sha256_file(path)
    if not path.is_dir():
        raise ExarError(f"{path}: no such file or folder")
    digest, total = hashlib.sha256(), 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        total += file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return total, digest.hexdigest()


# --- the run ----------------------------------------------------------------------------------

class Run:
    """One run folder: settings, manifest and the artifacts they describe."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    # creation and lookup

    @classmethod
    def create(cls, root: Path | str | None = None) -> "Run":
        """A new run folder (``models/run-YYYYmmdd-HHMMSS`` unless ``root`` is given)."""
        if root is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            root = models_dir() / f"run-{stamp}"
            suffix = 1
            while root.exists():
                suffix += 1
                root = models_dir() / f"run-{stamp}-{suffix}"
        run = cls(root)
        run.root.mkdir(parents=True, exist_ok=True)
        if not run.settings_path.exists():
            atomic_write_json(run.settings_path, {"exar_version": __version__, "created": now()})
            atomic_write_json(run.manifest_path, {"artifacts": []})
        return run

    @classmethod
    def open(cls, root: Path | str) -> "Run":
        run = cls(root)
        if not run.settings_path.is_file():
            raise ExarError(f"{run.root}: not an exar run (no {RUN_SETTINGS}); start one with `exar-train stage-zero`")
        return run

    @classmethod
    def open_or_create(cls, root: Path | str | None) -> "Run":
        if root is not None and (Path(root) / RUN_SETTINGS).is_file():
            return cls.open(root)
        return cls.create(root)

    @staticmethod
    def newest(where: Path | None = None) -> Path:
        """The most recently created run under the artifact root."""
        where = Path(where) if where is not None else models_dir()
        candidates = []
        if where.is_dir():
            for child in where.iterdir():
                settings = child / RUN_SETTINGS
                if child.name != BASE_MODELS_DIR and settings.is_file():
                    created = _read_json(settings).get("created", "")
                    candidates.append((created, settings.stat().st_mtime, child))
        if not candidates:
            raise ExarError(f"no run under {where}/; pass --run DIR or start one with `exar-train stage-zero`")
        return max(candidates)[2]

    # settings

    @property
    def settings_path(self) -> Path:
        return self.root / RUN_SETTINGS

    @property
    def settings(self) -> dict:
        return _read_json(self.settings_path)

    def update_settings(self, section: str, values: Mapping) -> dict:
        """Record the resolved settings of one stage under ``section`` (replacing an older record)."""
        settings = self.settings
        settings[section] = dict(values)
        atomic_write_json(self.settings_path, settings)
        return settings

    def bind_base(self, base: Mapping) -> None:
        """Record the run's base model, or refuse one that differs from the base already recorded."""
        recorded = self.settings.get("base")
        if recorded is None:
            self.update_settings("base", base)
        elif recorded.get("fingerprint") != base.get("fingerprint"):
            raise ExarError(
                f"{self.root}: this run was made with base {recorded.get('name')!r} "
                f"({recorded.get('path')}), not {base.get('name')!r} ({base.get('path')}); "
                "start a new run with --run NEW_DIR"
            )

    # manifest

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def artifacts(self) -> list[dict]:
        return _read_json(self.manifest_path).get("artifacts", [])

    def path(self, rel: str) -> Path:
        return self.root / rel

    def entry(self, rel: str) -> dict | None:
        return next((a for a in self.artifacts if a["path"] == rel), None)

    def find(self, kind: str | None = None, role: str | None = None) -> list[dict]:
        return [a for a in self.artifacts if (kind is None or a["kind"] == kind) and (role is None or a.get("role") == role)]

    def record(
        self,
        rel: str,
        kind: str,
        *,
        role: str | None = None,
        made_from: Iterable[str] = (),
        **extra,
    ) -> dict:
        """Add (or replace) the manifest entry of an artifact that now exists under ``rel``."""
        size, sha = digest_path(self.path(rel))
        entry = {
            "path": rel,
            "kind": kind,
            "role": role,
            "bytes": size,
            "sha256": sha,
            "created": now(),
            "made_from": list(made_from),
            **extra,
        }
        artifacts = [a for a in self.artifacts if a["path"] != rel] + [entry]
        atomic_write_json(self.manifest_path, {"artifacts": artifacts})
        return entry

    def annotate(self, rel: str, **extra) -> dict:
        """Add facts to an artifact's entry (verification results, say) without re-hashing it."""
        artifacts = self.artifacts
        for entry in artifacts:
            if entry["path"] == rel:
                entry.update(extra)
                atomic_write_json(self.manifest_path, {"artifacts": artifacts})
                return entry
        raise ExarError(f"{self.root}: {rel} is not in the manifest")

    @contextlib.contextmanager
    def writing(self, rel: str, kind: str, *, role: str | None = None, made_from: Iterable[str] = (),
                is_dir: bool = False, **extra) -> Iterator[Path]:
        """Write an artifact atomically and record it: ``with run.writing(...) as tmp: save(tmp)``."""
        with atomic_path(self.path(rel), is_dir=is_dir) as tmp:
            yield tmp
        self.record(rel, kind, role=role, made_from=made_from, **extra)

    def has(self, rel: str) -> bool:
        """Recorded and still there with the recorded size (a cheap check for skipping work)."""
        entry = self.entry(rel)
        path = self.path(rel)
        if entry is None or not path.exists():
            return False
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return size == entry["bytes"]

    def verify(self, rel: str) -> dict:
        """The manifest entry of ``rel`` after checking the bytes on disk still hash to it."""
        entry = self.entry(rel)
        if entry is None:
            raise ExarError(f"{self.root}: {rel} is not in the manifest; run the stage that makes it first")
        path = self.path(rel)
        if not path.exists():
            raise ExarError(f"{path}: recorded in the manifest but missing on disk")
        size, sha = digest_path(path)
        if sha != entry["sha256"]:
            raise ExarError(f"{path}: contents changed since it was recorded (sha256 {sha[:12]}, manifest {entry['sha256'][:12]})")
        return entry


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExarError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ExarError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
