"""Self-contained, atomically written checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and Python primitives (no pickled objects):

    format_version  int
    config          Config.to_dict(): the resolved run configuration
    tokenizer       Tokenizer.state_dict(): the SentencePiece model(s) as bytes
    model           model state_dict (unwrapped from DDP / torch.compile)
    # training checkpoints add:
    optimizer, scheduler, scaler, train_state (step, epoch, best metric, ...),
    sampler (TokenBatchSampler.state_dict(): the position in the epoch, the share of it done, and the
    world sizes of its earlier parts), rng (rank 0's python/numpy/torch/cuda states),
    rng_per_rank (every rank's, in rank order), world_size (the ranks that trained it),
    encoded_data (per split, a hash of the training and validation data: PreparedData.split_keys)
    # average_checkpoints() writes the first four and:
    averaged_from (the averaged files)

Everything needed to translate travels in the first four keys. A training run keeps its checkpoints
in ``RUN_DIR/checkpoints/``: ``latest.pt``, linked as ``step_N.pt`` (the last ``train.keep_last``) and
as ``best.pt`` (:func:`save_run_checkpoint`); :func:`find_resume_checkpoint` finds the one
``train.resume`` names.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import IO, Any

import torch

from nmt.config import Config, first_line
from nmt.files import sync_folder, temp_file_beside

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or of an unknown format, or could not be written."""

    no_space = False  # a write failed for want of space (full disk, quota, file size limit)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the old file intact."""
    path = Path(path)
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise CheckpointError(f"could not write {path}: {folder} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # no permission
        raise _write_error(path, e, state) from e
    tmp = _write_temp(state, path)
    try:
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # e.g. a folder of that name
            raise _write_error(path, e, state) from e
        raise
    sync_folder(path.parent)
    return path


def _write_temp(state: dict[str, Any], path: Path) -> Path:
    """Write ``state`` and the format version to a new temporary file beside ``path``, synced to disk.

    A write that fails (a full disk, a quota, a file size limit) raises :class:`CheckpointError` saying
    how much space the checkpoint needs and how much is free, and leaves no partial file behind.
    """
    try:
        fd, tmp = temp_file_beside(path, ".tmp")  # as readable to the run's group as the rest of the run
    except OSError as e:
        raise _write_error(path, e, state) from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        if _os_error(e) is None:  # not the file system's doing (a tensor that cannot be saved)
            raise
        raise _write_error(path, e, state) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _os_error(error: BaseException) -> OSError | None:
    """``error`` itself or the operating-system error it was raised while handling: torch.save reports
    a failed write ("[enforce fail at inline_container.cc:672] . unexpected pos ...") as a RuntimeError
    raised during the OSError of the write ("No space left on device")."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    return cause


def _write_error(path: Path, error: Exception, state: dict[str, Any]) -> CheckpointError:
    """The sentence for a checkpoint that could not be written: what failed, and for a full disk (or
    quota, or file size limit) the space needed and free; ``no_space`` is set on the error then."""
    cause = _os_error(error)
    if cause is not None and cause.strerror:
        reason = cause.strerror
    else:
        reason = first_line(error)
    if cause is None or cause.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return CheckpointError(f"could not write {path} ({reason})")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the checkpoints folder may not exist yet
        folder = folder.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB"
    except OSError:
        free = "unknown space"
    failure = CheckpointError(
        f"could not write {path}: the checkpoint needs about {_tensor_bytes(state) / 2**20:,.1f} MiB and "
        f"{free} is free there ({reason})"
    )
    failure.no_space = True
    return failure


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a nested dict / list / tuple (a checkpoint's size, near enough)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, bytes):
        return len(value)
    return 0


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The file a checkpoint argument names: itself, or a run folder's ``checkpoints/latest.pt`` (its
    newest step_N.pt where a save was cut short before latest.pt: :func:`run_checkpoint`)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        return run_checkpoint(folder) or folder / "latest.pt"
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) and check its format version."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(
            f"checkpoint {path} could not be read: {_read_failure(e)}.{_earlier(path)}"
        ) from e
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not an nmt checkpoint (it has no format_version entry).")
    version = state["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this nmt reads version {FORMAT_VERSION}."
        )
    for key in ("config", "tokenizer", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks the {key!r} entry; it is not an nmt checkpoint.")
    return state


def _read_failure(error: Exception) -> str:
    """Why torch.load failed, in words (not its advice to load with weights_only=False)."""
    text = str(error)
    damaged = "the file is damaged or incomplete (a truncated copy, or a write that was cut short)"
    if "Unsupported global" in text:
        why = "it holds Python objects, not only tensors and plain values: not an nmt checkpoint"
    elif isinstance(error, EOFError) or (isinstance(error, OSError) and error.errno == errno.EINVAL):
        why = damaged  # an empty file; torch's reader on a cut-off archive
    elif isinstance(error, OSError):
        why = text
    elif "zip archive" in text or "central directory" in text:
        why = damaged
    else:
        why = "it is not a PyTorch checkpoint file"
    return f"{why} ({type(error).__name__})"


def _earlier(path: Path) -> str:
    """Where ``path`` is a run's checkpoint (what train.resume=true takes) and unreadable: every name
    of that file (latest.pt is linked as the newest step_N.pt, maybe as best.pt), to move away, after
    which the newest earlier step_N.pt is the run's checkpoint."""
    folder = path.parent
    held = run_checkpoint(folder) if RUN_FILE.fullmatch(path.name) else None
    if held is None or not os.path.samefile(held, path):
        return ""
    names = [folder / "latest.pt", *step_checkpoints(folder), folder / "best.pt"]
    damaged = [p.name for p in names if p.exists() and os.path.samefile(p, path)]
    others = [p for p in step_checkpoints(folder) if p.name not in damaged]
    if not others:
        return ""
    return (
        f" {others[-1].name} beside it is the newest other checkpoint: to go on training from it, move "
        f"{' and '.join(damaged)} away and continue with train.resume=true."
    )


def config_from_checkpoint(state: dict[str, Any]) -> Config:
    config = dict(state["config"])
    # decode.nbest, which no decoding read (n-best lists are translate's --nbest), is no longer a key.
    config["decode"] = {k: v for k, v in config.get("decode", {}).items() if k != "nbest"}
    return Config.from_dict(config)


def model_differences(was: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, value in ``was``, value in ``now``) for each setting in which two configs (as
    :meth:`Config.to_dict` makes them) describe different models: every ``model.*`` key, the
    language pair and the SentencePiece settings (a resumed run keeps its checkpoint's tokenizer, so a
    new value would be recorded and not used). Weights of one cannot be resumed or averaged as the other's."""
    differences = []
    tokenizer = ("vocab_size", "joint_vocab", "spm_model_type", "character_coverage")
    for section, keys in (("model", None), ("data", ("src_lang", "tgt_lang", *tokenizer))):
        a, b = was.get(section, {}), now.get(section, {})
        for key in sorted(a.keys() | b.keys()) if keys is None else keys:
            if a.get(key) != b.get(key):
                differences.append((f"{section}.{key}", a.get(key), b.get(key)))
    return differences


def average_checkpoints(paths: list[str | os.PathLike]) -> dict[str, Any]:
    """Average model weights of several checkpoints of one run into a translate-ready checkpoint.

    The checkpoints must share model config, language pair, tokenizer and parameter shapes and dtypes.
    Floating-point tensors are averaged in float64 and cast back; integer buffers must agree.
    The result keeps the config of the last checkpoint and drops the training state.
    """
    if not paths:
        raise CheckpointError("no checkpoints to average.")
    total: dict[str, torch.Tensor] = {}
    first: dict[str, Any] = {}  # what every other checkpoint must match: config, tokenizer, parameters
    last_config: dict[str, Any] = {}
    for path in paths:
        state = load_checkpoint(path)
        weights = state["model"]
        if not first:
            first = {
                "config": state["config"],
                "tokenizer": state["tokenizer"],
                "params": {name: (tuple(t.shape), t.dtype) for name, t in weights.items()},
            }
        _check_same_model(first, paths[0], state, path)
        for name, tensor in weights.items():
            if not tensor.is_floating_point():
                if name in total and not torch.equal(total[name], tensor):
                    raise CheckpointError(
                        f"integer buffer {name} differs between {paths[0]} and {path}; "
                        "average checkpoints of one run."
                    )
                total[name] = tensor
            else:
                total[name] = total.get(name, 0) + tensor.double()
        last_config = state["config"]
    averaged = {
        name: (t / len(paths)).to(first["params"][name][1]) if t.is_floating_point() else t
        for name, t in total.items()
    }
    return {
        "config": last_config,
        "tokenizer": first["tokenizer"],
        "model": averaged,
        "averaged_from": [str(p) for p in paths],
    }


def _check_same_model(
    first: dict[str, Any], first_path: str | os.PathLike, state: dict[str, Any], path: str | os.PathLike
) -> None:
    """Refuse to average ``state`` (read from ``path``) with checkpoints unlike the first one."""
    differences = model_differences(first["config"], state["config"])
    if differences:
        differ = ", ".join(f"{key}={b!r} vs {a!r}" for key, a, b in differences)
        raise CheckpointError(
            f"{path} and {first_path} are different models ({differ}); average checkpoints of one run."
        )
    if state["tokenizer"] != first["tokenizer"]:
        raise CheckpointError(
            f"{path} and {first_path} have different tokenizers; average checkpoints of one run."
        )
    params = first["params"]
    if set(state["model"]) != set(params):
        raise CheckpointError(
            f"{path} has different parameters from {first_path}; average one run's checkpoints."
        )
    for name, tensor in state["model"].items():
        shape, dtype = params[name]
        if (tuple(tensor.shape), tensor.dtype) != (shape, dtype):
            raise CheckpointError(
                f"parameter {name} is {_describe(tuple(tensor.shape), tensor.dtype)} in {path} but "
                f"{_describe(shape, dtype)} in {first_path}; average checkpoints of one model."
            )


def _describe(shape: tuple[int, ...], dtype: torch.dtype) -> str:
    return f"{str(dtype).removeprefix('torch.')} {list(shape)}"


# The files a run writes into its checkpoints folder: latest.pt, best.pt and step_N.pt (N: 8+ digits).
RUN_FILE = re.compile(r"latest\.pt|best\.pt|step_(\d{8,})\.pt")


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """A run's numbered checkpoints (step_N.pt), oldest first; other files (step_avg.pt) are not."""
    found = [(int(m[1]), p) for p in ckpt_dir.glob("step_*.pt") if (m := RUN_FILE.fullmatch(p.name)) and m[1]]
    return [p for _, p in sorted(found)]


def last_checkpoints(run_dir: str | os.PathLike, n: int) -> list[Path]:
    """The ``n`` most recent numbered checkpoints (step_N.pt) of a run directory."""
    if n < 1:
        raise CheckpointError(f"asked for the last {n} checkpoints of {run_dir}; ask for at least 1.")
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir} does not exist (give the run directory: run_dir of the training).")
    found = step_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    if not found:
        raise CheckpointError(f"no step_*.pt checkpoints in {ckpt_dir} (train.keep_last must be > 0).")
    if len(found) < n:
        log.warning("asked to average %d checkpoints but %s holds only %d", n, ckpt_dir, len(found))
    return found[-n:]


def save_run_checkpoint(state: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int, best: bool) -> Path:
    """Write a training run's checkpoint as ``ckpt_dir/latest.pt`` and under its other names:
    ``step_N.pt`` (only the ``keep_last`` newest are kept; none when it is 0) and, if ``best``,
    ``best.pt``. A link is a hard link where the file system allows, else a copy.

    latest.pt is what a run resumes from, so it is replaced last: the state is written once to a
    temporary file, linked under the other names, and only then renamed onto latest.pt. A crash at
    any point leaves latest.pt the old or the new checkpoint, and best.pt never older than the best
    step latest.pt records (the temporary file of the crash is removed by the next save).
    """
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest.pt"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(ckpt_dir)
    except OSError as e:  # the first save on a full disk: the folder itself cannot be made
        raise _write_error(latest, e, state) from e
    tmp = _write_temp(state, latest)
    try:
        if keep_last > 0:
            _link(tmp, ckpt_dir / f"step_{step:08d}.pt")
            for old in step_checkpoints(ckpt_dir)[:-keep_last]:
                old.unlink(missing_ok=True)
        if best:
            _link(tmp, ckpt_dir / "best.pt")
        os.replace(tmp, latest)
    except OSError as e:  # a link that had to be a copy, on a full disk
        tmp.unlink(missing_ok=True)
        raise _write_error(latest, e, state) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(ckpt_dir)  # the new names survive a power loss, not only the data behind them
    return latest


# The temporary files save_run_checkpoint creates: ``.latest.pt.XXXXXXXX.tmp`` (_write_temp, mkstemp)
# and ``.step_N.pt.tmp`` / ``.best.pt.tmp`` (_link).
_RUN_TEMP_FILE = re.compile(r"\.(latest|best|step_\d+)\.pt(\.[A-Za-z0-9_]+)?\.tmp")


def _remove_stale_temp_files(ckpt_dir: Path) -> None:
    """Delete the temporary files of saves that were killed, each as large as a checkpoint.

    Only one process writes a run's checkpoints, so when it starts a save, any such file is an orphan.
    """
    for path in ckpt_dir.iterdir():
        if _RUN_TEMP_FILE.fullmatch(path.name) and path.is_file():
            log.info("removing %s, left by an interrupted save", path)
            path.unlink(missing_ok=True)


def restore_best_link(ckpt_dir: Path, resumed: Path, step: int, best_step: int) -> Path | None:
    """Link best.pt again where it is missing (moved away with a damaged latest.pt) and the run's
    checkpoint of its best step is at hand: the one resumed, or its step_N.pt. Returns best.pt if linked."""
    best = ckpt_dir / "best.pt"
    source = resumed if best_step == step else ckpt_dir / f"step_{best_step:08d}.pt"
    if best.exists() or not source.is_file() or source.resolve().parent != ckpt_dir.resolve():
        return None
    _link(source, best)
    return best


def _link(src: Path, dst: Path) -> None:
    """Point ``dst`` at ``src``'s current contents atomically (hard link; copy where links fail)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as copy:  # on disk before its name is: as durable as latest.pt
                os.fsync(copy.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, dst)


def lock_run_dir(run_dir: Path) -> IO[str] | None:
    """Hold ``run_dir`` for this process until the returned file is closed (or the process ends).

    A second training into the same folder (a command run twice, a scheduler's retry while the first
    still runs) would write its checkpoints over the first one's and remove its temporary files mid-save.
    An advisory lock (``flock``) on ``run_dir/.lock``, which names its holder; where the file system has no
    such locks, or the platform none at all, nothing is held.
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None
    try:
        f = open(run_dir / ".lock", "a+", encoding="utf-8")
    except OSError:  # an unwritable run_dir is reported where it is written
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise CheckpointError(
            f"{run_dir} is in use by another training ({holder}); wait for it to end, or train into "
            "another run_dir."
        ) from None
    except OSError:  # no locks here (some network file systems)
        return f
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def run_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint a run in ``ckpt_dir`` continues from: latest.pt, or where that is missing, the
    newest step_N.pt (a first save killed between linking step_N.pt and writing latest.pt leaves
    only that); None when the folder holds neither."""
    latest = ckpt_dir / "latest.pt"
    if latest.exists():
        return latest
    steps = step_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    return steps[-1] if steps else None


def find_resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """Which checkpoint ``train.resume`` names, or None for a fresh run (refusing to overwrite one).

    A checkpoint named by path resumes into ``run_dir`` only if that holds no run yet or the path is
    its latest.pt: otherwise the run there (another one, or newer steps of the same one) would be
    overwritten, or its step_N.pt files mixed with those of the new branch.
    """
    latest = run_dir / "checkpoints" / "latest.pt"
    held = run_checkpoint(run_dir / "checkpoints")
    if not cfg.train.resume_requested:
        if held is not None:
            raise CheckpointError(
                f"{run_dir} already holds a run (checkpoints/{held.name}). Continue it with train.resume=true, "
                "or start a new one elsewhere with run_dir=PATH (or name=NEW_NAME)."
            )
        return None
    if cfg.train.resume_latest:
        if held is None:
            raise CheckpointError(
                f"train.resume={cfg.train.resume.lower()} but {latest} does not exist: the run never saved a "
                "checkpoint there. Start it without train.resume (or check run_dir/name)."
            )
        if held != latest:
            log.warning(
                "%s is missing (a save was cut short, or it was deleted); resuming from %s", latest, held
            )
        return held
    path = checkpoint_file(cfg.train.resume)
    if not path.is_file():
        raise CheckpointError(f"train.resume={cfg.train.resume}: no checkpoint at {path}.")
    # Step files are hard links of latest.pt, so the latest step's step_N.pt is the same file. (Where a
    # first save was cut short before latest.pt, the run's newest step_N.pt stands in for it.)
    if held is not None and not os.path.samefile(path, held):
        ours = path.resolve().parent == held.resolve().parent
        what = (
            "not the latest checkpoint of the run in"
            if ours
            else "a checkpoint of another run than the one in"
        )
        raise CheckpointError(
            f"train.resume={cfg.train.resume} is {what} {run_dir}: resuming "
            "it there would overwrite that run's checkpoints or mix them with a new branch. Resume into a "
            f"new directory with run_dir=NEW train.resume={cfg.train.resume}, or continue the run in "
            f"{run_dir} with train.resume=true."
        )
    return path
