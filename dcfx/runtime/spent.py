"""What a generation ran (`DeepCacheUNet.spent`): its graph runs, priced by `dcfx.costs`."""

from __future__ import annotations

from ..costs import Spent, spent
from .entries import EntryCache
from .steps import Generation


def spent_of(gen: Generation, cache: EntryCache) -> Spent:
    entries = {e.serial: e for e in cache.all()}
    runs = [key for key in gen.counts if isinstance(key, tuple)]  # (entry serial, graph kind)
    costs = {serial: entries[serial].cost() if serial in entries else None for serial, _ in runs}
    # Plain calls (past the export limit) cost a full call of the first graph set that ran.
    ran = [e for serial, e in entries.items() if serial in costs]
    return spent(
        "".join(gen.log),
        [(kind, gen.counts[(serial, kind)], costs[serial]) for serial, kind in runs],
        misses=int(gen.counts.get("misses", 0)),
        plain_calls=int(gen.counts.get("plain", 0)),
        plain_cost=ran[0].cost() if ran else None,
    )
