"""slerp: spherical interpolation between exactly two inputs."""

from __future__ import annotations

from .base import MergeMethod


class Slerp(MergeMethod):
    name = "slerp"
    takes = frozenset({"t"})
    hints = {"--weights": "use --t"}

    def problems(self, inputs: list[str]) -> list[str]:
        if len(inputs) != 2:
            return [f"slerp interpolates between exactly two checkpoints ({len(inputs)} given)"]
        return []

    def compute(self, views, params, work, dtype, generator):
        from .. import methods

        return methods.slerp(views[0], views[1], params, work, dtype)
