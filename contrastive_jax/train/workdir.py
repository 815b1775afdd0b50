"""What keeps a workdir safe: one trainer at a time (a lock), and one run per workdir (a fingerprint).

Files this module owns in a workdir:

- ``trainer.lock``: JSON ``{pid, host, started, proc_start, token}`` of the live trainer (process 0
  of a multi-process run), created with ``O_CREAT | O_EXCL`` so two trainers cannot both take it,
  refreshed every :data:`HEARTBEAT_S` seconds and removed on exit. A lock is *stale* (taken over
  with one warning) when its process is gone: on this host, its pid is dead or belongs to another
  process now; from another host, it has not been refreshed for :data:`STALE_AFTER_S` seconds.
- ``fingerprint.json``: the config fields that make a workdir's checkpoints what they are (model
  architecture, loss, dataset, tokenizer, input sizes; :func:`fingerprint`). A later run whose
  config changes one of them is refused before any expensive work (:func:`check_fingerprint`);
  training-only fields (learning rate, steps, batch size, intervals) may change freely.

A checkpoint whose arrays do not match the model being built is a *mismatch*
(:func:`describe_state_mismatch`), never "corrupt": nothing is moved. Only an explicit
``config.checkpoint.on_mismatch='restart'`` moves a run aside (:func:`move_run_aside`) into
``WORKDIR/previous/<UTC time>/`` (nothing is deleted) so a new run can start at step 0.

Workdirs on object storage (``s3://``, ``gs://``) go through :mod:`contrastive_jax.storage`; an
object store has no exclusive create, so there the lock is checked then written (a narrow race a
scheduler never hits: it does not start two copies of a job within milliseconds).
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Iterable

from contrastive_jax import storage

log = logging.getLogger("contrastive_jax")

LOCK_NAME = "trainer.lock"
FINGERPRINT_NAME = "fingerprint.json"
PREVIOUS_DIR = "previous"
HEARTBEAT_S = 60.0  # the lock's owner rewrites its time this often
STALE_AFTER_S = 600.0  # a lock of another host not refreshed for this long is a dead trainer's
ON_MISMATCH = ("error", "restart")

# Config fields that define what a workdir's checkpoints are. Prefixes: every field below them.
# (Optimizer-state layout changes, e.g. optim.freeze or optim.ema_decay, are caught by comparing
# the checkpoint's arrays with the model's instead: describe_state_mismatch.)
FINGERPRINT_FIELDS = ("model", "loss.name", "data.name", "data.image_size", "data.max_text_len", "data.tokenizer",
                      "data.num_train", "data.dataset_seed", "data.sources", "data.stream_lanes", "data.shuffle_buffer",
                      "data.resample")
# Fields that say which data only for the built-in generated dataset (elsewhere they are unused).
_SHAPES_ONLY = ("data.num_train", "data.dataset_seed")
# Fields that say which data only for streamed sources (data.name == 'sources').
_SOURCES_ONLY = ("data.sources", "data.stream_lanes", "data.shuffle_buffer", "data.resample")

# What a run writes at the workdir's top level (moved aside together by move_run_aside).
RUN_FILES = ("checkpoints", "checkpoints_corrupt", "config.json", "tokenizer.json", "metrics.jsonl", "summary.json",
             "tensorboard", "report", "eval_details.npz", "profile", FINGERPRINT_NAME, "eval.json")


class WorkdirError(Exception):
    """A workdir that cannot be used as asked; the message is one line for the user (exit 2)."""


class UnresumableError(WorkdirError):
    """The workdir's checkpoints cannot continue this config (mismatch, or none readable);
    ``config.checkpoint.on_mismatch='restart'`` moves them aside instead."""


def _restart_hint(workdir: str) -> str:
    return (f"use a new --workdir (add --config.checkpoint.init_from={workdir}[:SUBTREE] to start from this run's "
            "weights), "
            f"or pass --config.checkpoint.on_mismatch=restart to move the earlier run to "
            f"{storage.join(workdir, PREVIOUS_DIR)}/<time>/ and start at step 0")


# --- Lock ------------------------------------------------------------------------------------

def _proc_start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux /proc), to tell a live holder
    from an unrelated process that reuses its pid; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            # Field 22; the command name (field 2) may hold spaces, so split after its ')'.
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, proc_start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    now = _proc_start_ticks(pid)
    return proc_start is None or now is None or now == proc_start


def _is_writable_error(e: OSError) -> bool:
    return e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


class WorkdirLock:
    """The workdir's ``trainer.lock``: :meth:`acquire` or :class:`WorkdirError`; :meth:`release`.

    While held, a daemon thread refreshes the lock every :data:`HEARTBEAT_S` seconds so another
    host can tell a live trainer from a dead one.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = storage.join(workdir, LOCK_NAME)
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start_ticks(os.getpid()),
                     "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock; a stale one is taken over with one warning line on stderr.

        Raises:
          WorkdirError: another live trainer holds it (names its pid and host), or the workdir is
            not writable.
        """
        for _ in range(3):  # a stale lock moved aside, then a retry; a lost race, then one more
            if self._create():
                self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
                self._thread.start()
                return
            holder = self._read_holder()
            if holder is None:
                continue  # vanished between our create and read: try again
            reason = self._stale_reason(holder)
            if reason is None:
                raise WorkdirError(
                    f"workdir {self.workdir} is in use by another trainer: pid {holder.get('pid')} on host "
                    f"{holder.get('host')}, started {holder.get('started')} ({self.path}); stop that run first "
                    f"(if it is gone, remove {self.path})")
            if self._take_over(holder):
                message = (f"WARNING: taking over the stale lock of pid {holder.get('pid')} on host "
                           f"{holder.get('host')} ({reason}) in {self.workdir}")
                log.warning(message)
                print(message, file=sys.stderr, flush=True)
        raise WorkdirError(f"cannot take the lock {self.path}: another trainer keeps taking it")

    def _create(self) -> bool:
        payload = json.dumps(self.info)
        if storage.is_remote(self.path):
            if storage.exists(self.path):
                return False
            storage.write_text(self.path, payload)
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            if _is_writable_error(e):
                raise WorkdirError(f"workdir {self.workdir} is not writable ({e.strerror}): choose a writable "
                                   "--workdir (checkpoints, metrics and the summary go there)") from None
            raise
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(payload)
        return True

    def _read_holder(self) -> dict | None:
        try:
            text = storage.read_text(self.path)
            mtime = self._mtime()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            if not isinstance(holder, dict):
                raise ValueError
        except ValueError:
            # Written by a trainer killed between create and write (a live writer fills it within
            # microseconds): stale once it is a few seconds old.
            holder = {"pid": "?", "host": "?", "garbled": True}
        holder["_mtime"] = mtime
        return holder

    def _mtime(self) -> float:
        if storage.is_remote(self.path):
            fs, p = storage.filesystem(self.path)
            try:
                return fs.modified(p).timestamp()
            except (NotImplementedError, AttributeError):
                return time.time()
        return os.path.getmtime(self.path)

    def _stale_reason(self, holder: dict) -> str | None:
        age = time.time() - float(holder.get("_mtime") or time.time())
        if holder.get("garbled"):
            return "an unreadable lock file" if age > 5 else None
        if holder.get("host") == self.info["host"]:
            pid = holder.get("pid")
            if not isinstance(pid, int) or not _pid_alive(pid, holder.get("proc_start")):
                return "that process is gone"
            return None
        if age > STALE_AFTER_S:
            return f"not refreshed for {age / 60:.0f} minutes"
        return None

    def _take_over(self, holder: dict) -> bool:
        """Removes the stale lock if it is still the one judged stale; False if another trainer
        took it over first."""
        if storage.is_remote(self.path):
            storage.remove(self.path)
            return True
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)  # atomic: of two trainers taking over, one rename wins
        except FileNotFoundError:
            return False
        try:
            with open(aside, encoding="utf-8") as fh:
                same = bool(holder.get("garbled")) or json.loads(fh.read()).get("token") == holder.get("token")
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:  # a live trainer's fresh lock: put it back
            os.rename(aside, self.path)
            return False
        os.remove(aside)
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if storage.is_remote(self.path):
                    storage.write_text(self.path, json.dumps(self.info))
                else:
                    os.utime(self.path)
            except OSError:  # a transient storage error must not kill the run
                pass

    def release(self) -> None:
        """Removes the lock if it is still this trainer's (never another's)."""
        self._stop.set()
        try:
            if json.loads(storage.read_text(self.path)).get("token") == self.info["token"]:
                storage.remove(self.path)
        except (OSError, ValueError):
            pass


# --- Fingerprint -----------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """JSON-comparable form (tuples -> lists, ConfigDicts -> dicts)."""
    return json.loads(json.dumps(value, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o)))


def _flatten(prefix: str, value: Any, out: dict) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            _flatten(f"{prefix}.{k}", value[k], out)
    else:
        out[prefix] = value


def fingerprint(config: Any) -> dict[str, Any]:
    """``{dotted field: JSON value}`` of the :data:`FINGERPRINT_FIELDS` present in ``config``."""
    plain = _plain(config.to_dict() if hasattr(config, "to_dict") else config)
    out: dict[str, Any] = {}
    for name in FINGERPRINT_FIELDS:
        node, found = plain, True
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                found = False
                break
            node = node[part]
        if found:
            _flatten(name, node, out)
    for only, dataset in ((_SHAPES_ONLY, "shapes"), (_SOURCES_ONLY, "sources")):
        if out.get("data.name", "shapes") != dataset:
            for name in only:
                out.pop(name, None)
    return out


def has_history(workdir: str) -> bool:
    """Whether ``workdir`` holds something of an earlier run that a new one could clobber or mix
    with (a checkpoint step directory, metrics, a summary)."""
    ckpt = storage.join(workdir, "checkpoints")
    if storage.isdir(ckpt) and any(name.isdigit() for name in storage.listdir(ckpt)):
        return True
    return any(storage.exists(storage.join(workdir, f)) for f in ("metrics.jsonl", "summary.json"))


def _stored_fingerprint(workdir: str) -> dict | None:
    path = storage.join(workdir, FINGERPRINT_NAME)
    if storage.isfile(path):
        return storage.read_json(path).get("fields", {})
    if storage.isfile(storage.join(workdir, "config.json")):
        # A workdir written before fingerprints existed: its config.json says the same.
        try:
            return fingerprint(json.loads(storage.read_text(storage.join(workdir, "config.json"))))
        except ValueError:
            return None
    return None


def check_fingerprint(workdir: str, config: Any) -> None:
    """Refuses (UnresumableError, one line naming each changed field with both values) a config that
    changes what the earlier run in ``workdir`` is; fields missing on either side are not compared
    (a newer schema may add fields). A workdir without history is never refused."""
    if not has_history(workdir):
        return
    before = _stored_fingerprint(workdir)
    if before is None:
        return
    now = fingerprint(config)
    changed = [f"{k}={before[k]!r} there, {now[k]!r} now" for k in sorted(set(before) & set(now)) if before[k] != now[k]]
    if changed:
        raise UnresumableError(f"workdir {workdir} holds a run of another model/dataset ({'; '.join(changed)}): resume with "
                           f"the earlier values, or {_restart_hint(workdir)}")


def write_fingerprint(workdir: str, config: Any) -> None:
    """Records the run's fingerprint. One that belongs to checkpoints or metrics is never
    rewritten (the run that wrote them defines the workdir); one left by a run that died before
    writing either is replaced."""
    path = storage.join(workdir, FINGERPRINT_NAME)
    if storage.isfile(path) and has_history(workdir):
        return
    storage.write_json(path, {"fields": fingerprint(config),
                              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "note": "what this workdir's checkpoints are; see docs/training.md (Workdir safety)"})


def check_tokenizer(workdir: str, tokenizer: Any) -> bytes:
    """The serialized ``tokenizer``; UnresumableError if the workdir's run trained with another one
    (its ``tokenizer.json`` differs) and holds history."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "tokenizer.json")
        tokenizer.save(local)
        with open(local, "rb") as fh:
            blob = fh.read()
    path = storage.join(workdir, "tokenizer.json")
    if has_history(workdir) and storage.isfile(path):
        with storage.open(path, "rb") as fh:
            old = fh.read()
        if hashlib.sha256(old).digest() != hashlib.sha256(blob).digest():
            raise UnresumableError(f"the tokenizer built from this config differs from the one the run in {workdir} "
                               f"trained with ({path}): check config.data.tokenizer and the dataset, or "
                               f"{_restart_hint(workdir)}")
    return blob


def move_run_aside(workdir: str) -> str | None:
    """Moves the earlier run's files (:data:`RUN_FILES`) to ``WORKDIR/previous/<UTC time>/``
    (nothing is deleted); returns that directory, or None when there was nothing to move."""
    present = [name for name in RUN_FILES if storage.exists(storage.join(workdir, name))]
    if not present:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = storage.join(workdir, PREVIOUS_DIR, stamp)
    storage.makedirs(dest)
    for name in present:
        src = storage.join(workdir, name)
        if storage.is_remote(src):
            fs, p = storage.filesystem(src)
            fs.mv(p, storage.filesystem(storage.join(dest, name))[1], recursive=True)
        else:
            os.rename(src, os.path.join(dest, name))
    return dest


# --- Checkpoint vs model ---------------------------------------------------------------------

def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes(tree: Any) -> dict[str, tuple]:
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            out["/".join(_key_name(k) for k in path)] = tuple(int(d) for d in shape)
    return out


def describe_state_mismatch(saved: Any, expected: Any) -> str | None:
    """How a checkpoint's array tree (``saved``: its metadata, leaves with ``.shape``) differs
    from the state this config builds (``expected``); None when every array matches by path and
    shape. One line: counts and the first few paths of each kind."""
    a, b = _shapes(saved), _shapes(expected)
    only_saved = sorted(set(a) - set(b))
    only_model = sorted(set(b) - set(a))
    reshaped = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    if not (only_saved or only_model or reshaped):
        return None

    def few(names: Iterable[str], fmt=lambda k: k) -> str:
        names = list(names)
        return ", ".join(fmt(k) for k in names[:3]) + (", ..." if len(names) > 3 else "")

    parts = []
    if reshaped:
        parts.append(f"{len(reshaped)} with another shape ({few(reshaped, lambda k: f'{k}: {a[k]} there, {b[k]} now')})")
    if only_saved:
        parts.append(f"{len(only_saved)} only in the checkpoint ({few(only_saved)})")
    if only_model:
        parts.append(f"{len(only_model)} only in this config's model ({few(only_model)})")
    return "; ".join(parts)


def mismatch_error(workdir: str, step: int, difference: str) -> UnresumableError:
    return UnresumableError(f"the checkpoint at step {step} in {workdir} does not match this config's model/optimizer "
                        f"state (not corrupt, left as it is): {difference}; resume with the config in "
                        f"{storage.join(workdir, 'config.json')}, or {_restart_hint(workdir)}")


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _saved_tree(ckpt: Any, step: int) -> Any:
    """The array metadata (shapes) of a checkpoint's ``state`` item, or None when it cannot be
    read (then the restore itself decides: a checkpoint without readable metadata is corrupt)."""
    import orbax.checkpoint as ocp

    try:
        fetch = getattr(ckpt, "_fetch", None)  # remote workdirs: download the step first
        if fetch is not None:
            fetch(step)
        path = os.path.join(getattr(ckpt, "local", ckpt.directory), str(step), "state")
        meta = ocp.StandardCheckpointer().metadata(path)
        return getattr(getattr(meta, "item_metadata", None), "tree", None)
    except Exception:  # noqa: BLE001 - unreadable metadata: the restore will say why
        return None


def _all_finite(state: Any) -> bool:
    import jax
    import jax.numpy as jnp
    import numpy as np

    leaves = [x for x in jax.tree.leaves(getattr(state, "params", state))
              if np.issubdtype(np.dtype(x.dtype), np.floating)]
    return not leaves or bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in xs])))(leaves))


def resume(ckpt: Any, workdir: str, state: Any, shardings: Any) -> tuple[int, Any, dict] | None:
    """``(step, state, data_state)`` of the newest checkpoint of ``ckpt`` that restores into
    ``state``'s structure, or None when there is no checkpoint at all.

    Newer checkpoints that fail to read (truncated, missing item, NaN parameters) are moved to
    ``checkpoints_corrupt/`` with ONE warning line in all, since an older good one exists.

    Raises:
      UnresumableError: a checkpoint's arrays differ from ``state``'s (a mismatch: nothing is
        moved), or no checkpoint is readable (each step and its reason listed; nothing is moved).
    """
    import jax

    from contrastive_jax.parallel.distributed import any_process

    steps = sorted(ckpt.all_steps(), reverse=True)
    failures: list[tuple[int, str]] = []
    for step in steps:
        saved = _saved_tree(ckpt, step)
        difference = None if saved is None else describe_state_mismatch(saved, state)
        if difference:
            raise mismatch_error(workdir, step, difference)
        error = None
        try:
            restored, data_state = ckpt.restore(step, state, shardings)
            jax.block_until_ready(restored)
            if not _all_finite(restored):
                error = "the parameters contain NaN/inf"
        except Exception as e:  # noqa: BLE001 - any failure to read means "not a good checkpoint"
            error = _reason(e)
        # Every process must take the same step (a damaged shard may be read by one process only).
        if any_process(error is not None):
            failures.append((step, error or "unreadable on another process"))
            continue
        if failures:
            _set_aside(ckpt, failures, step)
        return step, restored, data_state
    if failures:
        listing = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise UnresumableError(
            f"no readable checkpoint in {ckpt.directory} (nothing was moved or deleted): {listing}. Repair or "
            f"remove them to continue, or {_restart_hint(workdir)}")
    return None


def _set_aside(ckpt: Any, failures: list[tuple[int, str]], good: int) -> None:
    """Moves the unreadable checkpoints newer than ``good`` out of the way (a later save of the
    same step must not collide with them) and says so in one line."""
    import jax

    what = "; ".join(f"step {s}: {r}" for s, r in failures)
    message = (f"WARNING: resuming from step {good}: the newer checkpoint{'s' if len(failures) > 1 else ''} in "
               f"{ckpt.directory} could not be read ({what}) and {'were' if len(failures) > 1 else 'was'} moved to "
               f"{ckpt.directory.rstrip('/')}_corrupt/")
    log.debug(message)
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
    for step, _ in failures:
        ckpt._quarantine(step)  # checkpoint.py's mover (barriers, remote-aware)
