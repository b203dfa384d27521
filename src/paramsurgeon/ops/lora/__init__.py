"""merge-lora and extract-lora: PEFT LoRA adapters folded into a checkpoint, or extracted from a fine-tune.

    __init__.py    MergeLora, ExtractLora: the options
    adapter.py     an adapter the loader read (formats/peft.py): its config (what cannot be merged exactly
                   is refused), its tensors grouped by module, ranks and alphas from PEFT's patterns
    planning.py    merge-lora's plan: adapter names mapped to base tensors, one lazy Change per tensor
    arithmetic.py  PEFT's formulas in float32 (Linear, Conv1D, Embedding, ConvNd, DoRA, lora_bias), and the SVD
    extraction.py  extract-lora: the deltas, their truncated SVDs, the adapter's tensors and config

The base is streamed like every command's input: each updated tensor is computed when the writer
reaches it, from memory-mapped views of the base tensor and its adapter pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...declare import REQUIRED, argument, option
from ...errors import UsageError
from ...selection import Selection
from ..plan import Plan
from ..spec import Operation, Overflow, Sources
from ..values import cast_target


@dataclass(kw_only=True)
class MergeLora(Overflow, Operation):
    """Fold a PEFT LoRA adapter into its base checkpoint, with PEFT's own arithmetic (merge_and_unload).

    Linear, GPT-2 Conv1D, Embedding, Conv1d/2d/3d, DoRA, lora_bias and modules_to_save; computed in
    float32 and written in the base's dtypes, one tensor at a time.
    """

    name: ClassVar[str] = "merge-lora"
    example: ClassVar[str] = "paramsurgeon merge-lora base.safetensors my-adapter/ -o merged.safetensors"
    named_input: ClassVar[bool] = True  # CKPT ADAPTER: the base comes first, '-' for standard input

    adapter: str = argument(REQUIRED, metavar="ADAPTER", path=True, help="The adapter directory save_pretrained"
                            " wrote (adapter_config.json and adapter_model.safetensors or .bin).")
    scale: float = option(1.0, "--scale", metavar="S", help="Multiply the adapter's effect (0.5: half), as PEFT's"
                          " set_scale does.")
    untie: bool = option(False, "--untie", help="Merge into the adapted tensor only: a tensor tied to it keeps the"
                         " base values in storage of its own (default: the whole tie group takes the merged values"
                         " and stays tied, as merge_and_unload leaves it).")
    follow_ties: bool = option(False, "--follow-ties", help="The default (kept for older scripts): tensors tied to an"
                               " adapted one take the merged values too.")
    dtype: str | None = option(None, "--dtype", metavar="D", help="Write every floating-point tensor as D (float32,"
                               " float16, bfloat16 or float64; default: each keeps the base's dtype); the merged ones"
                               " are rounded once, from float32.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype is not None:
            cast_target(self.dtype)
        if self.untie and self.follow_ties:
            raise UsageError("merge-lora: --untie and --follow-ties contradict each other; pass one")

    def plan(self, ckpt, sources: Sources) -> Plan:
        """Group the adapter's tensors (``sources`` opens it) and plan one Change per base tensor it updates."""
        from .adapter import lora_adapter
        from .planning import plan_merge_lora

        return plan_merge_lora(self, ckpt, lora_adapter(*sources.adapter(self.adapter)))


@dataclass(kw_only=True)
class ExtractLora(Selection):
    """A PEFT LoRA adapter whose merge into BASE approximates TUNED (truncated SVD of each delta)."""

    name: ClassVar[str] = "extract-lora"
    example: ClassVar[str] = "paramsurgeon extract-lora base.safetensors tuned.safetensors -o adapter/ --rank 16"

    base: str = argument(REQUIRED, metavar="BASE", help="The base checkpoint.")
    tuned: str = argument(REQUIRED, metavar="TUNED", help="The fine-tuned checkpoint (same names and shapes).")
    output: str = option(REQUIRED, "-o", "--output", metavar="ADAPTER_DIR", help="The adapter directory to write"
                         " (replaced whole if it exists).")
    rank: int = option(REQUIRED, "--rank", metavar="R", minimum=1, help="The LoRA rank (smaller for a module whose"
                       " delta has fewer dimensions; recorded in rank_pattern).")
    alpha: float | None = option(None, "--alpha", metavar="A", above=0, help="lora_alpha of the config (default:"
                                 " the rank, so that the scaling is 1).")
    dtype: str | None = option(None, "--dtype", metavar="D", help="The dtype of the adapter's tensors (float32,"
                               " float16, bfloat16 or float64; default: the base tensor's).")
    fan_in_fan_out: bool = option(False, "--fan-in-fan-out", help="Square 2-D weights whose layout the checkpoint"
                                  " does not tell are stored (in, out), as GPT-2's Conv1D stores them (each"
                                  " other weight's layout is told by its bias and neighbours).")

    def __post_init__(self) -> None:
        from ...declare import check

        check(self, self.name)
        if self.dtype is not None:
            cast_target(self.dtype)


__all__ = ["ExtractLora", "MergeLora"]
