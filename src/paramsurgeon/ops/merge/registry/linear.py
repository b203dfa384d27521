"""linear: the weighted average of the inputs."""

from __future__ import annotations

from .base import MergeMethod, Params


class Linear(MergeMethod):
    name = "linear"
    normalized = True

    def bounded(self, params: Params) -> bool:
        # a normalised average with weights >= 0 stays within its inputs' range
        return params.normalize and not any(w < 0 for w in params.weights)

    def compute(self, views, params, work, dtype, generator):
        from .. import methods

        return methods.linear(views, params, work, dtype)
