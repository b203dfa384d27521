"""ties: task vectors trimmed to their largest entries, a sign elected per entry, the agreeing
entries averaged."""

from __future__ import annotations

from .base import MergeMethod


class Ties(MergeMethod):
    name = "ties"
    takes = frozenset({"weights", "normalize", "density", "lambda"})
    task = True
    normalized = True

    def compute(self, views, params, work, dtype, generator):
        from .. import methods

        return methods.ties(views[0], views[1:], params, work, dtype)
