"""Initialisation schemes: ``torch.nn.init`` functions named in a spec like
'xavier_uniform(gain=relu)', the layer defaults of ``reset_parameters``, and the seeded
generator each tensor draws from.

Values are produced by torch.nn.init itself on a fresh tensor of the target's shape, so
fans, gains and distributions are exactly torch's. Each tensor's generator is derived
from the seed and the tensor's name alone: its values do not depend on what else was
selected or in which order.
"""

from __future__ import annotations

import ast
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

from ..dtypes import DType
from ..errors import UnfitTensorError, UsageError
from ..sizes import plural

# name -> (keyword defaults, required keywords, minimum dims, exact dims, random)
_SCHEMES: dict[str, tuple[dict, tuple, int, tuple, bool]] = {
    "uniform": ({"a": 0.0, "b": 1.0}, (), 0, (), True),
    "normal": ({"mean": 0.0, "std": 1.0}, (), 0, (), True),
    "trunc_normal": ({"mean": 0.0, "std": 1.0, "a": -2.0, "b": 2.0}, (), 0, (), True),
    "constant": ({}, ("val",), 0, (), False),
    "zeros": ({}, (), 0, (), False),
    "ones": ({}, (), 0, (), False),
    "eye": ({}, (), 2, (2,), False),
    "dirac": ({"groups": 1}, (), 3, (3, 4, 5), False),
    "xavier_uniform": ({"gain": 1.0}, (), 2, (), True),
    "xavier_normal": ({"gain": 1.0}, (), 2, (), True),
    "kaiming_uniform": ({"a": 0.0, "mode": "fan_in", "nonlinearity": "leaky_relu"}, (), 2, (), True),
    "kaiming_normal": ({"a": 0.0, "mode": "fan_in", "nonlinearity": "leaky_relu"}, (), 2, (), True),
    "orthogonal": ({"gain": 1.0}, (), 2, (), True),
    "sparse": ({"std": 0.01}, ("sparsity",), 2, (2,), True),
    "default": ({}, (), 0, (), True),
}
NAMES = tuple(_SCHEMES)
_NONLINEARITIES = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                   "conv_transpose3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")
_FORM = "NAME or NAME(key=value, ...), e.g. 'normal(mean=0, std=0.02)' or 'xavier_uniform(gain=relu)'"


@dataclass(frozen=True)
class Scheme:
    """A parsed spec: the torch.nn.init function name and its keyword arguments."""

    name: str
    kwargs: dict = field(default_factory=dict)

    @property
    def random(self) -> bool:
        return _SCHEMES[self.name][4]

    def __str__(self) -> str:
        if not self.kwargs:
            return self.name
        args = ", ".join(f"{k}={_show(v)}" for k, v in self.kwargs.items())
        return f"{self.name}({args})"

    def reach(self) -> float:
        """An upper bound of the |values| this scheme gives, whatever the shape (fans are at least 1;
        a normal draw stays within 10 std, as torch's Box-Muller cannot go beyond about 8.6)."""
        k = {**_SCHEMES[self.name][0], **self.kwargs}
        if self.name in ("uniform", "trunc_normal"):
            return max(abs(k["a"]), abs(k["b"]))
        if self.name in ("normal", "sparse"):
            return abs(k.get("mean", 0.0)) + 10 * k["std"]
        if self.name == "constant":
            return abs(k["val"])
        return 10 * abs(k.get("gain", 2.0))  # xavier, orthogonal (|gain|); kaiming (gain <= 2); 0/1 fills

    def problem(self, shape: tuple[int, ...], floating: bool) -> str | None:
        """Why this scheme cannot fill a tensor of ``shape`` (None when it can)."""
        _, _, min_dims, exact, random = _SCHEMES[self.name]
        if random and not floating:
            return "is not floating point, and random values would be truncated"
        if exact and len(shape) not in exact:
            return f"has {plural(len(shape), 'dimension')}, but {self.name} needs {' or '.join(map(str, exact))}"
        if len(shape) < min_dims:
            return f"has {len(shape)} dimension{'s' if len(shape) != 1 else ''}, but {self.name} needs" \
                   f" at least {min_dims} (fan-in and fan-out)"
        if self.name == "dirac" and shape[0] % self.kwargs.get("groups", 1):
            return f"has {shape[0]} output channels, not divisible by groups={self.kwargs['groups']}"
        if self.name == "constant" and not floating and float(self.kwargs["val"]) != int(self.kwargs["val"]):
            return f"is an integer tensor, and {self.kwargs['val']} is not a whole number"
        return None


def constant_problem(value: int | float, dtype: DType, allow_overflow: bool, option: str = "--const") -> str | None:
    """Why the constant ``value`` (given as ``option``) cannot fill a tensor of ``dtype`` (None when it can)."""
    if dtype.name == "bool":
        return None if value in (0, 1) else f"is boolean; only {option} 0 or 1 fits it"
    if dtype.floating or dtype.complex:
        if abs(value) <= dtype.largest or allow_overflow:
            return None
        return f"is {dtype}, which holds |x| <= {dtype.largest:g}, so {option} {value:g} would be Inf; pass" \
               " --allow-overflow to write Inf anyway"
    if dtype.lowest <= value <= dtype.largest:
        return None
    return f"is {dtype}, which holds {dtype.lowest} to {dtype.largest}, not {value:g}"


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse(spec: str) -> Scheme:
    """Parse 'name' or 'name(key=value, ...)' into a Scheme with checked arguments."""
    match = re.fullmatch(r"\s*([A-Za-z_]\w*?)_?\s*(?:\((.*)\))?\s*", spec, re.S)
    if not match:
        raise UsageError(f"--scheme '{spec}': expected {_FORM}")
    name, body = match.group(1), match.group(2)
    if name not in _SCHEMES:
        raise UsageError(f"--scheme '{spec}': unknown scheme '{name}'; choose from {', '.join(NAMES)}")
    kwargs = _arguments(spec, body or "")
    defaults, required, *_ = _SCHEMES[name]
    unknown = [k for k in kwargs if k not in defaults and k not in required]
    if unknown:
        allowed = ", ".join(list(required) + list(defaults)) or "no arguments"
        raise UsageError(f"--scheme '{spec}': {name} takes {allowed}, not {', '.join(unknown)}")
    missing = [k for k in required if k not in kwargs]
    if missing:
        raise UsageError(f"--scheme '{spec}': {name} needs {', '.join(missing)}=..., e.g. {name}({missing[0]}=0.1)")
    return Scheme(name, _ordered(spec, name, {k: _check(spec, name, k, v) for k, v in kwargs.items()}))


def _arguments(spec: str, body: str) -> dict:
    """Keyword arguments from 'a=1, gain=relu, mode=fan_out' (bare words are strings)."""
    if not body.strip():
        return {}
    try:
        call = ast.parse(f"f({body})", mode="eval").body
    except SyntaxError as e:
        raise UsageError(f"--scheme '{spec}': cannot read the arguments; expected {_FORM}") from e
    if call.args:
        raise UsageError(f"--scheme '{spec}': give arguments by name, e.g. std=0.02")
    return {kw.arg: _literal(spec, kw.value) for kw in call.keywords}


def _literal(spec: str, node: ast.AST) -> Any:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1 and not node.keywords:
        return (node.func.id, _literal(spec, node.args[0]))  # gain=leaky_relu(0.2)
    try:
        value = ast.literal_eval(node)
    except ValueError as e:
        raise UsageError(f"--scheme '{spec}': '{ast.unparse(node)}' is not a number or a name") from e
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"--scheme '{spec}': '{ast.unparse(node)}' is not a number or a name")
    return value


def _check(spec: str, name: str, key: str, value: Any) -> Any:
    if key == "gain":
        resolved = gain(spec, value)
        if resolved < 0 and name.startswith("xavier"):
            raise UsageError(f"--scheme '{spec}': gain must not be negative for {name} (its bound or std is the"
                             " gain times a positive number)")
        return resolved
    if key == "mode":
        if value not in ("fan_in", "fan_out"):
            raise UsageError(f"--scheme '{spec}': mode must be fan_in or fan_out")
        return value
    if key == "nonlinearity":
        if value not in _NONLINEARITIES:
            raise UsageError(f"--scheme '{spec}': unknown nonlinearity '{value}'; choose from {', '.join(_NONLINEARITIES)}")
        return value
    if key == "groups":
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"--scheme '{spec}': groups must be a positive whole number")
        return value
    value = _number(spec, key, value)
    if key == "sparsity" and not 0 <= value <= 1:
        raise UsageError(f"--scheme '{spec}': sparsity is a fraction between 0 and 1")
    if key == "std" and (value < 0 or (value == 0 and name == "trunc_normal")):
        raise UsageError(f"--scheme '{spec}': std must be {'more than 0' if name == 'trunc_normal' else 'at least 0'}")
    if key == "a" and name.startswith("kaiming") and abs(value) > 1e150:
        raise UsageError(f"--scheme '{spec}': a is the negative slope of leaky_relu; {value:g} is too large for"
                         " torch's calculate_gain")
    if key == "val" and isinstance(value, int) and abs(value) < 2**63:
        return value  # an integral constant stays an int, to fit integer tensors
    return float(value)


def _number(spec: str, key: str, value: Any) -> int | float:
    """``value`` if it is a finite number (one torch can take), else a UsageError."""
    if not isinstance(value, (int, float)):
        raise UsageError(f"--scheme '{spec}': {key} must be a number, not '{value}'")
    try:
        finite = math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite:
        raise UsageError(f"--scheme '{spec}': {key} must be a finite number")
    return value


def _ordered(spec: str, name: str, kwargs: dict) -> dict:
    """``kwargs``, refused when the interval [a, b] of uniform or trunc_normal is reversed (as torch refuses it)."""
    if name in ("uniform", "trunc_normal"):
        a, b = (kwargs.get(k, _SCHEMES[name][0][k]) for k in ("a", "b"))
        if a > b:
            raise UsageError(f"--scheme '{spec}': a={a:g} is more than b={b:g}; {name} draws from [a, b]")
    return kwargs


def gain(spec: str, value: Any) -> float:
    """A gain given as a number or a nonlinearity name, resolved as torch's calculate_gain does."""
    if isinstance(value, (int, float)):
        return float(_number(spec, "gain", value))
    nonlinearity, param = value if isinstance(value, tuple) else (value, None)
    if nonlinearity not in _NONLINEARITIES:
        raise UsageError(f"--scheme '{spec}': gain must be a number or one of {', '.join(_NONLINEARITIES)}")
    if param is not None:
        param = _number(spec, f"the slope of {nonlinearity}", param)
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope * slope))
    if nonlinearity == "selu":
        return 3.0 / 4
    return 1.0


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of tensor ``name``: a function of the run's seed and the name only."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def fill(scheme: Scheme, shape: tuple[int, ...], dtype, seed: int, name: str, in_out: bool = False):
    """New values for a tensor of ``shape`` and torch ``dtype``, drawn as torch.nn.init draws them;
    ``in_out``: for a 2-D weight stored (in, out) (GPT-2's Conv1D), drawn as its (out, in)
    transpose, so that a fan-based scheme takes dim 0 as the fan-in."""
    import torch

    if in_out:
        return fill(scheme, shape[::-1], dtype, seed, name).T.contiguous()

    work = dtype if dtype in (torch.float32, torch.float64) or not dtype.is_floating_point else torch.float32
    values = torch.empty(shape, dtype=work)
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    init = getattr(torch.nn.init, f"{scheme.name}_")
    kwargs = dict(scheme.kwargs)
    if scheme.random:
        kwargs["generator"] = generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tensor_seed(seed, name))  # sparse_ draws its column permutations globally
        with torch.no_grad():
            if values.numel():
                init(values, **kwargs)
    return values.to(dtype)


def default_for(name: str, tensors: Mapping[str, Any], layer: str, in_out: Collection[str] = ()) -> Scheme:
    """What ``reset_parameters`` gives tensor ``name`` of a ``layer`` (an UnfitTensorError saying why
    it is unknown).

    The tensors beside it (``tensors``: name -> Tensor) give a bias its fan-in, a recurrent
    layer its hidden size, and show the parts nn.MultiheadAttention initialises itself.
    ``in_out`` names the weights stored (in, out) (layouts.stored_in_out): GPT-2's Conv1D, which
    has no reset_parameters and whose constructor draws normal(0, 0.02) and zero biases.
    """
    weight_name = name[: -len("bias")] + "weight" if name.endswith("bias") else name
    if layer == "linear" and weight_name in in_out:
        return Scheme("zeros") if weight_name != name else Scheme("normal", {"mean": 0.0, "std": 0.02})
    if layer in ("linear", "unknown"):
        attention = _attention_default(name, tensors)
        if attention is not None:
            return attention
    prefix, _, leaf = name.rpartition(".")
    if layer == "rnn":
        return _recurrent_default(prefix, leaf, tensors)
    weight = tensors.get(name[: -len("bias")] + "weight") if name.endswith("bias") else tensors[name]
    return layer_default(layer, leaf, weight.shape if weight is not None else None)


def _attention_default(name: str, tensors: Mapping[str, Any]) -> Scheme | None:
    """nn.MultiheadAttention._reset_parameters: xavier_uniform projections, zero biases
    (out_proj's too, though it is a Linear), xavier_normal bias_k and bias_v."""
    prefix, _, leaf = name.rpartition(".")
    if leaf in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
        return Scheme("xavier_uniform")
    if leaf == "in_proj_bias":
        return Scheme("zeros")
    module, _, component = prefix.rpartition(".")
    if component == "out_proj" and leaf == "bias" and _is_attention(module, tensors):
        return Scheme("zeros")
    if leaf in ("bias_k", "bias_v") and _is_attention(prefix, tensors):
        return Scheme("xavier_normal")
    return None


def _is_attention(module: str, tensors: Mapping[str, Any]) -> bool:
    """Whether ``module`` holds nn.MultiheadAttention's own projection weights."""
    return any((f"{module}.{leaf}" if module else leaf) in tensors for leaf in ("in_proj_weight", "q_proj_weight"))


def _recurrent_default(prefix: str, leaf: str, tensors: Mapping[str, Any]) -> Scheme:
    """RNNBase and RNNCellBase: every tensor uniform(+-1/sqrt(hidden_size))."""
    from ..checkpoint.kinds import RECURRENT

    match = RECURRENT.fullmatch(leaf)
    if match is None:
        raise UnfitTensorError(f"is '{leaf}' of an rnn layer, which has no default")
    suffix = match.group(3) or ""
    sibling = {part: tensors.get(f"{prefix}.weight_{part}{suffix}" if prefix else f"weight_{part}{suffix}")
               for part in ("hr", "hh")}
    source = sibling["hr"] if sibling["hr"] is not None else sibling["hh"]  # (proj, hidden) or (gates*hidden, hidden)
    if source is None or len(source.shape) != 2:
        raise UnfitTensorError(f"has no weight_hh{suffix} beside it to take the hidden size from")
    bound = 1 / math.sqrt(source.shape[1]) if source.shape[1] > 0 else 0.0
    return Scheme("uniform", {"a": -bound, "b": bound})


def layer_default(layer: str, leaf: str, weight_shape: tuple[int, ...] | None) -> Scheme:
    """What ``reset_parameters`` gives tensor ``leaf`` of a ``layer`` (an UnfitTensorError saying why
    it is unknown)."""
    leaf = {"in_proj_weight": "weight", "in_proj_bias": "bias"}.get(leaf, leaf)
    if layer in ("conv", "linear"):
        if leaf == "weight":
            return Scheme("kaiming_uniform", {"a": math.sqrt(5)})
        if leaf == "bias":
            if weight_shape is None or len(weight_shape) < 2:
                raise UnfitTensorError("has no weight beside it to take fan-in from")
            fan_in = math.prod(weight_shape[1:])
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            return Scheme("uniform", {"a": -bound, "b": bound})
    if layer in ("batchnorm", "layernorm", "groupnorm", "rmsnorm", "norm"):
        if leaf in ("weight", "running_var"):
            return Scheme("ones")
        if leaf in ("bias", "running_mean", "num_batches_tracked"):
            return Scheme("zeros")
    if layer == "embedding" and leaf == "weight":
        return Scheme("normal", {"mean": 0.0, "std": 1.0})
    if layer == "prelu" and leaf == "weight":
        return Scheme("constant", {"val": 0.25})
    if layer == "unknown":
        raise UnfitTensorError("is of unknown layer kind", "name the kind with --layer (conv, linear, batchnorm, ...)")
    raise UnfitTensorError(f"is '{leaf}' of a {layer} layer, which has no default")
