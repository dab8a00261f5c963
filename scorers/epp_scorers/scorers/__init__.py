"""Scorers: plugins deriving from `epp.framework.Scorer`. `score(cycle, request, endpoints)` returns
one value in [0, 1] per candidate (same order), synchronously and without I/O; the profile clamps
each value and multiplies it by the scorer's weight, and the picker chooses from the totals."""
