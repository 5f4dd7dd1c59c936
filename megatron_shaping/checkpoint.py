"""Shaper state on disk: one small file per checkpoint, keyed by group name, with a format version.

The shaper state (:meth:`~megatron_shaping.core.ShapingSession.state_dict`) is a few fp64
numbers per layer, computed from fully reduced statistics and therefore identical on every
rank: one copy per checkpoint suffices, and it does not depend on how the parameters are
sharded (data, tensor or pipeline parallelism), which is what lets a run resume on another
world size or ZeRO stage.

The file (:data:`STATE_FILE`) holds::

    {"kind": "megatron_shaping.shaper_state", "file_version": 1,
     "state": <ShapingSession.state_dict()>,      # its own format_version inside
     "digest": sha256 of the state's contents,    # catches a damaged file that still unpickles
     "meta": {...},                               # where and when it was written, for messages
     "payload_digest": sha256 of all the above}   # header and meta too (absent in files of 0.1.0 and before)

``payload_digest`` covers every other key, so a damaged ``kind`` or version number is reported
as damage, not as a file of another format (which ``allow_fresh_state`` would let through),
and a damaged ``meta`` (the step the load checks) is caught. Files written without it (earlier
versions) are read as before. Any later file version keeps this key and its definition.

This module does file I/O and validation only: no torch.distributed, no deepspeed (the
DeepSpeed wiring is :mod:`megatron_shaping.integrations.deepspeed.checkpointing`). Writes are
atomic (temporary file in the same directory, fsync, ``os.replace``); reads never modify
anything on disk. Files are read with ``torch.load(weights_only=True)``: a checkpoint cannot
run code.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import tempfile
from typing import Any, Dict, List, Optional

import torch

from .core import STATE_FORMAT_VERSION, ShapingSession

logger = logging.getLogger("megatron_shaping")

#: Name of the shaper-state file inside a checkpoint tag directory.
STATE_FILE = "gradient_shaping_state.pt"
FILE_KIND = "megatron_shaping.shaper_state"
FILE_VERSION = 1


class ShaperStateError(ValueError):
    """A checkpoint's shaper state cannot be used. The message names the file."""


class ShaperStateMissing(ShaperStateError):
    """No usable shaper state: the file is absent, or written in a format this version does not
    read. The only case ``allow_fresh_state`` lets through."""


class ShaperStateCorrupt(ShaperStateError):
    """The file exists but is truncated or damaged."""


class ShaperStateMismatch(ShaperStateError):
    """The saved state belongs to another shaper (method, granularity, layer set, shapes)."""


# ---------------------------------------------------------------------------------------- digest
def state_digest(sd: Dict[str, Any]) -> str:
    """sha256 over a state dict's contents (structure, dtypes, shapes and tensor bytes), the
    same for equal states on every rank and platform."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"D")
            for k in sorted(x, key=str):
                h.update(json.dumps(str(k)).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"L%d" % len(x))
            for v in x:
                walk(v)
        else:
            h.update(b"V" + json.dumps(x, default=repr, sort_keys=True).encode())

    walk(sd)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- files
def payload_digest(payload: Dict[str, Any]) -> str:
    """sha256 over every key of a packed file but ``payload_digest`` itself."""
    return state_digest({k: v for k, v in payload.items() if k != "payload_digest"})


def pack_state(sd: Dict[str, Any], meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    payload = {"kind": FILE_KIND, "file_version": FILE_VERSION, "state": sd, "digest": state_digest(sd),
               "meta": dict(meta or {})}
    payload["payload_digest"] = payload_digest(payload)
    return payload


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _created_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the process umask. Read from
    /proc (Linux 4.7+) where it can be: ``os.umask`` can only read it by setting it, and a file
    another thread creates in between would get mode 0o666."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a
    partial one, even if the writer is killed: temporary file in the same directory, fsync,
    ``os.replace``, fsync of the directory."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        # mkstemp makes the file 0600; the file it replaces (or any file open() creates)
        # would have the umask's mode: other users of the checkpoint (an eval job, a
        # conversion) read DeepSpeed's files and must read these too
        os.fchmod(fd, _created_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


def write_state_file(path: str, sd: Dict[str, Any], meta: Optional[Dict[str, Any]] = None) -> str:
    """Atomically write ``sd`` (a ShapingSession state dict) to ``path``; returns its digest."""
    payload = pack_state(sd, meta)
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes_atomic(path, buf.getvalue())
    return payload["digest"]


def read_state_file(path: str) -> Dict[str, Any]:
    """The packed payload (``state``, ``digest``, ``meta``) of a state file, validated.

    Raises :class:`ShaperStateMissing` (no file; another file format), :class:`ShaperStateCorrupt`
    (truncated, damaged, digest mismatch). Reads only.
    """
    if not os.path.isfile(path):
        raise ShaperStateMissing(f"{path}: no gradient shaping state in this checkpoint (file not found). "
                                 "The checkpoint was saved without gradient shaping, by an older megatron-shaping, "
                                 "or its save did not complete. Load another checkpoint, or start the shaper "
                                 "fresh on purpose with gradient_shaping.allow_fresh_state: true (or "
                                 "allow_fresh_state=True when loading).")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:  # permissions, I/O: the file may be fine, it cannot be read here
        raise ShaperStateError(f"{path}: gradient shaping state file cannot be read ({type(e).__name__}: {e}). "
                               "Check its permissions and the file system; the file itself may be intact.") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors of every kind: the file is damaged
        raise ShaperStateCorrupt(f"{path}: gradient shaping state file is truncated or corrupt "
                                 f"({type(e).__name__}: {e}). Load an earlier checkpoint.") from None
    if isinstance(obj, dict) and "payload_digest" in obj and payload_digest(obj) != obj["payload_digest"]:
        raise ShaperStateCorrupt(f"{path}: shaper state file does not match its payload digest (header, state or "
                                 f"meta damaged): the file is corrupt. Load an earlier checkpoint.")
    if not isinstance(obj, dict) or obj.get("kind") != FILE_KIND:
        raise ShaperStateMissing(f"{path}: not a megatron-shaping shaper state file (kind "
                                 f"{obj.get('kind') if isinstance(obj, dict) else type(obj).__name__!r})")
    if obj.get("file_version") != FILE_VERSION:
        raise ShaperStateMissing(f"{path}: shaper state file version {obj.get('file_version')!r} is not supported "
                                 f"(this megatron-shaping reads version {FILE_VERSION})")
    sd = obj.get("state")
    if not isinstance(sd, dict) or "format_version" not in sd:
        raise ShaperStateCorrupt(f"{path}: shaper state file has no state dict")
    if sd["format_version"] != STATE_FORMAT_VERSION:
        raise ShaperStateMissing(f"{path}: shaper state format_version {sd['format_version']!r} is not supported "
                                 f"(this megatron-shaping reads {STATE_FORMAT_VERSION})")
    digest = state_digest(sd)
    if digest != obj.get("digest"):
        raise ShaperStateCorrupt(f"{path}: shaper state does not match its digest: the file is corrupt: "
                                 f"stored {str(obj.get('digest'))[:12]}, computed {digest[:12]}")
    return obj


# ---------------------------------------------------------------------------------------- restore
def hparam_changes(session: ShapingSession, sd: Dict[str, Any]) -> List[str]:
    """Hyperparameters that differ between the saved state and the configured shaper. Not an
    error: changing e.g. a threshold when resuming is legitimate (shape-changing ones such as
    zclip's warmup_steps fail the shape check instead)."""
    out = []
    for i, (saved, member) in enumerate(zip(sd.get("members", []), session.shaper.shapers)):
        for k in member.hparams:
            old, new = saved.get("hparams", {}).get(k, "<absent>"), getattr(member, k)
            if old != new and not (isinstance(old, (list, tuple)) and list(old) == list(new or [])):
                out.append(f"{member.name}[{i}].{k}: saved {old!r}, configured {new!r}")
    return out


def restored_session(session: ShapingSession, sd: Dict[str, Any], source: str) -> ShapingSession:
    """A copy of ``session`` with ``sd`` loaded (remapped by group name); ``session`` itself
    is untouched, so a caller can validate first and commit after the rest of the checkpoint
    loaded. Raises :class:`ShaperStateMismatch` naming ``source`` and the difference."""
    trial = copy.copy(session)          # load_state_dict replaces state/steps/skipped, never mutates them
    try:
        trial.load_state_dict(sd, source=source)
    except ShaperStateError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        msg = str(e)
        if source not in msg:
            msg = f"{source}: {msg}"
        raise ShaperStateMismatch(msg) from None
    return trial


def commit_session(session: ShapingSession, restored: ShapingSession) -> None:
    """Adopt the state of a :func:`restored_session` copy."""
    session.state = restored.state
    session.steps = restored.steps
    session.skipped = restored.skipped
    session.last = None


def reset_session(session: ShapingSession) -> None:
    """Back to the initial state (a deliberate fresh start)."""
    session.state = session.shaper.init(session.layout)
    session.steps = 0
    session.skipped = 0
    session.last = None


def save_session(session: ShapingSession, path: str, meta: Optional[Dict[str, Any]] = None) -> str:
    """Single-process convenience: write ``session``'s state to ``path`` atomically."""
    return write_state_file(path, session.state_dict(), meta)


def load_session(session: ShapingSession, path: str) -> Dict[str, Any]:
    """Single-process convenience: load ``path`` into ``session`` (all or nothing); returns meta."""
    obj = read_state_file(path)
    commit_session(session, restored_session(session, obj["state"], path))
    return obj.get("meta", {})


def state_is_finite(sd: Dict[str, Any]) -> bool:
    """True when every floating-point field of every member is finite."""
    for m in sd["members"]:
        for t in m["fields"].values():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return False
    return True
