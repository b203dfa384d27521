"""transpose: swap two dims, the values written contiguous."""

from __future__ import annotations

from dataclasses import dataclass

from ...checkpoint import Checkpoint, Tensor
from ...declare import option
from ...errors import UnfitTensorError
from ...sizes import plural
from ..plan import Change, Plan, names_list
from ..spec import Operation, Sources, Targets, TiePolicy, with_warnings
from ..values import value_plan
from .common import dim_of, no_dim, own, pair, torch_of


@dataclass(kw_only=True)
class Transpose(Targets, TiePolicy, Operation):
    """Swap two dims of the selected tensors, e.g. GPT-2 Conv1D (in, out) weights to nn.Linear (out, in)."""

    name = "transpose"
    example = "paramsurgeon transpose gpt2.pt -p 'h.*.mlp.c_fc.weight' -o linear.pt"

    dims: str = option("0,1", "--dims", metavar="A,B", help="The two dims to swap (default 0,1).")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._dims = pair(self.dims, "--dims")

    def plan(self, ckpt: Checkpoint, sources: Sources) -> Plan:
        warnings: list[str] = []
        names = self.targets(ckpt, "transpose", warnings)
        a, b = self._dims

        def change_for(unit: list[str], tensor: Tensor):
            da, db = dim_of(tensor, a), dim_of(tensor, b)
            if da is None or db is None:
                raise UnfitTensorError(no_dim(tensor, a if da is None else b, "--dims"))
            if da == db:
                raise UnfitTensorError(f"has {plural(len(tensor.shape), 'dimension')}, and --dims {a},{b} names one"
                                       " of them twice")
            shape = list(tensor.shape)
            shape[da], shape[db] = shape[db], shape[da]
            return Change(unit, f"transpose dims {da},{db}", tuple(shape), tensor.dtype.name,
                          lambda: own(torch_of(tensor).transpose(da, db)), lazy=True)

        plan = value_plan("transpose", f"transpose dims {a},{b}: {names_list(names)}", ckpt, names, self, change_for)
        return with_warnings(plan, warnings)
