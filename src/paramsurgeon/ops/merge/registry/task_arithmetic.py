"""task-arithmetic: the base plus the weighted sum of the task vectors (x_i - base)."""

from __future__ import annotations

from .base import MergeMethod


class TaskArithmetic(MergeMethod):
    name = "task-arithmetic"
    takes = frozenset({"weights", "normalize", "lambda"})
    task = True

    def compute(self, views, params, work, dtype, generator):
        from .. import methods

        return methods.task_arithmetic(views[0], views[1:], params, work, dtype)
