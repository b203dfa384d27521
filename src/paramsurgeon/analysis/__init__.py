"""Read-only analyses of checkpoints, as plain data for report/ to render.

    stats.py        streaming per-tensor statistics (and histograms) and digests
    buckets.py      the spread of values from the same pass: |x| quantiles, KS distances
    health.py       check --health: dead, constant, spike, exploding, untrained, nonfinite
    drift.py        relative change of each tensor against another checkpoint
    inspection.py   what inspect shows: rows, ties, totals, module tree
    compare.py      diff of two checkpoints
    checks.py       CI rules (finite, max-abs, like, expect, dtype)
    groups.py       weight-decay parameter groups
"""
