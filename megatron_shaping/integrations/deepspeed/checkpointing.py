"""Shaper state in DeepSpeed checkpoints: ``engine.save_checkpoint`` writes it, ``engine.load_checkpoint``
restores it, and ``latest`` only ever names a complete checkpoint.

Where the state lives. A separate file, ``<save_dir>/<tag>/gradient_shaping_state.pt``
(:data:`~megatron_shaping.checkpoint.STATE_FILE`), written by rank 0 atomically, rather than
DeepSpeed's ``client_state`` (which lands inside ``mp_rank_XX_model_states.pt``), because:

* it is read and validated *before* DeepSpeed touches the engine, so a missing, damaged or
  mismatched shaper state stops the load with the engine unchanged, without first reading
  model-state files that hold the whole model for ZeRO-0/1/2;
* it is written after every rank has finished its own files, so its presence also marks a
  complete save, even for a tag loaded explicitly (``latest`` is handled as well, below);
* one copy for the job (the state is identical on every rank: fully reduced statistics), not
  one per model-parallel rank, and it is inspectable with ``torch.load`` alone.

The price: DeepSpeed's ``ds_to_universal`` copies only its own files. :func:`convert_to_universal`
runs it and copies the shaper state along; a universal checkpoint converted without it fails to
load with a message saying how to copy the file.

``latest``. DeepSpeed 0.19.8 lets rank 0 write ``latest`` as soon as *its own* files are
written, with no barrier before (``DeepSpeedEngine.save_checkpoint``), and by truncating and
rewriting the file. A rank killed while still writing its ZeRO shard leaves ``latest`` naming
a partial checkpoint. The wrapper therefore saves with ``save_latest=False``, lets DeepSpeed's
closing barrier pass (every rank has written everything), writes the shaper state, then
rank 0 replaces ``latest`` atomically. (Decoupled checkpoint engines, which commit
asynchronously, keep DeepSpeed's own ``latest`` handling.)
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ...checkpoint import (STATE_FILE, ShaperStateError, ShaperStateMismatch, ShaperStateMissing, commit_session,
                           hparam_changes, read_state_file, reset_session, restored_session, state_digest,
                           write_bytes_atomic, write_state_file)

logger = logging.getLogger("megatron_shaping")


@dataclass(frozen=True)
class _Outcome:
    """One rank's reading of the shaper state, gathered from every rank before anything loads."""
    tag: str
    kind: str                       # "ok", "missing" (none usable), "error" (stop), "skip" (not wanted)
    detail: str = ""                # the state's digest when ok, the message otherwise
    error: Optional[type] = None    # the exception class to raise for "error"


@dataclass
class _Read:
    """What this rank read: the outcome, and for "ok" the file and the session state restored from it."""
    path: str
    outcome: _Outcome
    obj: Optional[Dict[str, Any]] = None
    restored: Any = None


class ShapingCheckpointing:
    """Wraps ``engine.save_checkpoint`` / ``engine.load_checkpoint`` of one engine.
    Reachable as ``engine.gradient_shaping.checkpointing``."""

    def __init__(self, shaping):
        self.shaping = shaping
        self.engine = engine = shaping.engine
        self._orig_save = engine.save_checkpoint
        self._orig_load = engine.load_checkpoint
        engine.save_checkpoint = self.save_checkpoint
        engine.load_checkpoint = self.load_checkpoint
        #: What the last load did: {"path", "tag", "fresh", "meta"}; None before any load.
        self.last_load: Optional[Dict[str, Any]] = None
        shaping.checkpointing = self

    # ------------------------------------------------------------------ ranks
    @property
    def session(self):
        return self.shaping.session

    def _writer(self) -> bool:
        """Who writes the shaper state and ``latest``: global rank 0, and with node-local
        storage the first rank of each node (as DeepSpeed does for its files)."""
        e = self.engine
        if e.global_rank == 0:
            return True
        return bool(e.use_node_local_storage()) and e.local_rank == 0

    def _gather(self, obj):
        if self.shaping.world == 1:
            return [obj]
        out = [None] * self.shaping.world
        self.shaping.dist.all_gather_object(out, obj)
        return out

    def _barrier(self):
        if self.shaping.world > 1:
            self.shaping.dist.barrier()

    def _warn(self, msg: str, *args) -> None:
        # Loud on purpose: once per node.
        if self.engine.local_rank == 0:
            logger.warning(msg, *args)

    def _meta(self, tag: str) -> Dict[str, Any]:
        e, s = self.engine, self.shaping
        return {"tag": tag, "global_steps": int(e.global_steps), "skipped_steps": int(e.skipped_steps),
                "world_size": s.world, "dp_world_size": int(getattr(e, "dp_world_size", 1)),
                "tp_world_size": s.tp_world, "zero_stage": int(e.zero_optimization_stage()),
                "shaper": repr(self.session.shaper), "granularity": self.session.granularity,
                "megatron_shaping_version": _version()}

    # ------------------------------------------------------------------ save
    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True, exclude_frozen_parameters=False,
                        **kwargs):
        """``DeepSpeedEngine.save_checkpoint`` plus the shaper state; ``latest`` is written only
        after every rank finished writing. Same arguments and return value."""
        e = self.engine
        tag = str(f"global_step{e.global_steps}" if tag is None else tag)
        sd = self.shaping.state_dict()          # the session's state, and the spike rule's windows
        digests = self._gather(state_digest(sd))
        if len(set(digests)) > 1:
            bad = [r for r, d in enumerate(digests) if d != digests[0]]
            raise RuntimeError(f"gradient_shaping: shaper state differs between ranks (ranks {bad} vs rank 0) at "
                               f"step {e.global_steps}; refusing to save {tag} (this is a bug: please report it)")
        decoupled = bool(getattr(e.checkpoint_engine, "is_decoupled", lambda: False)())
        # Saving again under a tag (Accelerate's save_state always uses 'pytorch_model'): the
        # old state file goes first, so a save that dies half-way leaves a tag without one
        # (refused on load) rather than the old state beside half-written new model files.
        if self._writer():
            stale = os.path.join(save_dir, tag, STATE_FILE)
            if os.path.isfile(stale):
                logger.warning("gradient_shaping: saving again under tag %s in %s: DeepSpeed overwrites its files in "
                               "place and the previous save there is lost (its shaper state file is removed first, "
                               "so a save that dies half-way leaves a tag that refuses to load); give each save its "
                               "own tag to keep the previous one", tag, save_dir)
                os.unlink(stale)
        self._barrier()
        ok = self._orig_save(save_dir, tag=tag, client_state=client_state,
                             save_latest=save_latest if decoupled else False,
                             exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        # DeepSpeed's save ends with a barrier: every rank's files are written.
        if self._writer():
            tag_dir = os.path.join(save_dir, tag)
            os.makedirs(tag_dir, exist_ok=True)
            write_state_file(os.path.join(tag_dir, STATE_FILE), sd, self._meta(tag))
            if save_latest and not decoupled:
                write_bytes_atomic(os.path.join(save_dir, "latest"), tag.encode())
        self._barrier()
        return ok

    # ------------------------------------------------------------------ load
    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None,
                        allow_fresh_state: Optional[bool] = None, **kwargs):
        """``DeepSpeedEngine.load_checkpoint`` plus the shaper state, validated before DeepSpeed
        loads anything. ``allow_fresh_state`` (default: the config's ``allow_fresh_state``)
        lets a checkpoint without usable shaper state load with a fresh shaper (logged loudly).
        With ``load_module_only`` or ``load_optimizer_states=False`` the shaper, like the
        optimizer, starts fresh. Same return value as DeepSpeed's."""
        call = dict(load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
                    load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                    custom_load_fn=custom_load_fn, **kwargs)
        universal = bool(self.engine.load_universal_checkpoint())
        if tag is None:
            tag = self._agreed_latest(load_dir, universal)
            if tag is None:
                return self._orig_load(load_dir, None, **call)     # DeepSpeed's own message / None
        tag = str(tag)
        want = load_optimizer_states and not load_module_only
        if allow_fresh_state is None:
            allow_fresh_state = bool(self.shaping.config.allow_fresh_state)
        read = self._read(load_dir, tag, want, universal)
        # Every rank decides from the same gathered outcomes, so all raise together (no hang).
        fresh = self._agree(self._gather(read.outcome), load_dir, read.path, allow_fresh_state)
        if read.restored is not None:
            for change in hparam_changes(self.session, read.obj["state"]):
                self._warn("gradient_shaping: hyperparameter changed since %s: %s", read.path, change)
        try:
            result = self._orig_load(load_dir, tag, **call)
        except AssertionError as e:
            tag_dir = os.path.join(load_dir, tag)
            if str(e) or glob.glob(os.path.join(glob.escape(tag_dir), "*model_states.pt")):
                raise
            # DeepSpeed 0.19.8 stops on a bare ``assert len(self.ckpt_list) > 0``
            raise FileNotFoundError(f"{tag_dir}: holds no DeepSpeed model files (*model_states.pt): the save that "
                                    f"wrote this tag did not complete, or it is not a DeepSpeed checkpoint "
                                    f"(contents: {sorted(os.listdir(tag_dir))[:8]})") from e
        if result is None or result[0] is None:
            return result
        self._commit(read)
        if not want:
            self._warn("gradient_shaping: %s loaded without optimizer states: the shaper starts fresh too", tag)
        self.last_load = {"path": read.path, "tag": tag, "fresh": fresh or not want,
                          "meta": dict(read.obj.get("meta", {})) if read.obj is not None else {}}
        return result

    def _agreed_latest(self, load_dir: str, universal: bool) -> Optional[str]:
        """The tag ``latest`` (``latest_universal``) names, the same on every rank; None when no
        rank has the file (DeepSpeed then says so itself). Gathered before anything branches
        on it: a rank without the file (node-local storage, a copy in progress) would return
        through DeepSpeed's no-checkpoint path while the others wait in a collective."""
        latest = os.path.join(load_dir, "latest_universal" if universal else "latest")
        try:
            if os.path.isfile(latest):
                with open(latest) as f:
                    seen = ("tag", f.read().strip())
            else:
                seen = ("none", None)
        except OSError as e:
            seen = ("error", f"{type(e).__name__}: {e}")
        outcomes = self._gather(seen)
        if all(kind == "none" for kind, _ in outcomes):
            return None
        if len(set(outcomes)) > 1:
            per_rank = "; ".join(f"rank {r}: " + (v if k != "none" else "no file") for r, (k, v) in enumerate(outcomes))
            raise ShaperStateError(f"{latest}: the ranks do not agree on the checkpoint to resume ({per_rank}); "
                                   "is the checkpoint directory complete and the same on every node?")
        kind, value = outcomes[0]
        if kind == "error":
            raise ShaperStateError(f"{latest}: cannot be read ({value})")
        if not value:
            # DeepSpeed's own writes of latest / latest_universal are not atomic
            raise ShaperStateError(f"{latest}: is empty (a write interrupted by a crash?); it should hold the tag "
                                   f"of the checkpoint to resume: write it (e.g. global_step1000) or pass tag=")
        return value

    def _read(self, load_dir: str, tag: str, want: bool, universal: bool) -> "_Read":
        """Read and validate this rank's copy of the shaper state, without touching the session."""
        path = os.path.join(load_dir, tag, STATE_FILE)
        tag_dir = os.path.join(load_dir, tag)
        if not os.path.isdir(tag_dir):
            # DeepSpeed itself would stop on a bare AssertionError here.
            return _Read(path, _Outcome(tag, "error", f"checkpoint directory {tag_dir} does not exist",
                                        FileNotFoundError))
        if not want:
            return _Read(path, _Outcome(tag, "skip"))
        try:
            obj = read_state_file(path)
            restored = restored_session(self.session, obj["state"], path)
            self._check_skip_state(obj["state"], path)
        except ShaperStateMissing as err:
            msg = str(err)
            if universal:
                msg += (f" Universal checkpoint: DeepSpeed's ds_to_universal does not copy {STATE_FILE}; "
                        "convert with megatron_shaping.integrations.deepspeed.checkpointing."
                        f"convert_to_universal, or copy {STATE_FILE} from the source tag directory into "
                        f"{tag_dir}.")
            return _Read(path, _Outcome(tag, "missing", msg))
        except ShaperStateError as err:
            return _Read(path, _Outcome(tag, "error", str(err), type(err)))
        return _Read(path, _Outcome(tag, "ok", obj["digest"]), obj, restored)

    def _agree(self, outcomes: List["_Outcome"], load_dir: str, path: str, allow_fresh: bool) -> bool:
        """Raise (on every rank alike) unless the ranks' outcomes allow the load; True when the
        shaper is to start fresh (no usable state anywhere, and that is allowed)."""
        tags = {o.tag for o in outcomes}
        if len(tags) > 1:
            raise ShaperStateError(f"ranks resolved different checkpoint tags in {load_dir}: {sorted(tags)}")
        for r, o in enumerate(outcomes):
            if o.kind == "error":
                where = f" (read on rank {r})" if r != self.engine.global_rank else ""
                raise o.error(o.detail + where)
        kinds = {o.kind for o in outcomes}
        if kinds == {"ok"} and len({o.detail for o in outcomes}) > 1:
            raise ShaperStateError(f"{path}: ranks read different shaper state (digests differ); "
                                   "is the checkpoint directory the same on every node?")
        if "missing" not in kinds:
            return False
        if kinds != {"missing"}:
            raise ShaperStateError(f"{path}: the shaper state file is readable on some ranks only: "
                                   f"{[o.kind for o in outcomes]}")
        msg = next(o.detail for o in outcomes if o.kind == "missing")
        if not allow_fresh:
            raise ShaperStateMissing(msg)
        self._warn("gradient_shaping: STARTING THE SHAPER FRESH while resuming from %s: %s "
                   "(allow_fresh_state is set). Its statistics restart from zero as at step 0.", path, msg)
        return True

    def _commit(self, read: "_Read") -> None:
        """After DeepSpeed loaded: install the read state, or reset the shaper when there is none."""
        e = self.engine
        if read.restored is not None:
            saved_steps = read.obj.get("meta", {}).get("global_steps")
            if saved_steps is not None and int(saved_steps) != int(e.global_steps):
                raise ShaperStateMismatch(f"{read.path}: shaper state was saved at global step {saved_steps} but "
                                          f"the checkpoint's model is at step {e.global_steps}: files from "
                                          "different saves")
            commit_session(self.session, read.restored)
            self._commit_skip_state(read.obj["state"], read.path)
        else:
            reset_session(self.session)
            if self.shaping.skip is not None:
                self.shaping.skip.reset()
        self.shaping.last_skipped, self.shaping.last_norm_before, self.shaping.last_skip_reasons = False, None, ()

    # ------------------------------------------------------------------ spike rule
    def _check_skip_state(self, sd: Dict[str, Any], path: str) -> None:
        """Validate the spike rule's saved windows before anything is loaded."""
        from ...spike_skip import SpikeSkip
        from .engine import SKIP_KEY
        if self.shaping.skip is None or sd.get(SKIP_KEY) is None:
            return
        try:
            SpikeSkip.check_state(sd[SKIP_KEY], path)
        except ValueError as e:
            raise ShaperStateMismatch(str(e)) from None

    def _commit_skip_state(self, sd: Dict[str, Any], path: str) -> None:
        """Restore the rolling windows. A checkpoint without them (saved before spike skipping
        existed, or with it off) loads: the windows start empty and the rule re-warms."""
        from .engine import SKIP_KEY
        rule = self.shaping.skip
        if rule is None:
            return
        saved = sd.get(SKIP_KEY)
        if saved is None:
            self._warn("gradient_shaping: %s has no spike-skip window (saved before spike skipping or with it off): "
                       "the rule starts with an empty window and acts after %d steps", path, rule.min_history)
        rule.load_state_dict(saved, path)


def _version() -> str:
    """The installed distribution's version; "unknown" when running from a source tree that is
    not installed."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("megatron-shaping")
    except PackageNotFoundError:
        return "unknown"


def install_checkpoint_hooks(shaping) -> ShapingCheckpointing:
    """Called by :class:`~.engine.DeepSpeedShaping` on attach."""
    return ShapingCheckpointing(shaping)


def load_checkpoint(engine, load_dir, tag=None, allow_fresh_state: Optional[bool] = None, **kwargs):
    """``engine.load_checkpoint`` with the fresh-state choice as an argument (for launchers'
    ``--shaping-fresh-state``). Plain DeepSpeed load when no shaping is attached."""
    ck = getattr(getattr(engine, "gradient_shaping", None), "checkpointing", None)
    if ck is None:
        return engine.load_checkpoint(load_dir, tag, **kwargs)
    return ck.load_checkpoint(load_dir, tag, allow_fresh_state=allow_fresh_state, **kwargs)


def convert_to_universal(checkpoint_dir: str, tag: Optional[str] = None, output_dir: Optional[str] = None,
                         num_workers: int = 1, inject_missing_state: bool = False, strict: bool = True) -> str:
    """DeepSpeed's ``ds_to_universal`` for ``<checkpoint_dir>/<tag>`` (default: ``latest``) into
    ``output_dir`` (default ``<checkpoint_dir>/<tag>_universal``), with the shaper state copied
    along. ``ds_to_universal`` points ``latest_universal`` (beside ``output_dir``) at the result;
    the shaper state is copied first so that it never names a directory without it, and removed
    again if the conversion fails. Refuses an ``output_dir`` that exists (FileExistsError) and a
    tag that does not (FileNotFoundError), before writing anything.
    ``inject_missing_state``: DeepSpeed's flag, needed for models that do not record
    ``universal_checkpoint_info`` themselves (Megatron-DeepSpeed models do). Returns output_dir."""
    from deepspeed.checkpoint import ds_to_universal
    if tag is None:
        latest = os.path.join(checkpoint_dir, "latest")
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"convert_to_universal: {latest} does not exist: pass tag= (the checkpoint's "
                                    f"global_step<N> directory)")
        with open(latest) as f:
            tag = f.read().strip()
        if not tag:
            raise ValueError(f"convert_to_universal: {latest} is empty: pass tag=")
    src = os.path.join(checkpoint_dir, tag)
    if not os.path.isdir(src):
        tags = sorted(d for d in os.listdir(checkpoint_dir) if os.path.isdir(os.path.join(checkpoint_dir, d))) \
            if os.path.isdir(checkpoint_dir) else []
        raise FileNotFoundError(f"convert_to_universal: checkpoint {src} does not exist (tags in {checkpoint_dir}: "
                                f"{tags[:12]})")
    out = output_dir or os.path.join(checkpoint_dir, f"{tag}_universal")
    if os.path.exists(out):
        # ds_to_universal writes into it in place: a folder there (an earlier conversion, another
        # checkpoint) would be overwritten or mixed with this one
        raise FileExistsError(f"convert_to_universal: {out} already exists; remove it or choose another output_dir "
                              f"(nothing was written)")
    state = os.path.join(src, STATE_FILE)
    has_state = os.path.isfile(state)
    if has_state:
        read_state_file(state)            # refuse to propagate a damaged file
    else:
        logger.warning("gradient_shaping: %s has no %s: the universal checkpoint will carry no shaper state",
                       src, STATE_FILE)
    os.makedirs(out)
    copied = os.path.join(out, STATE_FILE)
    if has_state:
        # copied before the conversion, which writes latest_universal last: it never names a
        # folder without the state
        with open(state, "rb") as f:
            write_bytes_atomic(copied, f.read())
    args = argparse.Namespace(input_folder=src, output_folder=out, num_extract_workers=num_workers,
                              num_merge_workers=num_workers, keep_temp_folder=False, strict=strict,
                              inject_missing_state=inject_missing_state)
    try:
        ds_to_universal.main(args)
    except BaseException:
        # a failed conversion leaves DeepSpeed's partial files; without the state file the
        # folder is never taken for a complete universal checkpoint
        if has_state and os.path.isfile(copied):
            os.unlink(copied)
        raise
    return out
