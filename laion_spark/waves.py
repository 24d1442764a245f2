"""The wave runner: one loop for every stage (units -> waves -> one Spark job -> commit -> progress).

A stage supplies a `WaveStage` (its units, the DataFrame of one wave, its commit); this module owns
the batching and done-tracking rules so they live in one place:

* A wave is the cluster's task slots (executor cores / `spark.task.cpus`; GPUs for score) times
  `units_per_slot`, capped by `max_units_per_wave`: one task per unit, enough tasks to keep every
  slot busy while the slowest unit finishes, and a commit per wave (the resume granularity).
* Done-tracking: the `<stage>_units` table (one stats row per unit) is read ONCE per run
  (`Lake.done_units`). Per wave: an intent file names its units (`Lake.begin_wave`), the data
  commit carries the wave's Delta app id (`txn`, both backends), the unit rows are committed LAST
  with the same id, then the intent is dropped. A crash between the two commits is replayed first
  on the next run with the same wave id: the data commit is a no-op, the unit rows land, so nothing
  is lost or written twice. Nothing here reads commit history, so log cleanup forgets nothing.
* Progress: a start line, one line per wave (`download wave 3/12: 8 units, 41230 rows, 312 failed,
  37.2s, 1108 rows/s, eta 4m`), and Spark job descriptions naming the stage and wave. The summary
  comes from commit results and unit rows, never accumulators.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

from laion_spark.lake import Lake, wave_app_id

log = logging.getLogger(__name__)


@dataclass
class WaveStage:
    """What a stage gives the runner.

    `units()`: stable unit ids in plan order (strings). `rows(units)`: the DataFrame of one wave,
    one task per unit. `commit(lake, df, units, txn)`: commit the data with Delta app id `txn` and
    return `(unit_rows, committed_rows)`: a DataFrame with one stats row per unit (committed to
    `table` by the runner, last) and the data rows the commit added. `rows_column`/`failed_column`:
    the unit-row columns summed for the progress line and summary."""

    name: str
    table: str
    unit_column: str
    units: Callable[[], list[str]]
    rows: Callable[[list[str]], object]
    commit: Callable[[Lake, object, list[str], str], tuple]
    units_per_slot: float = 2.0
    rows_column: str = "n_rows"
    failed_column: Optional[str] = None
    sum_columns: tuple = ()
    slots: Optional[Callable[[object], int]] = None


@dataclass
class WavePlan:
    waves: list[tuple[str, list[str]]] = field(default_factory=list)  # (wave id, units)
    total_units: int = 0
    done_units: int = 0
    wave_size: int = 1
    slots: int = 1
    replayed: int = 0


def task_slots(spark) -> int:
    """Concurrent tasks the cluster runs: default parallelism (all executor cores) / task cpus."""
    sc = spark.sparkContext
    try:
        cpus = max(1, int(sc.getConf().get("spark.task.cpus", "1")))
    except ValueError:
        cpus = 1
    return max(1, sc.defaultParallelism // cpus)


def wave_size(slots: int, units_per_slot: float, max_units_per_wave: int) -> int:
    """Units per wave: slots × units_per_slot, at least 1, at most max_units_per_wave."""
    return max(1, min(max(1, int(max_units_per_wave)), int(math.ceil(slots * units_per_slot))))


def plan_waves(lake: Lake, stage: WaveStage, units: list[str], *, max_units_per_wave: int,
               slots: int) -> WavePlan:
    """Intents of a crashed run first (same wave ids), then the pending units in plan order."""
    units = list(dict.fromkeys(str(u) for u in units))
    done = lake.done_units(stage.table, stage.unit_column)
    size = wave_size(slots, stage.units_per_slot, max_units_per_wave)
    plan = WavePlan(total_units=len(units), wave_size=size, slots=slots)
    plan.done_units = sum(1 for u in units if u in done)
    taken: set[str] = set()
    for wave_id, wave_units in lake.open_waves(stage.name):
        still = [u for u in wave_units if u not in done]
        if not still:  # crashed after its unit rows: only the intent is left
            lake.end_wave(stage.name, wave_id)
            continue
        plan.waves.append((wave_id, still))
        taken.update(still)
        plan.replayed += 1
    pending = [u for u in units if u not in done and u not in taken]
    run_id = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    for i in range(0, len(pending), size):
        plan.waves.append((f"{run_id}-{i // size:06d}", pending[i:i + size]))
    return plan


def _eta(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def run_waves(spark, lake: Lake, stage: WaveStage, *, max_units_per_wave: int,
              max_waves: Optional[int] = None, units: Optional[list[str]] = None) -> dict:
    """Run every pending unit of `stage` in waves; return the summary (units, waves, rows, failed,
    per-column sums of the unit rows, seconds). `max_waves` stops early (a bounded run; the rest
    stays pending). `units` overrides `stage.units()` (already planned by the caller)."""
    started = time.time()
    all_units = [str(u) for u in (units if units is not None else stage.units())]
    slots = stage.slots(spark) if stage.slots else task_slots(spark)
    plan = plan_waves(lake, stage, all_units, max_units_per_wave=max_units_per_wave, slots=slots)
    waves = plan.waves if max_waves is None else plan.waves[:max_waves]
    n_pending = sum(len(u) for _, u in plan.waves)
    log.info("%s: %d units, %d done, %d waves × %d (%d replayed), %d slots", stage.name,
             plan.total_units, plan.done_units, len(plan.waves), plan.wave_size, plan.replayed, slots)
    summary: dict = {"units": plan.total_units, "units_skipped": plan.done_units, "units_done": 0,
                     "waves": 0, "waves_planned": len(plan.waves), "wave_size": plan.wave_size,
                     "slots": slots, "rows": 0, "failed": 0, "committed_rows": 0,
                     "data_commits_skipped": 0, "units_retryable": 0}
    for c in stage.sum_columns:
        summary[c] = 0
    sc = spark.sparkContext
    done_units = 0
    wave_seconds = 0.0
    try:
        for i, (wave_id, wave_units) in enumerate(waves, 1):
            t0 = time.time()
            txn = wave_app_id(stage.name, wave_id)
            desc = f"{stage.name} wave {i}/{len(plan.waves)}: {len(wave_units)} units"
            sc.setJobGroup(f"{stage.name}-wave-{wave_id}", desc)
            lake.begin_wave(stage.name, wave_id, wave_units)
            df = stage.rows(wave_units)
            unit_rows, committed = stage.commit(lake, df, wave_units, txn)
            if committed is None:
                summary["data_commits_skipped"] += 1
            else:
                summary["committed_rows"] += int(committed)
            lake.append(stage.table, unit_rows, stage=stage.name, txn=txn,
                        metadata={"stage": stage.name, "wave": wave_id})
            lake.end_wave(stage.name, wave_id)
            got = _wave_sums(lake, stage, wave_units)
            rows = got.get(stage.rows_column, 0)
            failed = got.get(stage.failed_column, 0) if stage.failed_column else 0
            summary["rows"] += rows
            summary["failed"] += failed
            for c in stage.sum_columns:
                summary[c] += got.get(c, 0)
            summary["waves"] += 1
            done_units += len(wave_units)
            # A unit with no row (e.g. a file whose reads kept failing) stays pending: retryable.
            summary["units_done"] += got["_units"]
            summary["units_retryable"] += len(wave_units) - got["_units"]
            dt_s = time.time() - t0
            wave_seconds += dt_s
            left = n_pending - done_units
            eta = wave_seconds / done_units * left if done_units else 0.0
            log.info("%s wave %d/%d: %d units, %d rows, %d failed, %.1fs, %.0f rows/s, eta %s",
                     stage.name, i, len(plan.waves), len(wave_units), rows, failed, dt_s,
                     rows / max(dt_s, 1e-9), _eta(eta))
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
        sc.setLocalProperty("spark.job.description", None)
    elapsed = time.time() - started
    summary["units_pending"] = n_pending - summary["units_done"]
    summary["seconds"] = round(elapsed, 2)
    summary["rows_per_s"] = round(summary["rows"] / max(elapsed, 1e-9), 1)
    return summary


def _wave_sums(lake: Lake, stage: WaveStage, units: list[str]) -> dict:
    """Sums of this wave's unit rows, read back with Arrow (no Spark job) from the files whose
    stats can hold these units: a handful of rows, whatever the table's size."""
    import pyarrow as pa
    import pyarrow.compute as pc

    typ = lake.arrow_schema(stage.table).field(stage.unit_column).type
    values = [int(u) for u in units] if pa.types.is_integer(typ) else list(units)
    cols = sorted({c for c in (stage.rows_column, stage.failed_column, *stage.sum_columns) if c})
    t = lake.read_arrow_where(stage.table, cols, {stage.unit_column: values})
    out = {c: int(pc.sum(t.column(c)).as_py() or 0) for c in cols}
    out["_units"] = t.num_rows
    return out
