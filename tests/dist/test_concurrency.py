"""Two writers, a pruner and a reader on one root at once, on local disk and on S3
(moto on 127.0.0.1): a save or prune is refused only with RootBusyError, every load
that returns holds its step's exact weights, nothing retention must keep is lost, and
a fresh manager's save leaves no debris.

One set of worker processes runs both roots, one after the other (starting them,
torch's import, is most of the time). ``tests/stress/concurrency_stress.py`` runs the
same workers for longer (``--storage both --seconds 60``).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "stress"))

from concurrency_stress import Config, Outcome, run_all  # noqa: E402

ROUNDS = {"local": 6, "s3": 2}  # writer sessions that saved a step, per writer


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[str, Outcome]:
    base = tmp_path_factory.mktemp("concurrency")
    cfgs = {"local": Config(root=str(base / "ckpt"), storage="local", rounds=ROUNDS["local"],
                            seed=0, timeout_s=120)}
    if importlib.util.find_spec("moto") and importlib.util.find_spec("s3fs"):
        from s3server import fresh_prefix

        url, options = request.getfixturevalue("s3")
        env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                          "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")}
        cfgs["s3"] = Config(root=fresh_prefix(url), storage="s3", options=options, env=env,
                            rounds=ROUNDS["s3"], pause_s=0.15, seed=0, timeout_s=120)
    outs = run_all(list(cfgs.values()), workdirs=[str(base / f"logs-{s}") for s in cfgs])
    return dict(zip(cfgs, outs))


def _check(out: Outcome) -> None:
    assert out.ok, "\n".join([out.summary, *out.failures])
    c = out.counts
    rounds = ROUNDS[out.storage]
    assert c["saves_A"] >= rounds and c["saves_B"] >= rounds, out.summary
    assert c["prunes"] + c["prune_busy"] >= 3, out.summary
    assert c["reads"] + c["raced"] >= 3, out.summary
    assert out.lost == [] and out.equal == len(out.committed) >= 2, out.summary
    assert out.summary.endswith(f"equal: {out.equal}/{out.equal} ; lost: 0"), out.summary


def test_two_writers_a_pruner_and_a_reader_on_local_disk(outcomes):
    _check(outcomes["local"])


def test_two_writers_a_pruner_and_a_reader_on_s3(outcomes):
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    _check(outcomes["s3"])
