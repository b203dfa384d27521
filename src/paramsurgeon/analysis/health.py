"""Diagnostics for weights that look wrong (check --health, report), on floating-point
parameters only (buffers such as running_var are not weights).

    nonfinite  any NaN or Inf                                               fails
    dead       >= 99.99% of the values are exactly zero                     fails
    constant   every value equal, and not zero (more than one value)        warning
    spike      max |x| / 99th percentile of |x| >= 100: warns; >= 10,000: fails (published
               models carry "super weights" of a few hundred times the p99)
    exploding  variance x fan-in (of conv/linear weights and biases: the default init's scale;
               of others, the variance) >= 10x the median of tensors of the same kind and role  warning
    untrained  a conv/linear weight indistinguishable from a fresh init     fails
    scale      a quantized weight with a NaN, Inf, zero or negative scale     fails
    orphan     a stored part of a quantized weight without its partner (a weight without its scale,
               a scale without its weight, a scale grid that does not fit)  fails

``untrained`` compares the values with the initialisations in use, for the weight's fans (GPT-2's
Conv1D stores (in, out): its fan-in is shape[0]) and the model's depth: uniform within
+-1/sqrt(fan_in) (PyTorch's default), xavier_uniform and kaiming_uniform bounds; normal(0, sigma)
for sigma 0.02 (``initializer_range``), 0.02/sqrt(2 x layers) (GPT-2's residual projections),
1/sqrt(fan_in), xavier_normal and kaiming_normal. Never a sigma fitted to the values: briefly
trained small layers still look Gaussian. It fires when the Kolmogorov-Smirnov statistic
sqrt(n)*D is at most 3 (a fresh init exceeds that with probability 3e-8) and, for a uniform, when
no value lies outside the bound (a fresh uniform never does; training moves the values at the
edges out, almost surely), for a normal, when the std is within 8 standard errors of sigma and
values kept exactly are not flatter than a normal sample ever is (``_flat``).

The statistics decide first, for free, whether a rule could fire; only then are the values'
spread counted (from the chunk still in memory: never a second read).
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import statistics
from dataclasses import dataclass, replace
from typing import Callable

from ..checkpoint import Checkpoint
from ..checkpoint.kinds import fans, infer_kinds
from ..checkpoint.layouts import stored_in_out
from ..checkpoint.quantized import Quantized, refuse_valueless
from ..errors import SelectionError, UsageError
from ..selection import matches, unmatched
from ..parallel import Work, spread
from .stats import Stats, tensor_stats
from ..sizes import plural

FAILING = ("nonfinite", "dead", "spike", "untrained", "scale", "orphan")  # the rules that can fail the check
RULES = ("nonfinite", "dead", "constant", "spike", "exploding", "untrained", "scale", "orphan")
QUANTIZED = ("scale", "orphan")  # the rules of quantized checkpoints (listed for those only)
DEAD = 0.9999
SPIKE = 100.0
SPIKE_FAILS = 10_000.0
EXPLODING = 10.0
UNTRAINED_KS = 3.0
SHORTFALL = math.log(1e-9)  # below this log-probability, no fresh init's largest |value| is so small
FLAT = -6.0  # standard errors of the excess kurtosis below a normal sample's: flatter than any
INITIALIZER_RANGE = 0.02


@dataclass
class Finding:
    """One rule broken by one tensor: the measured value against the threshold."""

    rule: str
    name: str
    value: float | None
    threshold: float | None
    message: str
    severity: str = "fail"  # or "warning"

    @property
    def fails(self) -> bool:
        return self.severity == "fail"

    def as_dict(self) -> dict:
        return {"rule": self.rule, "name": self.name, "severity": self.severity,
                "value": self.value, "threshold": self.threshold, "message": self.message}


@dataclass(frozen=True)
class Init:
    """An initialisation ``untrained`` compares a weight with: uniform within +-scale, or normal(0, scale)."""

    uniform: bool
    scale: float
    label: str

    def cdf(self, t):
        """The distribution function at the values of tensor ``t``."""
        if self.uniform:
            return ((t + self.scale) / (2 * self.scale)).clamp(0, 1)
        return 0.5 * (1 + (t / (self.scale * math.sqrt(2))).erf())

    def within(self, bound: float) -> float:
        """P(|x| < bound) for one fresh value."""
        if self.uniform:
            return min(bound / self.scale, 1.0)
        return math.erf(bound / (self.scale * math.sqrt(2)))


class Layout:
    """What the rules know of each tensor besides its values: its kind, fans and depth."""

    def __init__(self, ckpt: Checkpoint):
        self.tensors = ckpt.tensors
        self.kinds = infer_kinds(ckpt.tensors)
        self.in_out = stored_in_out(ckpt.tensors)
        self.depths = _depths(ckpt.tensors)

    def weight(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether ``name`` is a conv or linear weight (whose scale follows its fan-in)."""
        kind = self.kinds[name]
        return kind.layer in ("conv", "linear") and kind.role == "weight" and len(shape) >= 2

    def fan_in(self, name: str) -> int | None:
        """The fan-in that scales a conv/linear weight's default init, and its bias's (None for others)."""
        kind = self.kinds[name]
        if kind.layer not in ("conv", "linear") or kind.role not in ("weight", "bias"):
            return None
        weight = name[: -len("bias")] + "weight" if kind.role == "bias" else name
        shape = self.tensors[weight].shape if weight in self.tensors else ()
        return fans(shape, weight in self.in_out)[0] if len(shape) >= 2 else None

    def inits(self, name: str, shape: tuple[int, ...]) -> tuple[Init, ...]:
        """The initialisations a conv/linear weight may have been left at (none for other tensors)."""
        if not self.weight(name, shape):
            return ()
        return inits_for(tuple(shape), name in self.in_out, self.depths.get(name))


@functools.lru_cache(maxsize=4096)
def inits_for(shape: tuple[int, ...], in_out: bool = False, layers: int | None = None) -> tuple[Init, ...]:
    """The initialisations in use for a weight of ``shape`` (stored (in, out) with ``in_out``) in a
    block repeated ``layers`` times: PyTorch's default, xavier and kaiming, initializer_range,
    GPT-2's residual projections."""
    fan_in, fan_out = fans(shape, in_out)
    if not fan_in or not fan_out:
        return ()
    scales = [(True, 1 / math.sqrt(fan_in), f"1/sqrt({fan_in})", "PyTorch's default, kaiming_uniform(a=sqrt(5))"),
              (True, math.sqrt(6 / (fan_in + fan_out)), f"sqrt(6/({fan_in}+{fan_out}))", "xavier_uniform"),
              (True, math.sqrt(6 / fan_in), f"sqrt(6/{fan_in})", "kaiming_uniform"),
              (False, INITIALIZER_RANGE, "", "initializer_range")]
    if layers:
        scales.append((False, INITIALIZER_RANGE / math.sqrt(2 * layers),
                       f"{INITIALIZER_RANGE}/sqrt(2x{layers} layers)", "GPT-2's residual projections"))
    scales += [(False, 1 / math.sqrt(fan_in), f"1/sqrt({fan_in})", "LeCun"),
               (False, math.sqrt(2 / (fan_in + fan_out)), f"sqrt(2/({fan_in}+{fan_out}))", "xavier_normal"),
               (False, math.sqrt(2 / fan_in), f"sqrt(2/{fan_in})", "kaiming_normal")]
    return tuple(Init(uniform, scale, f"{'uniform(+-' if uniform else 'normal(0, '}{formula + ' = ' if formula else ''}"
                                   f"{scale:.3g}), {source}") for uniform, scale, formula, source in scales)


_NUMBERED = re.compile(r"(?:^|\.)(\d+)\.")


def _depths(names) -> dict[str, int]:
    """The number of layers of the repeated block each name is in (``h.3.attn.c_proj.weight``: how
    many ``h.N`` there are); names in no numbered block are left out."""
    blocks: dict[str, str] = {}
    indices: dict[str, set[str]] = {}
    for name in names:
        match = _NUMBERED.search(name)
        if match is not None:
            blocks[name] = name[:match.start()]
            indices.setdefault(blocks[name], set()).add(match.group(1))
    return {name: len(indices[block]) for name, block in blocks.items()}


def checked_names(ckpt: Checkpoint, names: list[str]) -> list[str]:
    """The floating-point parameters among ``names`` (buffers and integer tensors are not weights),
    each storage once: a tied name after the first of its group is the same values (a GPT-2 lm_head
    is its wte, an embedding)."""
    kinds = infer_kinds(ckpt.tensors)
    aliases = {n for group in ckpt.ties() for n in group[1:]}
    return [n for n in names if ckpt.tensors[n].dtype.floating and kinds[n].role != "buffer" and n not in aliases]


def measure(ckpt: Checkpoint, names: list[str], bins: int | None = None, drawn: set[str] | None = None,
            progress: Callable[[int], None] | None = None, work: Work = Work(),
            doing: str = "check --health") -> dict[str, Stats]:
    """Statistics of ``names``, each read once (spread over ``work``'s workers), with the spread of
    the values wherever a rule may need it (see ``_needs_spread``), and histograms of ``bins`` bins:
    of every tensor, or with ``drawn``, of those and of any tensor the statistics say may have a finding.
    ``doing``: the command, named when a tensor's values cannot be read."""
    refuse_valueless(ckpt.tensors, names, doing)
    layout = Layout(ckpt)

    def one(index: int) -> Stats:
        name = names[index]
        tensor = ckpt.tensors[name]
        inits = layout.inits(name, tensor.shape)
        histogram = bins if drawn is None or name in drawn or not bins else \
            (lambda s: bins if _suspect(tensor.shape, inits, s) else None)
        return tensor_stats(tensor, bins=histogram, buckets=lambda s: _needs_spread(tensor.shape, inits, s))

    found = {}
    for index, stats in spread(one, {i: ckpt.tensors[n].nbytes for i, n in enumerate(names)}, work, "tensors"):
        found[names[index]] = stats
        if progress is not None:
            progress(ckpt.tensors[names[index]].nbytes)
    return {name: found[name] for name in names}


def _needs_spread(shape: tuple[int, ...], inits: tuple[Init, ...], s: Stats) -> bool:
    """Whether spike or untrained could fire, from the statistics alone (else the values need no
    second look): a spike needs most of the energy in 1% of the values, an init its bound or std."""
    if s.nan or s.inf or not s.abs_max:
        return False
    n = math.prod(shape)
    return _spike_possible(s, n) or any(_possible(init, s, n) for init in inits)


def _suspect(shape: tuple[int, ...], inits: tuple[Init, ...], s: Stats) -> bool:
    """Whether any rule but exploding (which needs every tensor) could fire on these statistics."""
    n = math.prod(shape)
    return bool(s.nan or s.inf or s.zeros >= DEAD * n or s.min == s.max or _needs_spread(shape, inits, s))


def _spike_possible(s: Stats, n: int) -> bool:
    """max / p99 >= 100 needs all but K values within max/100 (p99 the order statistic
    floor(0.99 (n-1))), so a sum of squares above what that allows rules a spike out."""
    few = n - math.floor(0.99 * (n - 1)) - 1
    squares = (n - 1) * (s.std or 0.0) ** 2 + n * s.mean ** 2
    return squares <= ((n - few) * (s.abs_max / SPIKE) ** 2 + few * s.abs_max ** 2) * (1 + 1e-6)


def _possible(init: Init, s: Stats, n: int) -> bool:
    """Whether values of these statistics may be a fresh ``init``: no value beyond a uniform's bound;
    the std of a normal's within 8 standard errors; the largest |value| not short of what n fresh
    values reach (all n within a with probability P(|x| < a)^n: below 1e-9, never)."""
    if init.uniform and s.abs_max > init.scale * (1 + 1e-6):
        return False
    if not init.uniform and (s.std is None or abs(s.std / init.scale - 1) > 8 / math.sqrt(2 * n)):
        return False
    within = init.within(s.abs_max)
    return within > 0 and n * math.log(within) >= SHORTFALL


def diagnose(ckpt: Checkpoint, stats: dict[str, Stats], selected: list[str] | None = None) -> list[Finding]:
    """Every finding on the tensors of ``stats`` (from ``measure``), in file order, by rule; orphaned
    parts among ``selected`` (default: those of ``stats``)."""
    layout = Layout(ckpt)
    findings = []
    variances: dict[tuple, list[float]] = {}
    for name, s in stats.items():
        tensor = ckpt.tensors[name]
        if s is None or tensor.numel == 0:
            continue
        if s.nan or s.inf:
            findings.append(Finding("nonfinite", name, s.nan + s.inf, 0,
                                    f"has {s.nan:,} NaN and {s.inf:,} Inf of {plural(tensor.numel, 'value')}"))
            continue
        zeros = s.zeros / tensor.numel
        if zeros >= DEAD:
            findings.append(Finding("dead", name, zeros, DEAD, f"is {100 * zeros:.2f}% exact zeros"
                                                               f" (>= {100 * DEAD:g}%)"))
        elif s.min == s.max and tensor.numel > 1:
            findings.append(Finding("constant", name, s.min, None, f"every value is {s.min:g}", "warning"))
        p99 = s.buckets.abs_quantile(0.99) if s.buckets is not None and _spike_possible(s, tensor.numel) else None
        if p99 and s.abs_max / p99 >= SPIKE:
            findings.append(_spike(name, s.abs_max, p99))
        if s.std is not None:
            kind = layout.kinds[name]
            fan_in = layout.fan_in(name)
            variances.setdefault((kind.layer, kind.role), []).append((name, s.std ** 2 * (fan_in or 1), bool(fan_in)))
        inits = layout.inits(name, tensor.shape)
        untrained = _untrained(inits, s) if inits and s.buckets is not None else None
        if untrained is not None:
            findings.append(Finding("untrained", name, *untrained))
    for (layer, role), group in variances.items():
        findings += _exploding(layer, role, group)
    findings += _quantized(ckpt, list(stats), stats if selected is None else selected)
    order = {name: i for i, name in enumerate(ckpt.tensors)}
    return sorted(findings, key=lambda f: (RULES.index(f.rule), order.get(f.name, len(order))))


def _quantized(ckpt: Checkpoint, names: list[str], selected) -> list[Finding]:
    """``scale``: quantized weights among ``names`` with a scale that is NaN, Inf, zero or negative;
    ``orphan``: each group among ``selected`` whose parts do not make one (named when read)."""
    tensors, chosen = ckpt.tensors, set(selected)
    findings = []
    for name in names:
        tensor = tensors[name]
        problem = tensor.scheme.scale_problem(tensor, name) if type(tensor) is Quantized else None
        if problem:
            findings.append(Finding("scale", name, None, None, f"({tensor.scheme.name}): {problem}"))
    for scheme, parts, why in ckpt.partial:
        if any(n in chosen for n in parts):
            others = f"(with {', '.join(parts[1:])}) " if len(parts) > 1 else ""
            findings.append(Finding("orphan", parts[0], None, None, f"{others}is orphaned: {why} ({scheme})"))
    return findings


def _spike(name: str, peak: float, p99: float) -> Finding:
    ratio = peak / p99
    threshold, severity = (SPIKE_FAILS, "fail") if ratio >= SPIKE_FAILS else (SPIKE, "warning")
    return Finding("spike", name, ratio, threshold, f"max |x| {peak:g} is {ratio:.0f}x the 99th percentile of |x|"
                   f" ({p99:.3g}; >= {SPIKE:g}x warns, >= {SPIKE_FAILS:g}x fails)", severity)


def _exploding(layer: str, role: str, group: list[tuple[str, float, bool]]) -> list[Finding]:
    """The tensors of one kind and role whose (fan-in-normalised) variance is 10x their median."""
    median = statistics.median(v for _, v, _ in group)
    found = []
    for name, variance, scaled in group:
        if median > 0 and variance >= EXPLODING * median:
            what = "variance x fan-in" if scaled else "variance"
            ratio = variance / median
            times = f"{ratio:.0f}" if ratio < 1e6 else f"{ratio:.2g}"  # not 57 digits for a diverged tensor
            found.append(Finding("exploding", name, ratio, EXPLODING,
                                 f"{what} {variance:.3g} is {times}x the median of the {len(group)}"
                                 f" {layer} {role} tensors ({median:.3g}; >= {EXPLODING:g}x)", "warning"))
    return found


def quantized(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` holds quantized weights or parts of them (the rules of QUANTIZED apply)."""
    return bool(ckpt.partial) or any(type(t) is Quantized for t in ckpt.tensors.values())


def strict(findings: list[Finding]) -> list[Finding]:
    """``findings`` with every warning made to fail (--strict)."""
    return [replace(f, severity="fail") for f in findings]


def _flat(spread) -> bool:
    """Whether values kept exactly (a tensor of up to 65,536) are flatter than a normal sample ever
    is: excess kurtosis (about 0) below -6 standard errors, sqrt(24/n) (a fresh normal's left tail is
    short: never in 20,000 draws of any size below -3.1). Adam's sign-like steps flatten the values."""
    values = getattr(spread, "values", None)
    if values is None or values.numel() < 8:
        return False
    squares = values.square()
    m2 = float(squares.mean())
    return m2 > 0 and (float(squares.square().mean()) / m2 ** 2 - 3) / math.sqrt(24 / values.numel()) < FLAT


def _untrained(inits: tuple[Init, ...], s: Stats) -> tuple[float, float, str] | None:
    """(statistic, threshold, message) when the values look like a fresh ``inits``, else None."""
    n = s.buckets.count
    flat = _flat(s.buckets)
    for init in inits:  # the first that fits: PyTorch's default first, the rarer ones after
        if not _possible(init, s, n) or (flat and not init.uniform):
            continue
        distance = math.sqrt(n) * s.buckets.ks_distance(init.cdf)
        if distance <= UNTRAINED_KS:
            outside = ", no value outside the bound" if init.uniform else ""
            return distance, UNTRAINED_KS, (f"looks freshly initialised: {init.label} (KS sqrt(n)*D = {distance:.2f}"
                                            f" <= {UNTRAINED_KS:g}{outside})")
    return None


def parse_ignores(specs: list[str], names: list[str] | None = None, key: tuple = ()) -> list[tuple[str, str]]:
    """(rule, glob) of each ``--ignore RULE[:GLOB]`` (GLOB default '*'). A rule that does not exist is
    a UsageError; with ``names`` (the tensors checked), a GLOB that matches none of them a
    SelectionError with suggestions, as for any option that takes names."""
    parsed, problems = [], []
    for spec in specs:
        rule, _, glob = spec.partition(":")
        if rule not in RULES:
            close = difflib.get_close_matches(rule, RULES, 1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"--ignore '{spec}': no rule '{rule}'{hint}; rules are {', '.join(RULES)}")
        parsed.append((rule, glob or "*"))
        if names is not None and glob:
            problems += [f"--ignore '{spec}': {p}" for p in unmatched(names, [glob], "its glob", key)]
    if problems:
        raise SelectionError("; ".join(problems))
    return parsed


def ignored(findings: list[Finding], ignores: list[tuple[str, str]]) -> list[Finding]:
    """``findings`` without those of a rule on a tensor some (rule, glob) of ``ignores`` names."""
    return [f for f in findings if not any(f.rule == rule and matches(f.name, glob) for rule, glob in ignores)]
