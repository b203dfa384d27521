"""dare-linear: task arithmetic on task vectors dropped at random by DARE."""

from __future__ import annotations

from .base import MergeMethod


class DareLinear(MergeMethod):
    name = "dare-linear"
    family = "dare"
    takes = frozenset({"weights", "normalize", "density", "lambda", "seed"})
    task = True

    def compute(self, views, params, work, dtype, generator):
        from .. import methods

        return methods.task_arithmetic(views[0], views[1:], params, work, dtype, generator)
