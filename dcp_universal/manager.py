"""CheckpointManager: numbered steps under one root, retention, training state.

Concurrency contract: one training job (all of its ranks) writes a root at a time; any
number of readers may load committed steps meanwhile.

A step is committed when rank 0 has written its ``manifest.json``, after every rank
finished writing every piece; ``steps()`` and ``latest_step()`` see committed steps only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import random
import time
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

import dcp_universal
from dcp_universal import _comm, model_io, optim_io, retention, storage
from dcp_universal.errors import CheckpointError, NotACheckpointError
from dcp_universal.plan import LoadReport

__all__ = ["CheckpointManager", "StepAlreadyExistsError", "PerRankStateError"]

logger = logging.getLogger(__name__)

_EXTRA = "train/extra/"
_RANK = "train/rank-"


class StepAlreadyExistsError(CheckpointError, ValueError):
    """``save(step)`` found that step already committed (pass ``overwrite=True``)."""


class PerRankStateError(CheckpointError):
    """Per-rank training state cannot follow a change of world size."""


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_of(obj) -> Any:
    return dict(obj) if isinstance(obj, dict) else obj.state_dict()


def _load_into(obj, state) -> None:
    if isinstance(obj, dict):
        obj.clear()
        obj.update(state)
    else:
        obj.load_state_dict(state)


@dataclasses.dataclass(kw_only=True)
class _Options:
    """CheckpointManager's settings.

    Attributes:
        keep_last: keep this many newest committed steps whole.
        keep_every: archive steps divisible by this: they keep their model and lose
            their optimizer state (steps no policy keeps are deleted).
        keep_best: keep this many steps with the best ``best_metric`` whole.
        best_metric / best_mode: the ``save(metrics=...)`` key ranking ``keep_best``, and
            whether lower ("min") or higher ("max") is better.
        With no policy every step is kept. Retention runs after a commit and never
        removes the newest step or a base a remaining step uses.
        merge: how merged ``model/`` directories are written: "sharded" or "rank0".
        merged_every: in LoRA runs, also write the merged ``model/`` every this many
            steps (None: only when ``save(..., merged=True)``). Runs without adapters
            always write ``model/``.
        storage_options: fsspec options for remote roots (e.g. ``endpoint_url``).
    """

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"
    merge: str = "sharded"
    merged_every: int | None = None
    storage_options: dict | None = None

    def __post_init__(self) -> None:
        if self.keep_best is not None and not self.best_metric:
            raise ValueError("keep_best needs best_metric, the save(metrics=...) key to rank by")
        self.policies()  # validates the numbers
        if self.merge not in model_io.MERGE_MODES:
            raise ValueError(f"merge={self.merge!r}: expected one of {model_io.MERGE_MODES}")
        if self.merged_every is not None and self.merged_every < 1:
            raise ValueError(f"merged_every={self.merged_every}: must be >= 1")

    def policies(self) -> list:
        out: list = []
        if self.keep_last is not None:
            out.append(retention.KeepLast(self.keep_last))
        if self.keep_every is not None:
            out.append(retention.KeepEvery(self.keep_every))
        if self.keep_best is not None:
            out.append(retention.KeepBest(self.keep_best, self.best_metric, self.best_mode))
        return out


class CheckpointManager:
    """Numbered training checkpoints under ``root``.

    >>> mgr = CheckpointManager("runs/ckpt", keep_last=3)
    >>> mgr.save(100, model, optimizer, extra={"lr_scheduler": sched, "train": counters})
    >>> report = mgr.load(model, optimizer, extra={"lr_scheduler": sched, "train": counters})

    ``save`` and ``load`` are collective: call them on every rank.
    """

    def __init__(self, root: str, *, keep_last: int | None = None, merge: str = "sharded",
                 storage_options: dict | None = None, merged_every: int | None = None,
                 keep_every: int | None = None, keep_best: int | None = None,
                 best_metric: str | None = None, best_mode: str = "min") -> None:
        self.root = root.rstrip("/")
        self.options = _Options(keep_last=keep_last, merge=merge, merged_every=merged_every,
                                storage_options=storage_options, keep_every=keep_every,
                                keep_best=keep_best, best_metric=best_metric, best_mode=best_mode)
        self._base_cache: tuple[tuple, str] | None = None
        self._store = storage.Storage(storage_options)

    # ---- listing ----------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        return self._store.list_steps(self.root)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def step_path(self, step: int) -> str:
        return storage.step_dir(self.root, step)

    def manifest(self, step: int) -> dict[str, Any]:
        return self._store.read_manifest(self.step_path(step))

    # ---- saving -----------------------------------------------------------------------

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
             extra: dict | None = None, merged: bool | None = None, overwrite: bool = False,
             metrics: dict[str, float] | None = None) -> str:
        """Write and commit step ``step``; returns its directory.

        Args:
            extra: objects with ``state_dict()``/``load_state_dict()`` (or plain dicts)
                saved with the training state. Objects that differ across ranks are
                saved per rank.
            merged: LoRA runs: also write the merged ``model/`` (default: the manager's
                ``merged_every`` policy).
            overwrite: replace an already committed ``step``.
            metrics: numbers recorded in the manifest (``keep_best`` ranks by one).

        Raises:
            StepAlreadyExistsError: ``step`` is committed and ``overwrite`` is False.
        """
        start = time.perf_counter()
        path = self.step_path(step)
        self._prepare(step, path, overwrite)
        view = model_io.ModelView.of(model)
        manifest: dict[str, Any] = {
            "format_version": storage.FORMAT_VERSION, "step": step, "world_size": _comm.world_size(),
            "torch_version": torch.__version__, "library_version": dcp_universal.__version__,
            "created_unix": time.time(), "merge": self.options.merge,
            "dtypes": sorted({str(t.dtype) for t in view.tensors.values()}),
            "mesh": _mesh_of(view),
            "items": {}, "adapters": None, "base": None,
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        }
        files: dict[str, tuple[int, int]] = {}  # this rank's files: (size, crc32)

        def wrote(item: str, written: dict) -> None:
            files.update({f"{item}/{name}": v for name, v in written.items()})
            manifest["items"][item] = True

        base_files = {}
        if view.sites:
            if merged is None:
                every = self.options.merged_every
                merged = every is not None and step % every == 0
            manifest["adapters"] = view.adapter_manifest()
            manifest["base"], base_files = self._save_base(view)
            trainable = {k: v for k, v in view.tensors.items() if k not in view.frozen}
            wrote(storage.ADAPTERS_DIR, model_io.save_tensors(
                {**trainable, **view.adapter_tensors}, storage.join(path, storage.ADAPTERS_DIR),
                self._store))
        if not view.sites or merged:
            wrote(storage.MODEL_DIR, model_io._save_model(
                model, storage.join(path, storage.MODEL_DIR), self.options.merge, self._store))
        train_state, per_rank = self._training_state(optimizer, model, extra)
        wrote(storage.OPTIMIZER_DIR, model_io.save_tensors(
            train_state, storage.join(path, storage.OPTIMIZER_DIR), self._store))
        manifest["items"]["optimizer"] = optimizer is not None
        manifest["training_state"] = {"extra": sorted(extra or {}), "per_rank": per_rank}
        files = _gather_files(files)
        error = None
        if _comm.rank() == 0:  # every rank's data is written: commit
            manifest["files"] = files
            if manifest["base"]:
                manifest["base_files"] = base_files
            try:
                self._store.write_manifest(path, manifest)
            except Exception as e:  # told to every rank below, so none reports success
                error = f"{type(e).__name__}: {e}"
        error = _comm.agree(error)
        if error:
            raise CheckpointError(f"step {step} was written but its commit failed ({error}); "
                                  f"it is not committed and the next save removes it")
        if _comm.rank() == 0:
            self.prune()
        _comm.barrier()
        if _comm.rank() == 0:
            size = sum(f["size"] for f in manifest["files"].values())
            logger.info("saved step %d (%.1f MB) in %.2f s", step, size / 1e6, time.perf_counter() - start)
        return path

    def _prepare(self, step: int, path: str, overwrite: bool) -> None:
        error = None
        if _comm.rank() == 0:
            if self._store.exists(storage.join(path, storage.MANIFEST)) and not overwrite:
                error = (f"step {step} is already committed at {path}; pass overwrite=True to "
                         "replace it, or save under another step number")
            else:
                self._store.remove_step(path)  # an overwritten step, or debris of a crashed save
                for debris in self._store.list_steps(self.root, committed=False):
                    self._store.remove_tree(self.step_path(debris))
                for base in self._store.list_bases(self.root):  # bases a crash left unfinished
                    if not self._store.exists(storage.join(self.root, base, storage.BASE_FILES)):
                        self._store.remove_tree(storage.join(self.root, base))
        error = _comm.agree(error)
        if error:
            raise StepAlreadyExistsError(error)

    def _save_base(self, view: model_io.ModelView) -> tuple[str, dict]:
        """Write the frozen weights once per content; return the base directory's name and
        its file records. A base is complete once its ``files.json`` exists (written
        last, with every rank's file sizes and CRC-32); an incomplete one is rewritten."""
        frozen = {k: view.tensors[k] for k in sorted(view.frozen)}
        signature = _signature(frozen)
        if _comm.all_true(self._base_cache is not None and self._base_cache[0] == signature):
            fp = self._base_cache[1]
        else:
            fp = model_io.fingerprint(frozen)
        name = f"base-{fp}"
        base = storage.join(self.root, name)
        marker = storage.join(base, storage.BASE_FILES)
        records = None
        if _comm.rank() == 0 and self._store.exists(marker):
            records = json.loads(self._store.read_bytes(marker))
        records = _comm.agree(records)
        if records is None:
            records = _gather_files(model_io.save_tensors(frozen, base, self._store))
            error = None
            if _comm.rank() == 0:
                try:
                    self._store.write_atomic(marker, json.dumps(records, sort_keys=True).encode())
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"
            if _comm.agree(error):
                raise CheckpointError(f"writing {marker} failed: {error}; nothing was committed")
        self._base_cache = (signature, fp)
        return name, records

    def _training_state(self, optimizer, model, extra) -> tuple[dict[str, Any], list[str]]:
        state: dict[str, Any] = {}
        if optimizer is not None:
            state.update(optim_io.optimizer_state(model, optimizer))
        rank = _comm.rank()
        state[f"{_RANK}{rank}/rng"] = pickle.dumps(_rng_state())
        per_rank = ["rng"]
        for name, obj in sorted((extra or {}).items()):
            blob = pickle.dumps(_state_of(obj))
            if _comm.is_distributed():
                blobs = [None] * _comm.world_size()
                dist.all_gather_object(blobs, blob)
                same = all(b == blobs[0] for b in blobs)
            else:
                same = True
            if same:
                state[f"{_EXTRA}{name}"] = blob
            else:
                state[f"{_RANK}{rank}/{name}"] = blob
                per_rank.append(name)
        return state, per_rank

    def prune(self, *, dry_run: bool = False) -> retention.Decision:
        """Apply the retention policies now (``save`` does after every commit; call on
        one process only). Returns what was (or, with ``dry_run``, would be) done."""
        manifests = {s: self.manifest(s) for s in self.steps()}
        decision = retention.decide(self.options.policies(), manifests,
                                    self._store.list_bases(self.root))
        if not dry_run:
            retention.apply(decision, self.root, self._store, manifests)
        return decision

    # ---- loading ----------------------------------------------------------------------

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
             step: int | None = None, strict: bool = True, extra: dict | None = None,
             hyperparams: str = "checkpoint", skip_per_rank: Iterable[str] = (),
             verify: bool = False) -> LoadReport:
        """Load step ``step`` (default: the latest committed) into any configuration.

        Args:
            optimizer: restored by canonical parameter name (see ``LoadReport``).
            extra: the same names as at save; each object gets its ``load_state_dict``.
            hyperparams: ``"checkpoint"`` or ``"current"`` (lr, betas, ... of the
                optimizer, when its param groups match the checkpoint's).
            skip_per_rank: per-rank state ("rng", or an ``extra`` name saved per rank)
                to leave as it is when the world size differs from the save's. Without
                it such a load raises :class:`PerRankStateError` before touching
                anything. An extra object may instead define
                ``load_resharded_state_dicts(states: list)``, called with every saved
                rank's state.

            verify: also check every file's CRC-32 (sizes are always checked).

        RNG state is restored (per rank) when an optimizer or ``extra`` is given.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise NotACheckpointError(f"no committed step under {self.root}")
        elif step not in self.steps():
            raise CheckpointError(
                f"step={step} is not a committed step under {self.root}; committed: {self.steps()}")
        path = self.step_path(step)
        manifest = self._store.read_manifest(path)
        training = optimizer is not None or bool(extra)
        skip = set(skip_per_rank)
        if training:
            self._check_per_rank(manifest, extra or {}, skip)
            self._store.check_files(path, manifest["files"], checksums=verify,
                                    prefixes=(f"{storage.OPTIMIZER_DIR}/",))
        if optimizer is not None and not manifest["items"].get("optimizer"):
            raise CheckpointError(f"step {step} was saved without an optimizer; load it with optimizer=None")
        # Read everything first, install after: a failure halfway leaves the job untouched.
        report, commit_model = model_io.stage_model(model, path, strict=strict, verify=verify,
                                                    stage=True, store=self._store)
        opt_dir = storage.join(path, storage.OPTIMIZER_DIR)
        commits = [commit_model]
        if optimizer is not None:
            commits.append(optim_io.stage_optimizer(model, optimizer, opt_dir, report=report,
                                                    hyperparams=hyperparams, store=self._store))
        if training:
            commits.append(self._stage_training_state(manifest, opt_dir, extra or {}, skip, report))
        for commit in commits:
            commit()
        base = manifest.get("base")
        if base and any("restored base" in n for n in report.notes):
            view = model_io.ModelView.of(model)
            frozen = {k: view.tensors[k] for k in sorted(view.frozen)}
            self._base_cache = (_signature(frozen), base.removeprefix("base-"))
        return report

    def verify(self, step: int | None = None) -> dict[str, int]:
        """Check every file of ``step`` (default: latest) and of its base: size and CRC-32.

        Returns ``{"files": n, "bytes": total}``; raises :class:`IntegrityError` naming
        the first bad file.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise NotACheckpointError(f"no committed step under {self.root}")
        path = self.step_path(step)
        manifest = self._store.read_manifest(path)
        self._store.check_files(path, manifest["files"], checksums=True)
        records = list(manifest["files"].values())
        if manifest.get("base"):
            self._store.check_files(storage.join(self.root, manifest["base"]),
                                    manifest.get("base_files", {}), checksums=True)
            records += list(manifest.get("base_files", {}).values())
        return {"files": len(records), "bytes": sum(r["size"] for r in records)}

    def _check_per_rank(self, manifest, extra, skip) -> None:
        saved_world = manifest["world_size"]
        if saved_world == _comm.world_size():
            return
        missing = [name for name in manifest["training_state"]["per_rank"]
                   if name not in skip
                   and not hasattr(extra.get(name), "load_resharded_state_dicts")
                   and (name == "rng" or name in extra)]
        if missing:
            raise PerRankStateError(
                f"step {manifest['step']} was saved by {saved_world} ranks and is loaded by "
                f"{_comm.world_size()}; its per-rank state {missing} has no resharding rule. Pass "
                f"skip_per_rank={missing!r} to keep this job's current values, or give the "
                "object a load_resharded_state_dicts(states) method. Nothing was loaded.")

    def _stage_training_state(self, manifest, opt_dir, extra, skip, report):
        saved_world = manifest["world_size"]
        per_rank = set(manifest["training_state"]["per_rank"])
        same_world = saved_world == _comm.world_size()
        rank = _comm.rank()
        wanted: dict[str, Any] = {}
        for name in sorted(extra):
            if name not in manifest["training_state"]["extra"]:
                raise CheckpointError(
                    f"extra[{name!r}] is not in step {manifest['step']}; it holds "
                    f"{manifest['training_state']['extra']}")
            if name not in per_rank:
                wanted[f"{_EXTRA}{name}"] = b""
            elif same_world:
                wanted[f"{_RANK}{rank}/{name}"] = b""
            elif name not in skip:  # resharding rule: every saved rank's state
                wanted.update({f"{_RANK}{r}/{name}": b"" for r in range(saved_world)})
        if same_world:
            wanted[f"{_RANK}{rank}/rng"] = b""
        self._store.load_state(wanted, opt_dir)
        return lambda: self._install_training_state(manifest, wanted, extra, skip, report)

    def _install_training_state(self, manifest, wanted, extra, skip, report) -> None:
        saved_world = manifest["world_size"]
        per_rank = set(manifest["training_state"]["per_rank"])
        same_world = saved_world == _comm.world_size()
        rank = _comm.rank()
        for name, obj in sorted(extra.items()):
            if name not in per_rank:
                _load_into(obj, pickle.loads(wanted[f"{_EXTRA}{name}"]))
            elif same_world:
                _load_into(obj, pickle.loads(wanted[f"{_RANK}{rank}/{name}"]))
            elif name in skip:
                report.notes.append(f"per-rank state {name!r} kept as is (world size "
                                    f"{saved_world} -> {_comm.world_size()})")
            else:
                obj.load_resharded_state_dicts(
                    [pickle.loads(wanted[f"{_RANK}{r}/{name}"]) for r in range(saved_world)])
                report.notes.append(f"per-rank state {name!r} resharded from {saved_world} ranks")
        if same_world:
            _set_rng_state(pickle.loads(wanted[f"{_RANK}{rank}/rng"]))
        else:
            report.notes.append(f"RNG state kept as is (world size {saved_world} -> {_comm.world_size()})")


def _gather_files(files: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """Every rank's ``{file: (size, crc32)}``, merged, as manifest records (collective)."""
    parts = [files]
    if _comm.is_distributed():
        parts = [None] * _comm.world_size()
        dist.all_gather_object(parts, files)
    return {name: {"size": size, "crc32": crc}
            for part in parts for name, (size, crc) in sorted(part.items())}


def _signature(tensors: dict[str, torch.Tensor]) -> tuple:
    """Identifies the frozen tensors' current contents without reading them: the same
    storage with an unchanged version counter (bumped by every in-place write, and shared
    by the detached views state_dict() returns) holds the same bytes."""
    out = []
    for key, t in tensors.items():
        local = t.to_local() if hasattr(t, "to_local") else t
        out.append((key, local.untyped_storage().data_ptr(), local.storage_offset(), local._version))
    return tuple(out)


def _mesh_of(view: model_io.ModelView) -> dict | None:
    for t in view.tensors.values():
        if hasattr(t, "device_mesh"):
            return {"shape": list(t.device_mesh.shape), "placements": [str(p) for p in t.placements]}
    return None
