"""A PEFT LoRA adapter as saved by ``save_pretrained``: its config, and its tensors grouped by module
(the loader reads the directory's files, formats/peft.py).

The keys are PEFT's (utils/save_and_load.py): they start with ``base_model.model.``, a
module's pair is ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (``lora_B.bias`` with
``lora_bias``), an Embedding's is ``<module>.lora_embedding_A`` / ``lora_embedding_B`` (no
``.weight``), DoRA adds ``<module>.lora_magnitude_vector``. Every other key is a whole tensor that
replaces the base's (``modules_to_save``, a targeted embedding's ``base_layer.weight``, biases
trained with ``bias='all'``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ...checkpoint import Checkpoint, Tensor
from ...errors import PlanError

PREFIX = "base_model.model."
_PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "bias", "lora_embedding_A": "A",
          "lora_embedding_B": "B", "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude"}
# config entries whose non-default value changes what merging means: (key, default, why it cannot be applied)
_UNSUPPORTED = [
    ("layer_replication", None, "layer_replication (the adapted model repeats base layers)"),
    ("trainable_token_indices", None, "trainable_token_indices (trainable-token deltas are not LoRA pairs)"),
    ("target_parameters", None, "target_parameters (LoRA on bare nn.Parameters)"),
    ("alora_invocation_tokens", None, "alora_invocation_tokens (aLoRA applies only after its invocation tokens;"
     " PEFT cannot merge it either)"),
    ("arrow_config", None, "arrow_config (a router over several adapters)"),
    ("use_bdlora", None, "use_bdlora (block-diagonal LoRA)"),
    ("monteclora_config", None, "monteclora_config"),
    ("kasa_config", None, "kasa_config"),
    ("use_qalora", False, "use_qalora (pooled inputs of a quantized base)"),
]
_CONVERTED_INITS = ("pissa", "olora", "corda", "lora_ga", "mica")


@dataclass
class Pair:
    """One adapted module: its LoRA tensors, by role (A, B, bias, magnitude)."""

    module: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # role -> the key in the adapter file
    embedding: bool = False
    r: int = 0
    alpha: float = 0.0

    @property
    def dora(self) -> bool:
        return "magnitude" in self.tensors


@dataclass
class Adapter:
    """An adapter: where it is, its config, its LoRA pairs by module and the whole tensors it holds."""

    path: str
    config: dict
    pairs: dict[str, Pair]
    whole: dict[str, tuple[str, Tensor]]  # base-side name (adapter parts stripped) -> (key, tensor)

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    def scaling(self, pair: Pair) -> float:
        """PEFT's scaling of ``pair``: ``alpha / r``, or ``alpha / sqrt(r)`` with use_rslora."""
        return pair.alpha / (math.sqrt(pair.r) if self.rslora else pair.r)


def lora_adapter(path: str, config: dict, weights: Checkpoint) -> Adapter:
    """The adapter at ``path``: its LoRA ``config`` and its ``weights`` (the loader read both,
    formats/peft.py), grouped by module.

    Raises:
        PlanError: config features that merging cannot apply exactly, patterns that match no module,
            keys that are not LoRA pairs, ranks that disagree with the config.
    """
    problems = _unsupported(config)
    pairs, whole, more = _group(weights.tensors)
    problems += more
    problems += _resolve_ranks(config, pairs)
    if problems:
        raise PlanError(f"merge-lora: {path}: {'; '.join(problems)}")
    return Adapter(path, config, pairs, whole)


def _unsupported(config: dict) -> list[str]:
    """The config features merging cannot apply exactly, each named."""
    found = [f"{why} cannot be merged exactly" for key, default, why in _UNSUPPORTED
             if config.get(key, default) not in (default, [], {}, None)]
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_CONVERTED_INITS):
        found.append(f"init_lora_weights '{init}' changed the base weights during training; convert the adapter"
                     " first (save_pretrained with path_initial_model_for_weight_conversion), then merge it")
    if config.get("lora_variant") or config.get("velora_config"):
        found.append("a LoRA variant other than DoRA cannot be merged exactly")
    return found


def _group(tensors: dict[str, Tensor]) -> tuple[dict[str, Pair], dict, list[str]]:
    """The LoRA pairs by module name, the whole tensors by base-side name, and problems."""
    pairs: dict[str, Pair] = {}
    whole: dict[str, tuple[str, Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        for suffix, role in _PARTS.items():
            if name.endswith("." + suffix):
                module = name[:-len(suffix) - 1]
                pair = pairs.setdefault(module, Pair(module))
                pair.tensors[role], pair.keys[role] = tensor, key
                pair.embedding = pair.embedding or suffix.startswith("lora_embedding")
                break
        else:
            if ".original_module." in name:  # the module modules_to_save replaced (bias='all' saves it too)
                continue
            stripped = _strip(name)
            if stripped not in whole or name == stripped:  # PEFT loads the plain key of a module to save
                whole[stripped] = (key, tensor)
    problems = []
    for module, pair in pairs.items():
        missing = [role for role in ("A", "B") if role not in pair.tensors]
        if missing:
            problems.append(f"'{module}' has no lora_{missing[0]} (its pair is incomplete)")
    return pairs, whole, problems


def _strip(name: str) -> str:
    """A whole tensor's name without PEFT's wrapper parts (``base_layer``, ``modules_to_save``)."""
    return re.sub(r"\.(base_layer|modules_to_save)(?=\.)", "", name)


def pattern_key(patterns, module: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern key that matches the end of ``module`` (dot-aligned)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _resolve_ranks(config: dict, pairs: dict[str, Pair]) -> list[str]:
    """Set each pair's r and alpha from the config and its patterns (first match wins); problems."""
    problems = []
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for option, patterns in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        for key in patterns:
            try:
                re.compile(key)
            except re.error as e:
                problems.append(f"{option} key '{key}' is not a regex ({e})")
                continue
            if not any(pattern_key([key], m) for m in pairs):
                problems.append(f"{option} key '{key}' matches no adapted module")
    if problems:
        return problems
    for module, pair in pairs.items():
        rank_key, alpha_key = pattern_key(ranks, module), pattern_key(alphas, module)
        pair.r = int(ranks[rank_key]) if rank_key is not None else int(config.get("r", 8))
        pair.alpha = float(alphas[alpha_key]) if alpha_key is not None else float(config.get("lora_alpha", 8))
        stored = pair.tensors["A"].shape[0]
        if stored != pair.r:
            where = f"rank_pattern '{rank_key}'" if rank_key is not None else f"r {pair.r}"
            problems.append(f"'{module}' has rank {stored} in the file but {where} in the config")
    return problems
