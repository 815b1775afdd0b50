"""Checkpointing with orbax: the TrainState and the data-iterator position, saved together.

Each checkpoint is a step directory holding two items: ``state`` (the sharded TrainState: params,
optimizer state, EMA, RNG and step, written by every process for its own shards) and ``data`` (the
grain iterator state, JSON). Orbax writes asynchronously to a temporary directory
(``<step>.orbax-checkpoint-tmp-*``) and renames it when complete, so a run killed mid-save leaves
the previous checkpoint as the latest one; the temporary directory is never a restore candidate and
is removed (with a warning naming it) when the next run opens the directory.

Object storage (``s3://``, ``gs://``: any URL :mod:`contrastive_jax.storage` handles): orbax writes
each checkpoint to a local staging directory; when that write is complete, a background thread
uploads the step directory file by file and then writes the commit marker ``<step>/_COMMITTED``
LAST. Only step directories with the marker are checkpoints, so an upload interrupted at any
point (SIGKILL, lost network, full bucket quota) is never picked as the latest: the run resumes
from the newest committed step, which is downloaded to the staging directory and restored.

A save that fails (e.g. ``ENOSPC``: the disk is full) raises :class:`CheckpointSaveError`, one
message naming the step, the cause and the newest complete checkpoint, which stays intact.

A checkpoint that fails to restore (a truncated or corrupt file, a missing item) is moved aside to
``<dir>_corrupt/`` with one warning and the previous one is tried, so a damaged latest checkpoint
costs the steps since the one before it, not the run.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from contrastive_jax import storage
from contrastive_jax.parallel.distributed import barrier

log = logging.getLogger("contrastive_jax")

ITEMS = ("state", "data")
COMMIT_MARKER = "_COMMITTED"  # written last into a remote step dir: the upload is complete
_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
# Orbax's replica-parallel save splits every replicated array among the devices holding a copy,
# each writing one slice; every distinct slice is a small jitted program, compiled at a process's
# first save (128 of them for the tiny model's state on 8 devices: ~2.5 s of a 12 s run). Below
# this size per slice a whole-array write by one replica is cheaper, so small arrays (biases,
# norms, the temperature, the step) are written whole; large replicated arrays are still split.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def state_type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """The registry the ``state`` item is saved and restored with: orbax's standard handlers, the
    jax.Array one with :data:`MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL` (a registry of our own, so
    orbax's global one, which a user's code may also use, is left alone)."""
    from orbax.checkpoint._src.metadata import array_metadata_store  # the store orbax's default uses

    array = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL,
        array_metadata_store=array_metadata_store.Store())
    others = [(t, ocp.type_handlers.get_type_handler(t)) for t in (int, float, bytes, np.number, np.ndarray, str)]
    return ocp.type_handlers.create_type_handler_registry(*others, (jax.Array, array))


class CheckpointSaveError(OSError):
    """Writing (or uploading) a checkpoint failed; the message names the step, the cause and the
    newest complete checkpoint, which is left intact."""


def _summary(e: BaseException) -> str:
    """``Type: first line`` of an error, short; a full disk is named as such (orbax wraps ENOSPC
    in a tensorstore RESOURCE_EXHAUSTED ValueError with a 300-character path)."""
    text = str(e).strip()
    if "No space left on device" in text or getattr(e, "errno", None) == 28:
        where = re.search(r'local file "([^"]+)"', text) or re.search(r'(?:file|writing:?) "([^"]+)"', text)
        return "No space left on device (ENOSPC)" + (f" writing {where.group(1)}" if where else "")
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


class _OrbaxNoiseFilter(logging.Filter):
    """Drops orbax's ERROR records (with tracebacks) about a failed background write or read, and
    asyncio's about orbax tasks whose failure nobody retrieved: the failure is reported as one line
    instead (:class:`CheckpointSaveError`, or the resume warning). Kept at DEBUG on our logger."""

    _PATTERNS = ("raised an exception", "Failed to run", "thread (save_finalize) failed", "Save Finalize thread")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno >= logging.ERROR and (any(p in message for p in self._PATTERNS)
                                                or _orbax_task_never_retrieved(record, message)):
            log.debug("orbax: %s", message.splitlines()[0])
            return False
        return True


# The codes of an absl::Status, which tensorstore's errors begin with ("OUT_OF_RANGE: Error reading ...").
_STATUS_PREFIX = re.compile(r"^(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
                            r"PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|"
                            r"UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED): ")


def _orbax_task_never_retrieved(record: logging.LogRecord, message: str) -> bool:
    """asyncio's "Task exception was never retrieved" (logged when the garbage collector meets an
    abandoned task, so only sometimes) for orbax's read/write coroutines of a checkpoint that
    failed: the failure itself is reported once by the caller.

    Two shapes: a coroutine of orbax's (its frames are in the traceback), and a tensorstore future
    (an open, a read) that orbax handed to asyncio, which wrapped it in a task: its traceback holds
    only asyncio's own frames (``_wrap_awaitable``) and the error is a C++ status ("OUT_OF_RANGE:
    ..."). Only orbax reaches tensorstore in a training process; a user's coroutine that fails has
    a frame of its own in the traceback, and still prints."""
    if "exception was never retrieved" not in message or not record.exc_info:
        return False
    frames = []
    tb = record.exc_info[2]
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    if any("orbax" in f for f in frames):
        return True
    asyncio_dir = os.path.dirname(asyncio.__file__)
    return (bool(frames) and all(os.path.dirname(f) == asyncio_dir for f in frames)
            and bool(_STATUS_PREFIX.match(str(record.exc_info[1]))))


def _is_background_noise(unraisable) -> bool:
    """Errors Python reports as "unraisable" after a failed orbax write: tensorstore futures that
    complete after orbax closed their event loop ("Event loop is closed"), and orbax's abandoned
    write coroutines collected at interpreter exit. Each failed write produced hundreds of them."""
    e, obj = unraisable.exc_value, unraisable.object
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
        return True
    return getattr(getattr(obj, "cr_code", None), "co_filename", "").find("orbax") >= 0


def quiet_background_failures() -> None:
    """Installs the filters above once per process (idempotent): the unraisable hook, and the log filter on absl's and asyncio's loggers."""
    if getattr(sys.unraisablehook, "_contrastive_jax", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if _is_background_noise(unraisable):
            log.debug("dropped: %r", unraisable.exc_value)
            return
        previous(unraisable)

    hook._contrastive_jax = True
    sys.unraisablehook = hook
    logging.getLogger("absl").addFilter(_OrbaxNoiseFilter())
    logging.getLogger("asyncio").addFilter(_OrbaxNoiseFilter())


def _warn(message: str) -> None:
    """One line on stderr from process 0 (the user must see it; once, not per process)."""
    log.debug(message)
    if jax.process_index() == 0:
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


_STAGING_PREFIX = "contrastive_jax_staging_"


def _new_staging_dir() -> str:
    """A fresh local staging dir ``<tmp>/contrastive_jax_staging_<pid>_<random>`` (parent:
    ``$CONTRASTIVE_JAX_STAGING_DIR`` or the system temp dir). Those of processes no longer alive
    (a SIGKILLed run cannot remove its own) are deleted first: all they held was either uploaded
    and committed or never complete."""
    parent = os.environ.get("CONTRASTIVE_JAX_STAGING_DIR") or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    for name in os.listdir(parent):
        pid = name[len(_STAGING_PREFIX):].split("_", 1)[0]
        if name.startswith(_STAGING_PREFIX) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}_", dir=parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Checkpointer:
    """Saves every ``every_steps`` steps (and when forced), keeps the newest ``keep``.

    Args:
      directory: where step directories go: a local path (created if missing) or a URL such as
        ``s3://bucket/run/checkpoints`` (written through a local staging directory, see the module
        docstring).
      async_save: write (and upload) in background threads while training continues.
      staging_dir: local directory for remote checkpoints (default: a fresh temporary directory,
        removed by :meth:`close`, or by the next run if this process is killed;
        ``$CONTRASTIVE_JAX_STAGING_DIR`` is used as its parent if set).
    """

    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True,
                 staging_dir: str | None = None):
        self.directory = storage.abspath(directory)
        self.remote = storage.is_remote(self.directory)
        self.every_steps = max(int(every_steps), 1)
        self._keep = max(int(keep), 1)
        self._async = bool(async_save)
        self._failed: CheckpointSaveError | None = None
        self._pending = -1  # the step of the newest save whose background write may still run
        self._upload: threading.Thread | None = None
        self._upload_error: BaseException | None = None
        self._own_staging = False
        quiet_background_failures()
        if self.remote:
            if jax.process_count() > 1:
                raise ValueError(f"workdir {self.directory}: checkpoints on object storage are written by one "
                                 "process; a multi-process run needs a shared filesystem workdir")
            storage.makedirs(self.directory)  # the bucket must exist (FileNotFoundError names it)
            self._own_staging = staging_dir is None
            self.local = staging_dir or _new_staging_dir()
            self._report_uncommitted()
        else:
            self.local = self.directory
            self._report_interrupted_writes()
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep,
            save_interval_steps=self.every_steps,
            create=True,
            # A previous process killed mid-save leaves a tmp dir; it is never a restore candidate.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=self._async,
        )
        handlers = {"state": ocp.PyTreeCheckpointHandler(type_handler_registry=state_type_handlers()),
                    "data": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.local, options=options, item_handlers=handlers)

    def _report_interrupted_writes(self) -> None:
        """Names the temporary dirs of writes a killed run left (orbax removes them on open)."""
        if jax.process_index() != 0 or not os.path.isdir(self.local):
            return
        for name in sorted(os.listdir(self.local)):
            m = _TMP.match(name)
            if m:
                _warn(f"an interrupted write of checkpoint step {m.group(1)} ({os.path.join(self.local, name)}) "
                      "was never completed; it is removed and not used")

    def _report_uncommitted(self) -> None:
        committed = set(self.all_steps())
        for name in storage.listdir(self.directory):
            if name.isdigit() and int(name) not in committed:
                _warn(f"{storage.join(self.directory, name)} has no {COMMIT_MARKER} marker (an upload was "
                      "interrupted); it is ignored, and replaced if that step is saved again")

    # -- which steps exist ------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first (remote: those with a commit marker)."""
        if not self.remote:
            return sorted(self.manager.all_steps())
        return sorted(int(n) for n in storage.listdir(self.directory)
                      if n.isdigit() and storage.isfile(storage.join(self.directory, n, COMMIT_MARKER)))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """``step`` is on the save interval (orbax's own rule would also save the first step)."""
        return int(step) % self.every_steps == 0

    # -- saving -----------------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Saves if ``step`` is on the interval (or ``force``); returns whether it saved.

        The device-to-host copy completes before this returns (the write itself, and for a remote
        directory the upload, continue in the background), so the caller may donate ``state``'s
        buffers to the next step.

        Raises:
          CheckpointSaveError: this or an earlier background save/upload failed (disk full, ...).
        """
        step = int(step)
        self._finish_pending()  # orbax would wait here anyway; this names the step that failed
        if step in self.manager.all_steps() or (self.remote and step in self.all_steps()):
            return False  # already saved (e.g. the interval save of the final step)
        try:
            saved = self.manager.save(
                step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)),
                force=force)
        except Exception as e:  # noqa: BLE001 - a full disk, a read-only directory, ...
            raise self._save_failed(step, e) from e
        if saved:
            self._pending = step
            if self.remote:
                self._upload = threading.Thread(target=self._upload_step, args=(step,), name=f"upload-{step}",
                                                daemon=True)
                self._upload.start()
            if not self._async:
                self._finish_pending()
        return saved

    def _finish_pending(self) -> None:
        """Waits for the last save's background write (and upload); CheckpointSaveError if it failed."""
        if self._failed is not None:
            raise self._failed
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(self._pending, e) from e
        self._join_upload()

    def _upload_step(self, step: int) -> None:
        """Background: waits for orbax's write of ``step``, uploads it, commits, prunes old steps."""
        try:
            self.manager.wait_until_finished()
            remote = storage.join(self.directory, str(step))
            if storage.exists(remote):  # the debris of an interrupted upload of this step
                storage.rmtree(remote)
            storage.copy_dir_to(os.path.join(self.local, str(step)), remote)
            storage.write_json(storage.join(remote, COMMIT_MARKER), {"step": step, "time": time.time()})
            for old in self.all_steps()[:-self._keep]:
                self._delete_remote(old)
        except BaseException as e:  # noqa: BLE001 - reported by the next save() or wait()
            self._upload_error = (step, e)

    def _delete_remote(self, step: int) -> None:
        # Marker first: a deletion cut short leaves an uncommitted dir, never a partial "checkpoint".
        path = storage.join(self.directory, str(step))
        storage.remove(storage.join(path, COMMIT_MARKER))
        storage.rmtree(path)

    def _join_upload(self) -> None:
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._upload_error is not None:
            (step, e), self._upload_error = self._upload_error, None
            raise self._save_failed(step, e, upload=True) from e

    def _save_failed(self, step: int, e: BaseException, *, upload: bool = False) -> CheckpointSaveError:
        if isinstance(e, CheckpointSaveError):
            return e
        complete = [s for s in self.all_steps() if s != step]
        previous = (f"the newest complete checkpoint is step {complete[-1]} in {self.directory} (intact; a re-run "
                    "resumes from it)" if complete else f"there is no complete checkpoint in {self.directory}")
        cause = _summary(e)
        what = f"uploading checkpoint step {step} to" if upload else f"saving checkpoint step {step} in"
        hint = " Free some space, then re-run." if cause.startswith("No space left") else ""
        self._failed = CheckpointSaveError(f"{what} {self.directory if upload else self.local} failed ({cause}); "
                                           f"{previous}.{hint}")
        return self._failed

    def wait(self) -> None:
        """Blocks until background writes (and uploads) are finished (call before exiting).

        Raises:
          CheckpointSaveError: a background write or upload failed, unless that failure was
            already raised (by :meth:`save`): it is raised once.
        """
        if self._failed is None:
            self._finish_pending()

    def close(self) -> None:
        """Finishes pending writes and uploads, then releases orbax and the staging dir."""
        try:
            if self._failed is None:
                self._finish_pending()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the failed write, already raised as CheckpointSaveError
                if self._failed is None:
                    raise
            if self._own_staging:
                shutil.rmtree(self.local, ignore_errors=True)

    # -- restoring --------------------------------------------------------------------------------

    def _fetch(self, step: int) -> None:
        """Makes ``step`` readable from the local dir: for a remote directory, downloads the
        committed step into the staging dir (to a temporary name first, so a cut download is
        never mistaken for a checkpoint) and tells orbax about it."""
        if not self.remote or os.path.isdir(os.path.join(self.local, str(step))):
            return
        partial = os.path.join(self.local, f".download-{step}")
        shutil.rmtree(partial, ignore_errors=True)
        storage.copy_dir_from(storage.join(self.directory, str(step)), partial)
        os.remove(os.path.join(partial, COMMIT_MARKER))
        os.rename(partial, os.path.join(self.local, str(step)))
        self.manager.reload()

    def restore(self, step: int, abstract_state: Any, shardings: Any) -> tuple[Any, dict]:
        """Restores ``(state, data_state)`` at ``step`` directly into ``shardings``.

        Raises:
          FileNotFoundError: an item (``state`` or ``data``) of the step is missing (named).
        """
        self._fetch(step)
        for item in ITEMS:
            if not os.path.isdir(os.path.join(self.local, str(step), item)):
                raise FileNotFoundError(f"item {item!r} is missing ({os.path.join(self.local, str(step), item)})")
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
        )
        state = ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target))
        restored = self.manager.restore(
            int(step), args=ocp.args.Composite(state=state, data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def _quarantine(self, step: int) -> None:
        # Moved out of the manager's directory: a later save of the same step must not collide
        # with it, and it stays on disk for inspection.
        barrier(f"quarantine-{step}-start")
        if jax.process_index() == 0:
            aside = storage.join(self.directory.rstrip("/") + "_corrupt", f"{step}-{int(time.time())}")
            if self.remote:
                src = storage.join(self.directory, str(step))
                storage.remove(storage.join(src, COMMIT_MARKER))  # no longer a candidate, even if cut short
                fs, path = storage.filesystem(src)
                fs.copy(path, storage.filesystem(aside)[1], recursive=True)
                storage.rmtree(src)
                shutil.rmtree(os.path.join(self.local, str(step)), ignore_errors=True)
            else:
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                shutil.move(os.path.join(self.directory, str(step)), aside)
        barrier(f"quarantine-{step}-done")
        self.manager.close()
        self.manager = self._open()


def step_dirs(directory: str) -> list[int]:
    """Steps of the complete checkpoints in ``directory`` (step dirs holding a ``state`` item; on
    object storage, those with a commit marker), newest first; [] when there is none or no such
    directory."""
    if storage.is_remote(directory):
        return sorted((int(d) for d in storage.listdir(directory)
                       if d.isdigit() and storage.isfile(storage.join(directory, d, COMMIT_MARKER))), reverse=True)
    if not os.path.isdir(directory):
        return []
    return sorted((int(d) for d in os.listdir(directory)
                   if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state"))), reverse=True)


def find_step_dir(path: str) -> str:
    """The newest complete step directory under ``path`` (a workdir, a checkpoints dir or a step
    dir itself; local or a URL); raises FileNotFoundError naming what was searched."""
    path = storage.abspath(path)
    for candidate in (path, storage.join(path, "checkpoints")):
        if storage.isdir(storage.join(candidate, "state")):
            return candidate
        steps = step_dirs(candidate)
        if steps:
            return storage.join(candidate, str(steps[0]))
    raise FileNotFoundError(f"no checkpoint found at {path} (looked for a step dir with a 'state' item, "
                            "a checkpoints/ dir or a workdir)")


def _split_init_from(spec: str) -> tuple[str, str]:
    """``'PATH[:SUBTREES]'`` -> ``(PATH, SUBTREES)``; a URL's ``scheme://`` colon is not a separator."""
    scheme, rest = ("", spec)
    if storage.is_remote(spec):
        scheme, rest = spec.split("://", 1)
        scheme += "://"
    exists = storage.exists(spec) if scheme else os.path.exists(os.path.expanduser(spec))
    if ":" in rest and not exists:
        path, _, subtrees = rest.rpartition(":")
        return scheme + path, subtrees
    return spec, ""


def _read_state_item(step_dir: str) -> Any:
    """The ``state`` item of a step dir as numpy-backed arrays (a remote one is downloaded first)."""
    if not storage.is_remote(step_dir):
        return ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    with tempfile.TemporaryDirectory(prefix="contrastive_jax_init_from_") as tmp:
        storage.copy_dir_from(storage.join(step_dir, "state"), os.path.join(tmp, "state"))
        restored = ocp.StandardCheckpointer().restore(os.path.join(tmp, "state"))
        return jax.tree.map(np.asarray, restored)  # read fully before the download is deleted


def load_params_from(spec: str, abstract_params: Any, shardings: Any, *, into: str = "") -> tuple[Any, list[str]]:
    """Parameters for ``checkpoint.init_from = 'PATH[:SUBTREE[,SUBTREE...]]'``.

    Args:
      spec: PATH (see :func:`find_step_dir`), optionally ``:`` and comma-separated '/'-joined
        parameter path prefixes to take (e.g. ``image,image_proj``); none = every parameter.
      abstract_params: the new model's parameter shapes (the tree to fill).
      shardings: their shardings.
      into: '/'-joined prefix in the new model under which the checkpoint's parameters go
        (``'teacher'``: source ``image/...`` fills ``teacher/image/...``); '' = same paths.

    Returns:
      ``(params_or_None_tree, taken_paths)``: a tree shaped like ``abstract_params`` with loaded
      arrays where taken and None elsewhere, and the list of parameter paths taken.

    Raises:
      ValueError: a requested parameter is missing in the checkpoint or has another shape (all
        such paths listed).
    """
    from contrastive_jax.parallel.sharding import path_str

    path, subtrees = _split_init_from(spec)
    prefixes = [s.strip().strip("/") for s in subtrees.split(",") if s.strip()]
    step_dir = find_step_dir(path)
    restored = _read_state_item(step_dir)
    source = restored["params"] if isinstance(restored, dict) and "params" in restored else restored
    flat_src = {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(source)}

    def wanted(name: str) -> bool:
        return not prefixes or any(name == p or name.startswith(p + "/") for p in prefixes)

    problems, taken = [], []

    into_prefix = into.strip("/")

    def one(p, leaf, sharding):
        name = path_str(p)
        if into_prefix:
            if not name.startswith(into_prefix + "/"):
                return None
            name = name[len(into_prefix) + 1:]
        if not wanted(name):
            return None
        if name not in flat_src:
            problems.append(f"{name}: missing in {step_dir}")
            return None
        value = np.asarray(flat_src[name])
        if tuple(value.shape) != tuple(leaf.shape):
            problems.append(f"{name}: checkpoint shape {value.shape} != model shape {tuple(leaf.shape)}")
            return None
        taken.append(name)
        return jax.device_put(value.astype(leaf.dtype), sharding)

    loaded = jax.tree_util.tree_map_with_path(one, abstract_params, shardings)
    if prefixes and not taken and not problems:
        problems.append(f"no parameter matches {prefixes}; the model has e.g. {sorted(flat_src)[:5]}")
    if problems:
        raise ValueError(f"checkpoint.init_from={spec!r}:\n  " + "\n  ".join(problems))
    return loaded, taken
