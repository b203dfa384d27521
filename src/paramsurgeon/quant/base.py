"""What a quantization scheme declares: its name, its parts, how to find its groups among a
checkpoint's stored tensors, how to dequantize one, and how to quantize where it can."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

from ..checkpoint.quantized import Quantized
from ..checkpoint.tensor import Tensor


@dataclass(frozen=True)
class Group:
    """One logical tensor found: its name, role -> stored name of each part, its logical shape,
    and what the scheme found out about it (block size, bits, ...)."""

    name: str
    parts: dict[str, str]
    shape: tuple[int, ...]
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Partial:
    """Stored tensors that belong to a scheme's group but do not make one, and why (named, never guessed)."""

    names: list[str]
    why: str


class Scheme:
    """One quantization scheme; a subclass per scheme, listed once in the registry (quant/__init__.py)."""

    name: ClassVar[str]
    roles: ClassVar[tuple[str, ...]]  # the parts, codes first
    # endings of stored names that only this scheme's parts have: without a quantization_config,
    # ``find`` runs only when some stored name ends with one (None: it always runs)
    markers: ClassVar[tuple[str, ...] | None] = None
    methods: ClassVar[tuple[str, ...]] = ()  # the quantization_config quant_method values whose weights it reads
    # params that differ from weight to weight (a part's stored name, a value its state holds), not its
    # layout: two weights are quantized alike (a copy takes the parts) whatever these are
    per_weight: ClassVar[tuple[str, ...]] = ()
    quantizes: ClassVar[bool] = False  # whether ``quantize`` is built
    # a format's own tensor types (GGUF's): its writer stores a changed tensor in its type again, and
    # inspect shows the type in that format's column, not as a scheme
    native: ClassVar[bool] = False
    scales: ClassVar[tuple[str, ...]] = ()  # the parts that hold scales (check --health's rule ``scale``)
    # every part has the logical tensor's leading expert dimension, each expert quantized on its own (gpt-oss's
    # fused experts): ``experts`` keeps experts by slicing every part along it
    expert_major: ClassVar[bool] = False

    def layout_of(self, params: dict) -> dict:
        """``params`` without the ones that differ from weight to weight (``per_weight``)."""
        return {key: value for key, value in params.items() if key not in self.per_weight}

    def part_name(self, name: str, role: str) -> str:
        """The stored name of the part ``role`` of the logical tensor ``name``."""
        raise NotImplementedError

    def find(self, tensors: dict[str, Tensor], config: dict) -> Iterator[Group | Partial]:
        """The groups among ``tensors`` (stored name -> tensor, none claimed by another scheme yet);
        ``config``: the model's quantization_config ({} when there is none)."""
        raise NotImplementedError

    def dequantize(self, tensor: Quantized) -> Any:
        """The values of ``tensor``: a torch tensor of its dtype and shape."""
        raise NotImplementedError

    def pieces(self, tensor: Quantized) -> Iterator[Any] | None:
        """``tensor``'s values a few MiB at a time, in row-major order (contiguous torch tensors of its
        dtype), for a writer or a reduction to stream (None: the scheme computes them whole)."""
        return None

    def quantize(self, values: Any, params: dict) -> dict[str, Any]:
        """Role -> torch tensor of each part storing ``values`` (only where ``quantizes``)."""
        raise NotImplementedError

    def layout(self, shape: tuple[int, ...], params: dict) -> dict[str, tuple[tuple[int, ...], str]]:
        """Role -> (shape, dtype name) of each part ``quantize`` makes for a weight of ``shape``
        (only where ``quantizes``): what a writer plans before the values are computed."""
        raise NotImplementedError

    def quantization_config(self, params: dict) -> dict:
        """The ``quantization_config`` a model config holds for groups of ``params`` (only where ``quantizes``)."""
        raise NotImplementedError

    def scale_problem(self, tensor: Quantized, name: str) -> str | None:
        """What is wrong with the scales of ``tensor`` (called ``name``): NaN, Inf, zero or negative
        ones, or None. A scheme whose scales are not plain floats (E8M0 exponents) overrides it."""
        from ..checkpoint.values import to_torch

        problems = []
        for role in self.scales:
            values = to_torch(tensor.parts[role]).float()
            counts = {"NaN": int(values.isnan().sum()), "Inf": int(values.isinf().sum()),
                      "zero": int((values == 0).sum()), "negative": int((values < 0).sum())}
            found = ", ".join(f"{n:,} {what}" for what, n in counts.items() if n)
            if found:
                problems.append(f"{self.part_name(name, role)} has {found} of {values.numel():,} scales")
        return "; ".join(problems) or None
