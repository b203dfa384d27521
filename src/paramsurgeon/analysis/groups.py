"""Parameter groups for weight decay, as training code builds them by hand: biases,
normalisation weights and PReLU weights go without decay, every other parameter with it.
A bias is a tensor of the role bias or any parameter named as one (T5's relative_attention_bias,
an embedding): the Hugging Face Trainer (get_decay_parameter_names) and its example scripts exempt
every name that contains 'bias'. Buffers are not parameters and go in neither; a tied parameter
appears once."""

from __future__ import annotations


from ..checkpoint import Checkpoint
from ..checkpoint.kinds import NORMS, infer_kinds
from ..errors import SelectionError
from ..selection import matches, unmatched


def decay_groups(ckpt: Checkpoint, names: list[str], *, no_decay: tuple[str, ...] = (),
                 decay: tuple[str, ...] = (), warnings: list[str] | None = None) -> dict[str, list[str]]:
    """{'decay': [...], 'no_decay': [...], 'buffers': [...]} over ``names``, in file order.

    ``no_decay`` and ``decay`` globs override the rules (``no_decay`` first). A glob that
    matches none of ``names`` raises SelectionError, or with ``warnings`` (--allow-empty)
    is reported there.
    """
    problems = unmatched(names, no_decay, "--no-decay", ckpt.key) + unmatched(names, decay, "--decay", ckpt.key)
    if problems and warnings is None:
        raise SelectionError("; ".join(problems) + "; pass --allow-empty to go on anyway")
    if warnings is not None:
        warnings += problems
    kinds = infer_kinds(ckpt.tensors)
    aliases = {n for group in ckpt.ties() for n in group[1:]}
    groups: dict[str, list[str]] = {"decay": [], "no_decay": [], "buffers": []}
    for name in names:
        if name in aliases:
            continue
        kind = kinds[name]
        if kind.role == "buffer":
            groups["buffers"].append(name)
        elif any(matches(name, p) for p in no_decay):
            groups["no_decay"].append(name)
        elif any(matches(name, p) for p in decay):
            groups["decay"].append(name)
        elif kind.role == "bias" or "bias" in name.lower() or kind.layer in NORMS or kind.layer == "prelu":
            groups["no_decay"].append(name)
        else:
            groups["decay"].append(name)
    return groups
