"""The worse of several readings of one signal: across micro-batches, and across DDP ranks.

Every rank must judge the same readings, or ranks disagree: a collective in the restore path
then hangs, and without one the replicas silently diverge (research note §3.3). So the readings
of all ranks are packed into one tensor and reduced once with ``max``: per signal the worst
value (higher loss, KL and grad norm; lower reward, so it is negated; non-finite wins), the
newest production step and the oldest state reflected (negated). Pure functions: the adapters
run the one collective with their framework (Lightning's ``strategy.reduce``, Fabric's
``all_reduce``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from lightning_fragrance.checkpointing.records import Reading
from lightning_fragrance.checkpointing.triggers import REWARD

_MISSING = -math.inf
FIELDS = 5
"""Floats per signal in a packed vector: present, non-finite, worst, produced_at, -since."""


def worse(name: str, first: Reading, second: Reading) -> Reading:
    """The worse of two readings of ``name``, dated to the newer, reflecting the older state."""
    if not math.isfinite(second.value):
        value = second.value
    elif not math.isfinite(first.value):
        value = first.value
    else:
        value = (min if name == REWARD else max)(first.value, second.value)
    since = min(first.first_state, second.first_state)
    return Reading(value, max(first.produced_at, second.produced_at), since)


def merge_worst(first: Mapping[str, Reading], second: Mapping[str, Reading]) -> dict[str, Reading]:
    """Per signal, `worse` of the two mappings (a signal in one only is kept as it is)."""
    merged = dict(first)
    for name, reading in second.items():
        old = merged.get(name)
        merged[name] = reading if old is None else worse(name, old, reading)
    return merged


def pack(names: Sequence[str], readings: Mapping[str, Reading]) -> list[float]:
    """This rank's readings as a vector whose element-wise ``max`` over ranks is `unpack`ed."""
    packed: list[float] = []
    for name in names:
        reading = readings.get(name)
        if reading is None:
            packed += [0.0, 0.0, _MISSING, _MISSING, _MISSING]
            continue
        finite = math.isfinite(reading.value)
        worst = (-reading.value if name == REWARD else reading.value) if finite else _MISSING
        since = -reading.first_state
        packed += [1.0, 0.0 if finite else 1.0, worst, reading.produced_at, since]
    return packed


def unpack(names: Sequence[str], reduced: Iterable[float]) -> dict[str, Reading]:
    """The agreed readings from the ``max``-reduced vector of `pack`."""
    values = list(reduced)
    agreed: dict[str, Reading] = {}
    for index, name in enumerate(names):
        present, non_finite, worst, produced, since = values[FIELDS * index : FIELDS * index + 5]
        if present <= 0:
            continue
        value = math.nan if non_finite > 0 else (-worst if name == REWARD else worst)
        agreed[name] = Reading(value, int(produced), int(-since))
    return agreed
