"""Read-only analyses of checkpoints, as plain data for report/ to render.

    stats.py        streaming per-tensor statistics and digests
    inspection.py   what inspect shows: rows, ties, totals, module tree
    compare.py      diff of two checkpoints
    checks.py       CI rules (finite, max-abs, like, expect, dtype)
    groups.py       weight-decay parameter groups
"""
