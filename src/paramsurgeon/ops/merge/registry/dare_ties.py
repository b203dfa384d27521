"""dare-ties: TIES' sign election on task vectors dropped at random by DARE (not trimmed)."""

from __future__ import annotations

from .base import MergeMethod


class DareTies(MergeMethod):
    name = "dare-ties"
    family = "dare"
    takes = frozenset({"weights", "normalize", "density", "lambda", "seed"})
    task = True
    normalized = True

    def compute(self, views, params, work, dtype, generator):
        from .. import methods

        return methods.ties(views[0], views[1:], params, work, dtype, generator)
