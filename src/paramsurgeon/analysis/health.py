"""Diagnostics for weights that look wrong (check --health, report), on floating-point
parameters only (buffers such as running_var are not weights).

    nonfinite  any NaN or Inf                                               fails
    dead       >= 99.99% of the values are exactly zero                     fails
    constant   every value equal, and not zero (more than one value)        warning
    spike      max |x| / 99th percentile of |x| >= 100                      fails
    exploding  variance >= 10x the median variance of tensors of the same
               kind and role (conv weights with conv weights, ...)         warning
    untrained  a conv/linear weight indistinguishable from a fresh init     fails

``untrained`` compares the values with PyTorch's default initialisation for the weight's
shape, kaiming_uniform(a=sqrt(5)) = uniform within +-1/sqrt(fan_in), and with normal(0, 0.02):
it fires when the Kolmogorov-Smirnov statistic sqrt(n)*D is at most 3 (a fresh init exceeds
that with probability 3e-8) and, for the uniform, when no value lies outside the bound (a
fresh uniform never does; training moves the values at the edges out, almost surely), for the
normal, when the std is within 8 standard errors of 0.02.

The statistics decide first, for free, whether a rule could fire; only then are the values'
spread counted (from the chunk still in memory: never a second read).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

from ..checkpoint import Checkpoint
from ..checkpoint.kinds import infer_kinds
from .stats import Stats, tensor_stats
from ..sizes import plural

FAILING = ("nonfinite", "dead", "spike", "untrained")
RULES = ("nonfinite", "dead", "constant", "spike", "exploding", "untrained")
DEAD = 0.9999
SPIKE = 100.0
EXPLODING = 10.0
UNTRAINED_KS = 3.0
NORMAL_STD = 0.02


@dataclass
class Finding:
    """One rule broken by one tensor: the measured value against the threshold."""

    rule: str
    name: str
    value: float | None
    threshold: float | None
    message: str

    @property
    def fails(self) -> bool:
        return self.rule in FAILING

    def as_dict(self) -> dict:
        return {"rule": self.rule, "name": self.name, "severity": "fail" if self.fails else "warning",
                "value": self.value, "threshold": self.threshold, "message": self.message}


def checked_names(ckpt: Checkpoint, names: list[str]) -> list[str]:
    """The floating-point parameters among ``names`` (buffers and integer tensors are not weights)."""
    kinds = infer_kinds(ckpt.tensors)
    return [n for n in names if ckpt.tensors[n].dtype.floating and kinds[n].role != "buffer"]


def measure(ckpt: Checkpoint, names: list[str], bins: int | None = None, drawn: set[str] | None = None,
            progress: Callable[[int], None] | None = None) -> dict[str, Stats]:
    """Statistics of ``names``, each read once, with the spread of the values wherever a rule may
    need it (see ``_needs_spread``), and histograms of ``bins`` bins: of every tensor, or with
    ``drawn``, of those and of any tensor the statistics say may have a finding."""
    kinds = infer_kinds(ckpt.tensors)
    result = {}
    for name in names:
        tensor = ckpt.tensors[name]
        histogram = bins if drawn is None or name in drawn or not bins else \
            (lambda s: bins if _suspect(tensor.shape, kinds[name], s) else None)
        result[name] = tensor_stats(tensor, bins=histogram,
                                    buckets=lambda s: _needs_spread(tensor.shape, kinds[name], s))
        if progress is not None:
            progress(tensor.nbytes)
    return result


def _needs_spread(shape: tuple[int, ...], kind, s: Stats) -> bool:
    """Whether spike or untrained could fire, from the statistics alone (else the values need no
    second look): a spike needs most of the energy in 1% of the values, an init its bound or std."""
    if s.nan or s.inf or not s.abs_max:
        return False
    n = math.prod(shape)
    return _spike_possible(s, n) or (_weight(shape, kind) and (
        s.abs_max <= _bound(shape) * (1 + 1e-6) or _near_normal(s, n)))


def _suspect(shape: tuple[int, ...], kind, s: Stats) -> bool:
    """Whether any rule but exploding (which needs every tensor) could fire on these statistics."""
    n = math.prod(shape)
    return bool(s.nan or s.inf or s.zeros >= DEAD * n or s.min == s.max or _needs_spread(shape, kind, s))


def _spike_possible(s: Stats, n: int) -> bool:
    """max / p99 >= 100 needs all but K values within max/100 (p99 the order statistic
    floor(0.99 (n-1))), so a sum of squares above what that allows rules a spike out."""
    few = n - math.floor(0.99 * (n - 1)) - 1
    squares = (n - 1) * (s.std or 0.0) ** 2 + n * s.mean ** 2
    return squares <= ((n - few) * (s.abs_max / SPIKE) ** 2 + few * s.abs_max ** 2) * (1 + 1e-6)


def _weight(shape: tuple[int, ...], kind) -> bool:
    return kind.layer in ("conv", "linear") and kind.role == "weight" and len(shape) >= 2


def _bound(shape: tuple[int, ...]) -> float:
    return 1 / math.sqrt(fan_in(shape))


def _near_normal(s: Stats, n: int) -> bool:
    """The std of normal(0, 0.02) values, within 8 standard errors (a fresh init: always)."""
    return s.std is not None and abs(s.std / NORMAL_STD - 1) <= 8 / math.sqrt(2 * n)


def diagnose(ckpt: Checkpoint, stats: dict[str, Stats]) -> list[Finding]:
    """Every finding on the tensors of ``stats`` (from ``measure``), in file order, by rule."""
    kinds = infer_kinds(ckpt.tensors)
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
            findings.append(Finding("constant", name, s.min, None, f"every value is {s.min:g}"))
        p99 = s.buckets.abs_quantile(0.99) if s.buckets is not None and _spike_possible(s, tensor.numel) else None
        if p99 and s.abs_max / p99 >= SPIKE:
            findings.append(Finding("spike", name, s.abs_max / p99, SPIKE, f"max |x| {s.abs_max:g} is"
                                    f" {s.abs_max / p99:.0f}x the 99th percentile of |x| ({p99:.3g}; >= {SPIKE:g}x)"))
        if s.std is not None:
            variances.setdefault((kinds[name].layer, kinds[name].role), []).append((name, s.std ** 2))
        untrained = _untrained(tensor.shape, s) if _weight(tensor.shape, kinds[name]) and s.buckets is not None \
            else None
        if untrained is not None:
            findings.append(Finding("untrained", name, *untrained))
    for (layer, role), group in variances.items():
        median = statistics.median(v for _, v in group)
        for name, variance in group:
            if median > 0 and variance >= EXPLODING * median:
                findings.append(Finding("exploding", name, variance / median, EXPLODING,
                                        f"variance {variance:.3g} is {variance / median:.0f}x the median of the"
                                        f" {len(group)} {layer} {role} tensors ({median:.3g}; >= {EXPLODING:g}x)"))
    order = {name: i for i, name in enumerate(stats)}
    return sorted(findings, key=lambda f: (RULES.index(f.rule), order[f.name]))


def fan_in(shape: tuple[int, ...]) -> int:
    """As torch.nn.init computes it: input channels times the receptive field."""
    return shape[1] * math.prod(shape[2:])


def _untrained(shape: tuple[int, ...], s: Stats) -> tuple[float, float, str] | None:
    """(statistic, threshold, message) when the values look like a fresh init, else None."""
    n = s.buckets.count
    bound = _bound(shape)
    uniform = math.sqrt(n) * s.buckets.ks_distance(lambda t: ((t + bound) / (2 * bound)).clamp(0, 1))
    if uniform <= UNTRAINED_KS and s.abs_max <= bound * (1 + 1e-6):
        return uniform, UNTRAINED_KS, (f"looks freshly initialised: kaiming_uniform(a=sqrt(5)), uniform within"
                                       f" +-{bound:.3g} = 1/sqrt({fan_in(shape)}) (KS sqrt(n)*D = {uniform:.2f}"
                                       f" <= {UNTRAINED_KS:g}, no value outside the bound)")
    if not _near_normal(s, n):
        return None
    normal = math.sqrt(n) * s.buckets.ks_distance(lambda t: 0.5 * (1 + (t / (NORMAL_STD * math.sqrt(2))).erf()))
    if normal <= UNTRAINED_KS:
        return normal, UNTRAINED_KS, (f"looks freshly initialised: normal(0, {NORMAL_STD}) (KS sqrt(n)*D ="
                                      f" {normal:.2f} <= {UNTRAINED_KS:g})")
    return None
