"""
How the daemons run CPython's cyclic garbage collector.

Reference counting frees almost every object the moment it is dropped; the
cyclic collector is only there for reference cycles.  By default it makes
a young collection every 2,000 container objects allocated, and what is
still alive then is moved to the older generations, whose full collections
walk every object the process holds.  An IM server holds many objects for
long (a stream for each conversation of each connection) and allocates a
few dozen for every message, most of them alive for the milliseconds to
seconds a message is in flight.  With the default, those were aged into
the old generation by the thousand, and full collections of a few hundred
milliseconds ran every few seconds: a third of a busy server's CPU, and as
many pauses in delivery (measured in the benchmark's C{p2p} scenario).

A daemon therefore freezes what exists once it is built (modules, classes,
functions: never garbage, and no longer walked by any collection), and
makes a young collection every L{GC_YOUNG} allocations instead
(C{--gc-young}), so that what is in flight dies before it is collected and
full collections become rare.  Cycles are still found, a little later.
"""

from __future__ import annotations

import gc

#: Container objects allocated between two young collections (CPython's own
#: default is 2,000).
GC_YOUNG = 50_000


def tune_gc(young: int) -> None:
    """
    Freeze the objects that exist now, and make a young collection every
    C{young} container allocations (the older generations keep CPython's
    ratios to it).
    """
    gc.freeze()
    gc.set_threshold(young)
