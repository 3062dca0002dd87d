"""Checkpoints and run folders: plain-data files, sealed with a SHA-256, one writer at a time.

A checkpoint is a ``torch.save`` of a dict holding only tensors and plain values (dict, list,
tuple, str, int, float, bool, None): the weights, the config and feature spec as dicts, the
step counters, and in ``latest.pt`` the optimizer states and RNG states. It is read with
``torch.load(..., weights_only=True)``, so a file that carries any other pickled object (which
an ordinary unpickler would construct, running whatever code it names) is refused unread.

Each checkpoint is sealed: ``sha256`` is the SHA-256 of every tensor in it (each tensor's path
in the dict, dtype, shape and raw bytes, in sorted key order), written with the file and
checked on every load, so a flipped byte in any weight or optimizer moment is detected rather
than scored. Checkpoints of esmm 0.1 and 0.2 carry no digest; they hold plain data only, load
unverified and say so in a warning.

A run folder (``esmm train --out RUN``) is written by one process at a time: ``RUN/.lock`` is
held with ``fcntl.flock`` for the whole run. The kernel drops the lock when its process exits,
however it exits, so a killed run never blocks the next one. See :func:`prepare_run` for what
happens to a folder left by a killed run.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import logging
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from esmm.config import Config, config_from_dict
from esmm.errors import ConfigError, EsmmError, UsageError
from esmm.features import FeatureSpec
from esmm.fsio import atomic_write, prepare_dir_output
from esmm.models import MultiTaskModel, build_model

log = logging.getLogger(__name__)

FORMAT = 1
FORMAT_KEY = "checkpoint_format"
DIGEST_KEY = "sha256"
LOCK_NAME = ".lock"


# ----------------------------------------------------------------------------- sealing


def tensors_digest(obj: Any) -> str:
    """SHA-256 (hex) of every tensor inside nested dicts, lists and tuples.

    Each tensor contributes its path (``/model/towers.0.weight``), dtype, shape and raw
    bytes; dict entries are visited in sorted key order, so the digest does not depend on
    insertion order or on the device the tensors were on. Non-tensor values do not count.
    """
    h = hashlib.sha256()
    _feed(h, "", obj)
    return h.hexdigest()


def _feed(h: Any, path: str, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous()
        h.update(f"{path}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            _feed(h, f"{path}/{k}", obj[k])
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _feed(h, f"{path}[{i}]", v)


def seal(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with the checkpoint format and the digest of its tensors added."""
    body = {k: v for k, v in payload.items() if k not in (DIGEST_KEY, FORMAT_KEY)}
    body[FORMAT_KEY] = FORMAT
    body[DIGEST_KEY] = tensors_digest(body)
    return body


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`esmm.fsio.atomic_write`: a crash never leaves half a file."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Seal ``payload`` (plain values and tensors only) and write it atomically."""
    save_atomic(seal(payload), path)


# ----------------------------------------------------------------------------- loading


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check its digest.

    Raises:
        EsmmError: the file is missing, unreadable, holds a non-plain object (refused without
        constructing it) or its tensors do not match its digest.
    """
    p = Path(path)
    if not p.is_file():
        raise EsmmError(f"checkpoint {p} does not exist")
    if p.stat().st_size == 0:
        raise EsmmError(f"checkpoint {p} is empty (0 bytes); it is not a complete esmm "
                        "checkpoint")
    try:
        with warnings.catch_warnings():
            # torch warns (two lines on stderr) about a plain pickle's protocol before refusing
            # or reading it; the outcome is reported below in one line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ck = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise EsmmError(_refusal(p, e)) from None
    except Exception as e:  # noqa: BLE001 - any failure to read means a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        first = first.split(". ")[0]  # torch's advice after the first sentence is for torch
        raise EsmmError(f"checkpoint {p} cannot be read ({type(e).__name__}: {first}); "
                        "it is not a complete esmm checkpoint") from None
    if not isinstance(ck, dict):
        raise EsmmError(f"checkpoint {p} holds a {type(ck).__name__}, not an esmm checkpoint "
                        "(a dict of weights and settings)")
    verify(ck, p)
    return ck


def verify(ck: dict[str, Any], path: Path) -> None:
    """Check the digest of a loaded checkpoint (legacy checkpoints without one: a warning)."""
    want = ck.get(DIGEST_KEY)
    if want is None:
        if FORMAT_KEY in ck:
            raise EsmmError(f"checkpoint {path} has lost its {DIGEST_KEY!r} entry; the file was "
                            "altered, its weights cannot be trusted")
        log.warning("checkpoint %s carries no weights digest (written by esmm %s); loaded "
                    "unverified", path, ck.get("version", "0.2.0 or earlier"))
        return
    got = tensors_digest({k: v for k, v in ck.items() if k != DIGEST_KEY})
    if got != want:
        raise EsmmError(f"checkpoint {path} is corrupt: the SHA-256 of its tensors is "
                        f"{got[:16]}..., it was written as {str(want)[:16]}...; use another "
                        "checkpoint of the run (best.pt or latest.pt) or retrain")


def _refusal(path: Path, err: Exception) -> str:
    op = re.search(r"Unsupported operand (\d+)", str(err))
    if op:
        # An opcode the safe loader does not take: random bytes, another pickle protocol or
        # format; nothing says what it would do, only that it is not what esmm writes.
        return (f"checkpoint {path} is refused: it is not a checkpoint esmm writes (its pickle "
                f"uses opcode {op.group(1)}, which the safe loader does not accept), so it is "
                "damaged or another kind of file; nothing in it was run; retrain or use a "
                "checkpoint from a trusted copy of the run")
    m = re.search(r"GLOBAL (\S+)", str(err))
    what = f"a reference to {m.group(1)}" if m else "an object that is not plain data"
    version = _peek_version(path)
    who = (f"it says it was written by esmm {version}, but no esmm version writes such "
           "objects, so the file was altered" if version else
           "esmm never writes such objects, so it is not an esmm checkpoint or was altered")
    return (f"checkpoint {path} is refused: it holds {what}, which loading would run; {who}; "
            "retrain or use a checkpoint from a trusted copy of the run")


def _peek_version(path: Path) -> str | None:
    """The ``version`` string a checkpoint's pickle names, read without unpickling it.

    Walks the opcodes (``pickletools.genops`` only parses) and returns the first string that
    directly follows the string ``"version"``, resolving memo references to strings.
    """
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            data = z.read(name)
        memo: dict[int, Any] = {}
        prev: Any = None
        for op, arg, _ in pickletools.genops(data):
            if op.name == "MEMOIZE":
                memo[len(memo)] = prev
                continue
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = prev
                continue
            if op.name in ("GET", "BINGET", "LONG_BINGET"):
                value = memo.get(arg)
            else:
                value = arg if isinstance(arg, str) and "UNICODE" in op.name else None
            if prev == "version" and isinstance(value, str):
                return value
            prev = value
    except Exception:  # noqa: BLE001 - only a hint for the message
        return None
    return None


def find_checkpoint(run: str | Path, which: str = "best") -> Path:
    """The checkpoint of a run directory (``best``, falling back to ``latest``), or a file."""
    p = Path(run)
    if p.is_file():
        return p
    if not p.exists():
        raise UsageError(f"{p}: no such run directory or checkpoint file; pass the --out "
                         "folder of `esmm train`")
    for name in (which, "latest"):
        c = p / "checkpoints" / f"{name}.pt"
        if c.is_file():
            return c
    raise UsageError(f"{p}: not a run directory (no checkpoints/{which}.pt); "
                     "pass the --out folder of `esmm train`")


def load_weights(model: nn.Module, state: Any, source: Path | str) -> None:
    """``model.load_state_dict(state)``, with a one-line error naming a missing, unexpected
    or wrongly shaped weight."""
    if not isinstance(state, Mapping):
        raise EsmmError(f"checkpoint {source}: 'model' holds a {type(state).__name__}, "
                        "not a dict of weights")
    own = model.state_dict()
    for k, v in state.items():
        if k in own and (not isinstance(v, torch.Tensor) or v.shape != own[k].shape):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise EsmmError(f"checkpoint {source}: weight {k!r} has shape {got}, the model "
                            f"its config builds expects {tuple(own[k].shape)}")
    try:
        res = model.load_state_dict(dict(state), strict=False)
    except (RuntimeError, KeyError) as e:
        line = next((s.strip() for s in str(e).splitlines() if s.strip()), type(e).__name__)
        raise EsmmError(f"checkpoint {source}: its weights do not fit the model its config "
                        f"builds ({line})") from None
    if res.missing_keys:
        more = len(res.missing_keys) - 1
        raise EsmmError(f"checkpoint {source}: weight {res.missing_keys[0]!r} is missing"
                        + (f" (and {more} more)" if more else "") + "; the file is incomplete")
    if res.unexpected_keys:
        more = len(res.unexpected_keys) - 1
        raise EsmmError(f"checkpoint {source}: weight {res.unexpected_keys[0]!r}"
                        + (f" (and {more} more)" if more else "") + " is not in the model its "
                        "config builds")


def checkpoint_entry(ck: Mapping[str, Any], key: str, source: Path | str) -> Any:
    """``ck[key]``, or a one-line error naming the missing key."""
    if key not in ck:
        raise EsmmError(f"checkpoint {source} has no {key!r} entry; it is not a complete esmm "
                        "checkpoint")
    return ck[key]


def load_model(run: str | Path, which: str = "best"
               ) -> tuple[MultiTaskModel, Config, FeatureSpec, dict[str, Any]]:
    """Rebuild a trained model from a run directory or checkpoint file (eval mode).

    Returns:
        (model, config, feature spec, the checkpoint dict).
    """
    path = find_checkpoint(run, which)
    ck = load_checkpoint(path)
    cfg = config_from_dict(checkpoint_entry(ck, "config", path), source=f"checkpoint {path}")
    raw_spec = checkpoint_entry(ck, "feature_spec", path)
    try:
        spec = FeatureSpec.from_dict(raw_spec)
    except (KeyError, TypeError, ValueError) as e:
        raise EsmmError(f"checkpoint {path}: its 'feature_spec' is malformed ({e})") from None
    model = build_model(cfg, spec)
    load_weights(model, checkpoint_entry(ck, "model", path), path)
    model.eval()
    return model, cfg, spec, ck


# ----------------------------------------------------------------------------- run folders


@contextlib.contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Hold ``RUN/.lock`` (``fcntl.flock``, exclusive) for the duration; refuse a held one.

    The lock lives on the open file, not its name: the file stays behind after a run, and a
    leftover from a dead process is simply locked again.
    """
    prepare_dir_output(run, "--out")
    fd = os.open(run / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            raise EsmmError(f"{run} is in use: another training (process {holder}) holds "
                            f"{run / LOCK_NAME}; wait for it to end or choose another "
                            "--out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# The files a training writes in RUN and RUN/checkpoints: their temporaries (esmm.fsio's
# ".NAME.XXXXXXXX.tmp", and "NAME.tmp" as esmm 0.2 named them) are removed, nothing else.
_RUN_OUTPUTS = ("config.yaml", "history.csv", "metrics.json", "latest.pt", "best.pt")


def _remove_temporaries(folder: Path) -> None:
    """Delete temporary files left by a write that was interrupted (the lock is held)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        name = p.name
        ours = any(name == f"{o}.tmp" or (name.startswith(f".{o}.") and name.endswith(".tmp"))
                   for o in _RUN_OUTPUTS)
        if ours and p.is_file():
            log.info("removing %s, left by an interrupted write", p)
            p.unlink()


def _normalized(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config as this version writes it (new keys at their defaults, old spellings
    read), so a run written by an earlier version compares equal to the same config now."""
    try:
        return config_from_dict(dict(tree), "the run's config").to_dict()
    except ConfigError:
        return dict(tree)


def _config_differs(old: Mapping[str, Any], new: Mapping[str, Any], what: str) -> None:
    old, new = _normalized(old), _normalized(new)
    if old != new:
        diff = [k for k in {**old, **new} if old.get(k) != new.get(k)]
        raise ConfigError(f"--resume: the config differs from the run's ({what}) in "
                          f"section(s) {diff}; resume with the same config (see RUN/config.yaml)")


def prepare_run(run: Path, resume: bool, config: dict[str, Any]) -> tuple[dict | None, bool]:
    """Decide how a training starts in ``run`` (the lock is held).

    * ``checkpoints/latest.pt`` exists: ``resume`` continues from it (same config); without
      ``resume`` the folder is refused.
    * no ``latest.pt`` but the folder holds a run (``config.yaml``): the run was stopped before
      its first resumable checkpoint. It is started again from step 0, with or without
      ``resume`` (with ``resume`` the config must match), replacing its partial outputs.
    * ``metrics.json`` without ``latest.pt``: a finished run whose checkpoints were deleted;
      refused.
    * an empty or new folder: a new run; ``resume`` is refused (nothing to resume).

    Temporary files left by interrupted writes are removed first.

    Returns:
        (the checkpoint to resume from or None, whether earlier partial outputs are replaced).
    """
    ck_dir = run / "checkpoints"
    latest = ck_dir / "latest.pt"
    _remove_temporaries(run)
    _remove_temporaries(ck_dir)
    if latest.is_file():
        if not resume:
            raise UsageError(f"{run} already holds a run (checkpoints/latest.pt); pass --resume "
                             "to continue it or choose another --out")
        state = load_checkpoint(latest)
        _config_differs(checkpoint_entry(state, "config", latest), config, str(latest))
        return state, False
    if (run / "metrics.json").is_file():
        raise UsageError(f"{run} holds a finished run (metrics.json) without checkpoints; "
                         "choose another --out")
    # train creates checkpoints/ before it writes config.yaml: both mark a run folder.
    started = (run / "config.yaml").is_file() and ck_dir.is_dir()
    if not started and ck_dir.is_dir() and any(ck_dir.iterdir()):
        raise UsageError(f"{run} already holds checkpoints but no config.yaml; choose "
                         "another --out")
    if not started:
        if resume:
            raise UsageError(f"--resume: {latest} does not exist; nothing to resume")
        return None, False
    if resume:
        _config_differs(_read_yaml(run / "config.yaml"), config, "config.yaml")
    log.info("%s: no checkpoints/latest.pt: the run was stopped before its first resumable "
             "checkpoint; starting it again from step 0%s", run,
             "" if resume else " (pass --resume to make this explicit)")
    for p in (ck_dir / "best.pt", run / "history.csv"):
        p.unlink(missing_ok=True)
    return None, True


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--resume: {path} cannot be read ({type(e).__name__}); restart "
                          "without --resume") from None
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------- history


def write_history(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows as CSV (columns in first-seen order), replacing ``path`` atomically."""
    names: list[str] = []
    for r in rows:
        names += [k for k in r if k not in names]
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        w.writerows(rows)


def read_history(path: Path, upto_step: int) -> list[dict[str, Any]]:
    """The rows of ``path`` up to ``upto_step`` (the ones a resumed run keeps)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= upto_step]
