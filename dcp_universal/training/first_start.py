"""A job's first start: a root with no committed step loads nothing, or, with
``init_from``, the model from any format :func:`~dcp_universal.load_model` reads and what
maps beside it (:mod:`~dcp_universal.training.migrate`: optimizer state, an LR
scheduler, the step number)."""

from __future__ import annotations

import logging

from dcp_universal import _comm
from dcp_universal.model.plan import LoadReport, Staged
from dcp_universal.model.view import ModelView
from dcp_universal.model_io.load import stage_model
from dcp_universal.storage import normalize, storage_for
from dcp_universal.training import migrate
from dcp_universal.training.options import LoadRequest

__all__ = ["first_start"]

logger = logging.getLogger(__name__)


def first_start(root: str, req: LoadRequest, init_from: str | None,
                storage_options: dict | None, *, trusted: bool) -> LoadReport | None:
    """Collective. Nothing (None) without ``init_from``; else its model and what maps
    beside it, installed only once every read succeeded; the report says what was
    carried and what was left behind."""
    if init_from is None:
        if _comm.rank() == 0:
            logger.info("no committed step under %s: nothing loaded (a first start)", root)
        return None
    path = normalize(init_from)
    store = storage_for(path, storage_options)
    view = ModelView.of(req.model)
    staged = stage_model(view, path, strict=req.strict, verify=req.verify, stage=True,
                         store=store, trusted=trusted)
    carried = migrate.find(store, path, staged.facts.get("source_meta") or {}, trusted=trusted)
    staged = Staged.combine([staged, migrate.stage(
        view, req.optimizer, req.extra, carried, fresh=set(staged.report.fresh),
        layout=staged.facts.get("layout") or {}, hyperparams=req.hyperparams,
        trusted=trusted)])
    staged.commit()
    staged.report.notes.append(f"no committed step under {root}: the model starts from {path}")
    return staged.report
