"""The data stage's steps (refinery.datastage) on Ray: the same functions, spread over workers.

- map: Ray Data reads records.parquet on the workers and runs ``map_batch`` in a pool of actors
  (each loads the language-ID model and the eval n-gram index once), streaming, in record order;
- verification: one task per run of candidate pairs, with that run's texts;
- exact dedup, the LSH candidates with the greedy resolution (``refinery.dedup.near_resolve``: a
  record meets only the records kept before it, so candidates and resolution go together) and the
  write pass stay on the driver: they run over compact arrays, and resolving in record order there
  is what keeps the kept set the same as one process.

``data_engine.address`` names a running cluster (``ray://head:10001``); without it a local Ray
is started with ``data_engine.workers`` CPUs. Workers import refinery from the driver's checkout
(``py_modules``) and run numba single-threaded (one worker per CPU).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from refinery.config import Profile
from refinery.datastage import Mapped, MapFn, StageContext, StageOutput, map_batch, run_stage
from refinery.dedup import NormBatch, Shingling
from refinery.records import RECORD_SCHEMA

WORKER_ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def connect(profile: Profile) -> None:
    """ray.init for the profile: its cluster, or a local Ray of ``workers`` CPUs (idempotent)."""
    import ray

    if ray.is_initialized():
        return
    import refinery

    env = {"env_vars": WORKER_ENV, "py_modules": [str(Path(refinery.__file__).parent)]}
    cfg = profile.data_engine
    if cfg.address:
        ray.init(address=cfg.address, runtime_env=env, log_to_driver=False)
    else:
        # one CPU beyond the map actors: Ray Data's read tasks need one, else they wait forever
        ray.init(num_cpus=cfg.workers + 1, include_dashboard=False, log_to_driver=False, runtime_env=env,
                 configure_logging=False)


class _Mapper:
    """A Ray Data actor: one StageContext, ``map_batch`` per batch, the result pickled in one row."""

    def __init__(self, profile_json: str, eval_texts: dict[str, list[str]] | None):
        self.ctx = StageContext.build(Profile.model_validate_json(profile_json), eval_texts)

    def __call__(self, batch: pa.Table) -> pa.Table:
        m = map_batch(batch, self.ctx)
        m.norm = m.norm.utf8()  # travels as UTF-8 (1 byte a character in English), not code points
        return pa.table({"mapped": [pickle.dumps(m, protocol=5)]})


def ray_map(profile: Profile, records: Path, eval_texts: dict[str, list[str]] | None) -> MapFn:
    """A MapFn for run_stage: Ray Data reads ``records`` itself (the driver's batches are ignored)."""
    import ray

    def map_fn(_: Iterable[pa.RecordBatch]) -> Iterator[Mapped]:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the greedy resolution needs record order
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(records).metadata.num_rows
        blocks = max(profile.data_engine.workers, -(-rows // profile.data_engine.batch_records))
        # one block a batch: a single block would leave all but one map actor idle
        ds = ray.data.read_parquet(str(records), columns=RECORD_SCHEMA.names, override_num_blocks=blocks)
        ds = ds.map_batches(_Mapper, fn_constructor_args=(profile.model_dump_json(), eval_texts),
                            batch_size=profile.data_engine.batch_records, batch_format="pyarrow",
                            concurrency=profile.data_engine.workers, num_cpus=1)
        for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for payload in out.column("mapped").to_pylist():
                yield pickle.loads(payload)

    return map_fn


def _jaccard_task(shingling: Shingling, batch: NormBatch, pairs: np.ndarray) -> np.ndarray:
    return shingling.jaccard(batch, pairs)


def ray_verify(shingling: Shingling, workers: int):
    """verify_pairs' runs as tasks, at most ``workers`` in flight, results in order."""
    import ray

    task = ray.remote(num_cpus=1)(_jaccard_task)

    def map_runs(runs: Iterator[tuple[NormBatch, np.ndarray]]) -> Iterator[np.ndarray]:
        pending: list[Any] = []
        for batch, pairs in runs:
            pending.append(task.remote(shingling, batch, pairs))
            if len(pending) > workers:
                yield ray.get(pending.pop(0))
        for ref in pending:
            yield ray.get(ref)

    return map_runs


def run_stage_ray(records: Path, out_dir: Path, profile: Profile, *, eval_texts: dict[str, list[str]] | None = None,
                  existing: Path | None = None, log: Any = None) -> StageOutput:
    """run_stage with every per-batch and per-pair step on Ray (local or the profile's cluster)."""
    connect(profile)
    workers = profile.data_engine.workers
    return run_stage(records, out_dir, profile, map_fn=ray_map(profile, records, eval_texts), existing=existing,
                     spill_dir=Path(profile.resolve_path(profile.data_engine.spill_dir)) if profile.data_engine.spill_dir
                     else None,
                     map_runs=ray_verify(Shingling.from_config(profile.dedup), workers), log=log)
