"""Matches arrivals (webhooks, Kafka records) to the run steps waiting for them, in bounded memory.

What is where: `correlator` holds the Correlator (registration, the classification and
counting of arrivals, ageing); `expectation` the Expectation a waiting step holds; `tables`
the tables it keeps and the index that finds an arrival's expectation without a scan. The
types waiting kinds share with it (Arrival, Matcher, Selector, the ports) live in
`probes.arrivals`, so that probes never import the engine.

How it fits together:

- At run start a waiting kind calls `expect(channel, run_id, step, deadline)`; the matcher is
  not known yet (it may use values extracted by earlier steps). When the step runs it calls
  `Expectation.wait(match)`, which first claims a kept early arrival, else sleeps until an
  arrival matches or the deadline passes (then `probes.errors.NotReceived`).
- Receivers call `offer(arrival)`, which never blocks, and classify each arrival:

  duplicate   its delivery id was seen before (bounded LRU), or it matches an expectation that
              was already fulfilled (remembered for `late_memory` seconds);
  late        it matches an expectation whose deadline passed: never credited to a later run,
              even if a later run's matcher would accept it too;
  matched     a waiting expectation's matcher accepts it (first registered wins);
  early       no waiter accepts it yet, but some expectation on the channel is registered
              without a matcher: kept for `early_ttl` seconds for it to claim;
  unmatched   nobody can claim it (no registered expectation left on the channel), or it was
              kept early and nobody claimed it in time, or it was pushed out of a full table.

Counting: every arrival is counted exactly once in `hopwatch_arrivals_total{source,outcome}`.
`offer` returns the outcome it counted, or "early" when it counted nothing yet: the kept arrival
is counted later, `matched` when a waiter claims it, `duplicate` when a waiter claims another
matching one first, `unmatched` when it ages out, is evicted or can no longer be claimed.

Bounds: pending expectations (`max_pending`; a full table refuses `expect` with
CorrelatorOverflow, an internal error), early arrivals (`max_early`,
`max_early_bytes`, `early_ttl`), finished
expectations remembered for late/duplicate detection (`max_late`, `late_memory`) and delivery
ids (`max_delivery_ids`). Every overflow is counted in `Correlator.overflow`, never raised from
`offer`. Call `purge()` (or run `janitor()` as a task) so ageing happens without traffic too.

Matching: matchers must be cheap and total. A matcher that also has `keys` (an IndexedMatcher:
equalities it requires, as `(selector, text)` pairs) is indexed, per channel, under one of them,
so an arrival reads each selector once and runs only the matchers filed under what it holds;
a matcher without keys is checked against every arrival on its channel.
"""

from monitor.correlator.correlator import (
    EARLY,
    OUTCOMES,
    Correlator,
    CorrelatorOverflow,
    Outcome,
)
from monitor.correlator.expectation import Expectation, State
from probes.arrivals import Arrival, IndexedMatcher, Matcher, Selector

__all__ = [
    "EARLY",
    "OUTCOMES",
    "Arrival",
    "Correlator",
    "CorrelatorOverflow",
    "Expectation",
    "IndexedMatcher",
    "Matcher",
    "Outcome",
    "Selector",
    "State",
]
