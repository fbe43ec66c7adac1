"""The run directory: the only contract between stages.

``models/<run>/run.json`` holds the resolved settings of every stage that ran, and
``manifest.json`` every artifact (relative path, kind, role, bytes, sha256, created, made from,
and the sha256 of each input it was made from). The rules that make a run trustworthy:

- Every artifact is written under a temporary name in its final folder, flushed to disk (file
  and folder), renamed, and the rename flushed: a crash never leaves a half file under a final
  name, and a file under a final name is complete after a power cut.
- One writer per run: a stage holds the run's exclusive lock (``Run.lock``) while it writes; a
  second writer gets one line naming the holder. Manifest and settings updates happen under that
  lock, so none is lost. Under a multi-process launch (torch.distributed, accelerate) only the
  main process writes (``one_writer``); the others wait for it and read.
- Stale inputs are caught: an artifact whose inputs were redone since it was made is reported
  (``Run.stale``) and redone only with ``--force``, which marks everything made from it stale too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from exar import __version__
from exar.constants import BASE_MODELS_DIR, MANIFEST, MODELS_DIR_ENV, RUN_SETTINGS
from exar.errors import ExarError

TMP_TAG = ".exar-tmp-"
LOCK_FILE = ".exar-lock"
_OLD_TAG = f"{TMP_TAG}old-"
_WAIT_FOR_MAIN_S = 24 * 3600  # how long the other processes of a launch wait while the main one runs a stage alone


def models_dir() -> Path:
    """The artifact root: $EXAR_MODELS, else ./models."""
    return Path(os.environ.get(MODELS_DIR_ENV, "models"))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- durable atomic writes --------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(final: Path | str, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; flush it to disk and rename it onto ``final`` only
    if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}{TMP_TAG}{uuid.uuid4().hex[:8]}")
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if not tmp.exists():
            raise ExarError(f"{final}: nothing was written")
        fsync_tree(tmp)
        _replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: Path | str, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: Path | str, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file and folder under a folder, to disk."""
    path = Path(path)
    if not path.is_dir():
        _fsync_file(path)
        return
    for child in path.rglob("*"):
        if child.is_file():
            _fsync_file(child)
        elif child.is_dir():
            _fsync_dir(child)
    _fsync_dir(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)  # Windows' fsync (_commit) needs a writable descriptor
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable; Windows cannot open folders, nor needs to."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, final: Path) -> None:
    if tmp.is_dir() and final.exists():
        # a folder cannot replace another in one rename; a crash in between leaves the old one
        # under <final>.exar-tmp-old-*, which the next writer of the run puts back (_recover)
        old = final.with_name(f"{final.name}{_OLD_TAG}{uuid.uuid4().hex[:8]}")
        final.rename(old)
        tmp.rename(final)
        _fsync_dir(final.parent)
        _remove(old)
    else:
        os.replace(tmp, final)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _recover(root: Path) -> list[str]:
    """Leftovers of writers that died in a run: temporaries go, a folder caught mid-replacement
    goes back under its name. Called by a process that just took the run's lock, so no live
    writer owns them. Returns what it did."""
    done = []
    for path in sorted(root.rglob(f"*{TMP_TAG}*"), key=lambda p: len(p.parts)):
        if not path.exists() and not path.is_symlink():
            continue  # inside a folder removed a moment ago
        name, _, _ = path.name.partition(TMP_TAG)
        final = path.with_name(name)
        if path.name.startswith(f"{name}{_OLD_TAG}") and not final.exists():
            path.rename(final)
            done.append(f"restored {final.relative_to(root)}")
        else:
            _remove(path)
            done.append(f"removed {path.relative_to(root)}")
    return done


# --- hashing ----------------------------------------------------------------------------------

_SHA_CACHE: dict[tuple, str] = {}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, hashed once per process while its inode, mtime and size stay the same."""
    path = Path(path)
    key = _stat_key(path)
    if key in _SHA_CACHE:
        return _SHA_CACHE[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def digest_path(path: Path) -> tuple[int, str]:
    """(bytes, sha256) of a file, or of a folder as the hash of its files' relative paths and hashes."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size, sha256_file(path)
    if not path.is_dir():
        raise ExarError(f"{path}: no such file or folder")
    digest, total = hashlib.sha256(), 0
    for file in _files(path):
        total += file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return total, digest.hexdigest()


def stat_fingerprint(path: Path) -> str:
    """Identifies the bytes under ``path`` as written (inode, mtime, size of each file) without
    reading them: equal after a skip check means the recorded hash still holds. A file renamed
    into place but not yet recorded (a crash in between) has another inode, so it never matches."""
    path = Path(path)
    files = [path] if path.is_file() else _files(path)
    digest = hashlib.sha256()
    for file in files:
        st = file.stat()
        digest.update(f"{file.relative_to(path).as_posix() if file != path else ''}\0{st.st_ino}\0"
                      f"{st.st_mtime_ns}\0{st.st_size}\n".encode())
    return digest.hexdigest()


# --- one writer -------------------------------------------------------------------------------

def world_size() -> int:
    """Processes of this launch (torchrun / accelerate launch set WORLD_SIZE); 1 on its own."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


_ONE_WRITER = {"inside": False}


def one_writer(fn: Callable) -> Callable:
    """``fn`` runs on the main process of a multi-process launch only; the others wait for it and
    get its result, or raise its error. On its own a process just calls ``fn``.

    This is how a run has one writer under accelerate/torch.distributed: the main process makes
    the run, its data and settings, every process trains, the main one saves.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if world_size() == 1 or _ONE_WRITER["inside"]:  # nested: the main process is already alone
            return fn(*args, **kwargs)
        import torch.distributed as dist

        if not dist.is_initialized():
            from datetime import timedelta

            from accelerate import PartialState

            PartialState(timeout=timedelta(seconds=_WAIT_FOR_MAIN_S))
        box, failure = [None], None
        if dist.get_rank() == 0:
            _ONE_WRITER["inside"] = True
            try:
                box = [("ok", fn(*args, **kwargs))]
            except ExarError as e:
                box, failure = [("error", e)], e
            except BaseException as e:  # the others must not wait forever, nor pickle anything odd
                box, failure = [("error", ExarError(f"the main process failed: {type(e).__name__}: {e}"))], e
            finally:
                _ONE_WRITER["inside"] = False
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if failure is not None:
            raise failure
        if status == "error":
            raise value
        return value

    return wrapper


def writes_run(stage: str, *, every_rank: bool = False) -> Callable:
    """Decorator for a stage function whose first argument is the Run it writes: it runs holding
    the run's writer lock, and under a multi-process launch on the main process only (the others
    wait for its result), unless ``every_rank`` (training: every process computes, the main one
    writes)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(run: "Run", *args, **kwargs):
            def locked():
                with run.lock(stage):
                    return fn(run, *args, **kwargs)

            return locked() if every_rank else one_writer(locked)()

        return wrapper

    return decorate


_HELD: dict[str, list] = {}  # resolved run root -> [open lock file, depth] of the locks this process holds


def _try_lock(f) -> bool:
    if os.name == "nt":
        import msvcrt

        f.seek(1 << 20)  # lock a byte past the holder's note, so others can still read the note
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _unlock(f) -> None:
    if os.name == "nt":
        import msvcrt

        f.seek(1 << 20)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _holder_text(note: str) -> str:
    try:
        holder = json.loads(note)
    except json.JSONDecodeError:
        return "another exar process"
    return (f"{holder.get('stage', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')}: {holder.get('command', '?')})")


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
            models_dir().mkdir(parents=True, exist_ok=True)
            for suffix in range(1, 10_000):
                root = models_dir() / (f"run-{stamp}" if suffix == 1 else f"run-{stamp}-{suffix}")
                try:
                    root.mkdir()  # exclusive: two processes starting in the same second get two runs
                    break
                except FileExistsError:
                    continue
        run = cls(root)
        run.root.mkdir(parents=True, exist_ok=True)
        with run.lock("create"):
            if not run.settings_path.exists():
                atomic_write_json(run.manifest_path, {"artifacts": []})
                atomic_write_json(run.settings_path, {"exar_version": __version__, "created": now()})
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
                    created = read_json(settings).get("created", "")
                    candidates.append((created, settings.stat().st_mtime, child))
        if not candidates:
            raise ExarError(f"no run under {where}/; pass --run DIR or start one with `exar-train stage-zero`")
        return max(candidates)[2]

    # the writer lock

    @contextlib.contextmanager
    def lock(self, stage: str = "write") -> Iterator[None]:
        """Hold the run's exclusive writer lock (re-entrant within a process).

        Another process holding it is an error naming that process and its stage. The operating
        system drops the lock of a process that dies, so a killed stage never blocks the next one,
        which first clears what the dead writer left (``_recover``). Under a multi-process launch
        only the main process locks: the others do not write.
        """
        if not is_main_process():
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        key = str(self.root.resolve())
        if key in _HELD:
            _HELD[key][1] += 1
            try:
                yield
            finally:
                _HELD[key][1] -= 1
            return
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        f = os.fdopen(fd, "r+b")
        if not _try_lock(f):
            f.seek(0)
            note = f.read(4096).split(b"\0")[0].decode("utf-8", errors="replace")
            f.close()
            raise ExarError(f"{self.root}: another exar process is writing this run: {_holder_text(note)}; "
                            "wait for it to finish (or stop it) and run this again")
        note = {"stage": stage, "pid": os.getpid(), "host": socket.gethostname(), "since": now(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(note).encode())
        f.flush()
        _HELD[key] = [f, 1]
        try:
            for line in _recover(self.root) if self.settings_path.is_file() else ():
                print(f"run: {line} (left by an interrupted writer)", file=sys.stderr)
            yield
        finally:
            del _HELD[key]
            _unlock(f)
            f.close()

    def writer(self) -> str | None:
        """Who holds the run's writer lock now (None: nobody), without taking it for long."""
        path = self.root / LOCK_FILE
        if str(self.root.resolve()) in _HELD:
            return "this process"
        if not path.is_file():
            return None
        with open(path, "r+b") as f:
            if _try_lock(f):
                _unlock(f)
                return None
            f.seek(0)
            return _holder_text(f.read(4096).decode("utf-8", errors="replace"))

    # settings

    @property
    def settings_path(self) -> Path:
        return self.root / RUN_SETTINGS

    @property
    def settings(self) -> dict:
        return read_json(self.settings_path)

    def update_settings(self, section: str, values: Mapping) -> dict:
        """Record the resolved settings of one stage under ``section`` (replacing an older record)."""
        with self.lock():
            settings = self.settings
            settings[section] = dict(values)
            atomic_write_json(self.settings_path, settings)
        return settings

    def bind_base(self, base: Mapping) -> None:
        """Record the run's base model, or refuse one that differs from the base already recorded."""
        with self.lock():
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
        return read_json(self.manifest_path).get("artifacts", [])

    def path(self, rel: str) -> Path:
        return self.root / rel

    def entry(self, rel: str) -> dict | None:
        return next((a for a in self.artifacts if a["path"] == rel), None)

    def find(self, kind: str | None = None, role: str | None = None) -> list[dict]:
        return [a for a in self.artifacts if (kind is None or a["kind"] == kind) and (role is None or a.get("role") == role)]

    def _update_manifest(self, change: Callable[[list[dict]], list[dict]]) -> None:
        """Read, change and atomically rewrite the manifest, holding the run's lock."""
        with self.lock():
            atomic_write_json(self.manifest_path, {"artifacts": change(self.artifacts)})

    def record(
        self,
        rel: str,
        kind: str,
        *,
        role: str | None = None,
        made_from: Iterable[str] = (),
        **extra,
    ) -> dict:
        """Add (or replace) the manifest entry of an artifact that now exists under ``rel``.

        ``made_from_sha256`` keeps the recorded hash of each input (None for one outside the
        manifest), which ``stale`` compares with the inputs' entries as they are later.
        """
        with self.lock():
            size, sha = digest_path(self.path(rel))
            made_from = list(made_from)
            inputs = {src: (self.entry(src) or {}).get("sha256") for src in made_from}
            entry = {
                "path": rel,
                "kind": kind,
                "role": role,
                "bytes": size,
                "sha256": sha,
                "created": now(),
                "made_from": made_from,
                "made_from_sha256": inputs,
                "stat": stat_fingerprint(self.path(rel)),
                **extra,
            }
            self._update_manifest(lambda artifacts: [a for a in artifacts if a["path"] != rel] + [entry])
        return entry

    def annotate(self, rel: str, **extra) -> dict:
        """Add facts to an artifact's entry (verification results, say) without re-hashing it."""
        found = {}

        def change(artifacts):
            for entry in artifacts:
                if entry["path"] == rel:
                    entry.update(extra)
                    found.update(entry)
            return artifacts

        self._update_manifest(change)
        if not found:
            raise ExarError(f"{self.root}: {rel} is not in the manifest")
        return found

    @contextlib.contextmanager
    def writing(self, rel: str, kind: str, *, role: str | None = None, made_from: Iterable[str] = (),
                is_dir: bool = False, **extra) -> Iterator[Path]:
        """Write an artifact atomically and record it: ``with run.writing(...) as tmp: save(tmp)``."""
        with self.lock():
            with atomic_path(self.path(rel), is_dir=is_dir) as tmp:
                yield tmp
            self.record(rel, kind, role=role, made_from=made_from, **extra)

    def has(self, rel: str) -> bool:
        """Recorded, and the bytes on disk are the recorded ones (a skip check).

        Cheap when the files are the ones written (same inode, mtime and size as recorded);
        otherwise (a copied run, or a file renamed into place by a writer that died before
        recording it) the bytes are hashed and compared.
        """
        entry = self.entry(rel)
        path = self.path(rel)
        if entry is None or not path.exists():
            return False
        if entry.get("stat") is not None and entry["stat"] == stat_fingerprint(path):
            return True
        return digest_path(path) == (entry["bytes"], entry["sha256"])

    def verify(self, rel: str) -> dict:
        """The manifest entry of ``rel`` after checking the bytes on disk still hash to it (hashed
        once per process while the files' inode, mtime and size stay the same)."""
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

    # staleness

    def stale(self) -> dict[str, list[str]]:
        """Artifacts not made from their inputs as they are now: {path: [why, ...]}.

        An artifact is stale when an input it was made from has another hash now, is no longer
        recorded, is itself stale, or was redone with --force (``invalidate_downstream``).
        """
        entries = {a["path"]: a for a in self.artifacts}
        reasons: dict[str, list[str]] = {}
        for rel, entry in entries.items():
            why = [entry["invalidated"]] if entry.get("invalidated") else []
            for src, sha in (entry.get("made_from_sha256") or {}).items():
                now_entry = entries.get(src)
                if sha is None:
                    continue  # made from something outside the manifest (a user's file): nothing to compare
                if now_entry is None:
                    why.append(f"made from {src}, which is no longer recorded")
                elif now_entry["sha256"] != sha:
                    why.append(f"made from {src} with sha256 {sha[:12]}, which is now {now_entry['sha256'][:12]}")
            if why:
                reasons[rel] = why
        changed = True
        while changed:  # what is made from a stale artifact is stale too
            changed = False
            for rel, entry in entries.items():
                if rel in reasons:
                    continue
                bad = [src for src in entry.get("made_from") or [] if src in reasons]
                if bad:
                    reasons[rel] = [f"made from {src}, which is stale" for src in bad]
                    changed = True
        return reasons

    def status(self) -> list[dict]:
        """Each recorded artifact with its state: ``ok``, ``stale`` (and why), ``changed`` (its bytes
        are not the recorded ones) or ``missing``."""
        stale = self.stale()
        rows = []
        for entry in self.artifacts:
            rel = entry["path"]
            if not self.path(rel).exists():
                state = "missing"
            elif not self.has(rel):
                state = "changed"
            else:
                state = "stale" if rel in stale else "ok"
            rows.append({"path": rel, "kind": entry["kind"], "role": entry.get("role"), "bytes": entry["bytes"],
                         "created": entry.get("created"), "state": state, "why": stale.get(rel, []),
                         "made_from": entry.get("made_from_sha256") or dict.fromkeys(entry.get("made_from") or [])})
        return rows

    def downstream(self, rel: str) -> list[str]:
        """Every artifact made, directly or not, from ``rel``, in manifest order."""
        entries = self.artifacts
        found: set[str] = set()
        frontier = {rel}
        while frontier:
            frontier = {a["path"] for a in entries if set(a.get("made_from") or []) & frontier} - found
            found |= frontier
        return [a["path"] for a in entries if a["path"] in found]

    def invalidate_downstream(self, rel: str) -> list[str]:
        """Mark everything made from ``rel`` stale (``rel`` is being redone with --force)."""
        below = set(self.downstream(rel))
        if below:
            def change(artifacts):
                for entry in artifacts:
                    if entry["path"] in below:
                        entry["invalidated"] = f"{rel} was redone with --force"
                return artifacts

            self._update_manifest(change)
        return sorted(below)

    def done(self, rel: str, *, force: bool = False) -> bool:
        """Whether a stage may skip making ``rel``: recorded, intact, and made from its inputs as
        they are now. With ``force`` it may not, and everything made from ``rel`` becomes stale.
        A stale ``rel`` is an error naming what changed: the user decides to redo it (--force)."""
        if force:
            one_writer(self.invalidate_downstream)(rel)  # training calls this on every process of a launch
            return False
        if not self.has(rel):
            return False
        why = self.stale().get(rel)
        if why:
            raise ExarError(f"{self.path(rel)} is stale: {'; '.join(why)}; pass --force to redo it "
                            f"(`exar status --run {self.root}` lists everything stale)")
        return True


def read_json(path: Path | str) -> dict:
    """A JSON file, or one line naming it: missing, or where it stops being JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExarError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ExarError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
