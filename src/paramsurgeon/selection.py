"""Selecting tensors: globs, regular expressions, exclusions and layer kinds -> names.

A glob or regex matches the whole dotted name (``*`` crosses dots). A glob may hold
numeric ranges and alternatives, expanded as a shell expands them: ``layers.{20..23}.*``
is four globs, ``*.{q,k,v}_proj.weight`` three; each must match a tensor. A tensor is selected
when it matches any pattern or regex (every tensor when none is given), has one of the
layer kinds and one of the roles asked for (each family when given), and matches no
exclusion. A pattern that matches nothing, or an exclusion that takes nothing out of the
selection, is an error that suggests the closest names: a typo in CI must not pass silently.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Mapping

from .checkpoint import Tensor
from .declare import option
from .errors import SelectionError, UsageError
from .checkpoint.kinds import KINDS, ROLES, Kind, infer_kinds


@dataclass
class Selector:
    """What the user asked for with -p/--regex/-x/-k."""

    patterns: list[str] = field(default_factory=list)
    regexes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    @property
    def narrows(self) -> bool:
        """Whether anything beyond 'every tensor' was asked for."""
        return bool(self.patterns or self.regexes or self.kinds)


def select(tensors: Mapping[str, Tensor], selector: Selector, *, allow_empty: bool = False,
           kinds: Mapping[str, Kind] | None = None, key: tuple = ()) -> tuple[list[str], list[str]]:
    """The selected names in checkpoint order, and warnings (with ``allow_empty``).

    Raises SelectionError for a pattern, regex or kind that matches nothing, and for an
    exclusion that leaves out none of the tensors the other selectors picked.
    """
    names = list(tensors)
    regexes = _compile(selector.regexes)
    bad_kinds = [k for k in selector.kinds if k not in KINDS + ROLES]
    if bad_kinds:
        raise UsageError(f"--kind {', '.join(bad_kinds)}: unknown kind{'s' if len(bad_kinds) > 1 else ''};"
                         f" choose layer kinds from {', '.join(KINDS)} and roles from {', '.join(ROLES)}")
    kinds = kinds if kinds is not None else (infer_kinds(tensors) if selector.kinds else {})
    problems = unmatched(names, selector.patterns, "--pattern", key)
    for text, regex in zip(selector.regexes, regexes):
        if not any(regex.fullmatch(n) for n in names):
            problems.append(f"--regex '{text}' matches no tensor{_suggest_regex(text, regex, names)}")
    for wanted in selector.kinds:
        if not any(kinds[n].matches(wanted) for n in names):
            problems.append(f"--kind {wanted} matches no tensor (run 'paramsurgeon inspect' to see each tensor's kind)")
    if not selector.narrows:
        picked = names
    elif selector.patterns and not regexes and not selector.kinds:  # globs alone: one compiled regex for them all
        glob = re.compile("|".join(_glob_regex(p).pattern for p in selector.patterns)).fullmatch
        picked = list(filter(glob, names))
    else:
        picked = [n for n in names if _picked(n, selector, regexes, kinds)]
    if picked:
        problems += _idle_excludes(names, picked, selector.excludes, key)
    chosen = [n for n in picked if not any(matches(n, x) for x in selector.excludes)] \
        if selector.excludes else picked
    if not chosen and not problems:
        problems.append("the selection is empty (every match is excluded or has another kind)")
    if problems and not allow_empty:
        raise SelectionError("; ".join(problems) + "; pass --allow-empty to go on anyway")
    return chosen, problems


def unmatched(names: list[str], globs: Iterable[str], option: str, key: tuple = ()) -> list[str]:
    """A message for each glob of ``option`` that matches none of ``names`` (for a glob with braces,
    each of its expansions that matches none), with suggestions."""
    problems = []
    for glob in globs:
        idle = [g for g in expand(glob) if next(filter(_glob_regex(g).match, names), None) is None]  # a pass in C
        if len(idle) == 1 and idle[0] == glob:
            problems.append(f"{option} '{glob}' matches no tensor{suggest(glob, names, key)}")
        elif idle:
            shown = ", ".join(f"'{g}'" for g in idle[:4]) + (f" and {len(idle) - 4} more" if len(idle) > 4 else "")
            problems.append(f"{option} '{glob}': {shown} match{'es' if len(idle) == 1 else ''} no tensor"
                            f"{suggest(idle[0], names, key)}")
    return problems


def _idle_excludes(names: list[str], picked: list[str], excludes: list[str], key: tuple) -> list[str]:
    """A message for each exclusion that leaves out none of the ``picked`` names."""
    problems = []
    for glob in excludes:
        if any(matches(n, glob) for n in picked):
            idle = [g for g in expand(glob) if not any(matches(n, g) for n in picked)]
            if idle:
                problems.append(f"--exclude '{glob}': {', '.join(repr(g) for g in idle[:4])}"
                                f"{' and more' if len(idle) > 4 else ''} exclude{'s' if len(idle) == 1 else ''}"
                                " nothing")
            continue
        elsewhere = [n for n in names if matches(n, glob)]
        if elsewhere:
            shown = ", ".join(elsewhere[:3]) + (", ..." if len(elsewhere) > 3 else "")
            problems.append(f"--exclude '{glob}' excludes nothing: it matches {len(elsewhere)}"
                            f" tensor{'s' if len(elsewhere) > 1 else ''} ({shown}) but none of the selected ones")
        else:
            problems.append(f"--exclude '{glob}' matches no tensor{suggest(glob, picked, key)}")
    return problems


def _picked(name: str, selector: Selector, regexes: list[re.Pattern], kinds: Mapping[str, Kind]) -> bool:
    """Whether the patterns, regexes and kinds pick ``name`` (before exclusions)."""
    if selector.patterns or regexes:
        if not (any(matches(name, p) for p in selector.patterns)
                or any(r.fullmatch(name) for r in regexes)):
            return False
    return not selector.kinds or kinds[name].matches_all(selector.kinds)


MAX_EXPANSIONS = 10_000
_BRACE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")


def expand(glob: str) -> list[str]:
    """The globs a glob with braces stands for, in order, as a shell expands them:
    ``{20..23}`` is 20, 21, 22, 23 (``{23..20}`` counts down, ``{0..10..5}`` steps, ``{01..10}``
    keeps the width), ``{q,k,v}`` each alternative; braces nest and combine left to right.
    A brace with neither a comma nor a range, or inside ``[...]``, is literal."""
    found = _first_brace(glob)
    if found is None:
        return [glob]
    start, end, items = found
    result: list[str] = []
    for item in items:
        for rest in expand(glob[:start] + item + glob[end + 1:]):
            result.append(rest)
            if len(result) > MAX_EXPANSIONS:
                raise UsageError(f"'{glob}' expands to more than {MAX_EXPANSIONS:,} globs; narrow its ranges")
    return result


def _first_brace(glob: str) -> tuple[int, int, list[str]] | None:
    """(start, end, alternatives) of the first expandable {...} of ``glob``, or None."""
    i, in_set = 0, False
    while i < len(glob):
        c = glob[i]
        if in_set:
            in_set = c != "]"
        elif c == "[":
            in_set = True
            i += 1 if glob[i + 1:i + 2] in ("!", "]") else 0
            i += 1 if glob[i + 1:i + 2] == "]" else 0
        elif c == "{":
            end = _closing(glob, i)
            if end is not None:
                items = _alternatives(glob[i:end + 1])
                if items is not None:
                    return i, end, items
        i += 1
    return None


def _closing(glob: str, start: int) -> int | None:
    depth = 0
    for j in range(start, len(glob)):
        depth += {"{": 1, "}": -1}.get(glob[j], 0)
        if depth == 0:
            return j
    return None


def _alternatives(brace: str) -> list[str] | None:
    """The items of '{a,b}' or '{1..3}' (None: not an expansion, a literal brace)."""
    ranged = _BRACE.fullmatch(brace)
    if ranged:
        first, last, step = ranged.group(1), ranged.group(2), ranged.group(3)
        a, b, by = int(first), int(last), abs(int(step or 1)) or 1
        if (b - a) // by + 1 > MAX_EXPANSIONS:
            raise UsageError(f"'{brace}' is a range of more than {MAX_EXPANSIONS:,} numbers; narrow it")
        width = max(len(first.lstrip("-")), len(last.lstrip("-"))) \
            if any(s.lstrip("-").startswith("0") and len(s.lstrip("-")) > 1 for s in (first, last)) else 0
        numbers = range(a, b + 1, by) if a <= b else range(a, b - 1, -by)
        return [f"{'-' if n < 0 else ''}{abs(n):0{width}d}" for n in numbers]
    body, items, depth, current = brace[1:-1], [], 0, ""
    for c in body:
        if c == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        current += c
    return items + [current] if items else None


@lru_cache(maxsize=1024)
def _glob_regex(glob: str) -> re.Pattern:
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in expand(glob)))


def matches(name: str, glob: str) -> bool:
    """Whether ``glob`` (braces expanded) matches the whole of ``name``."""
    return _glob_regex(glob).match(name) is not None


def _compile(regexes: list[str]) -> list[re.Pattern]:
    compiled, problems = [], []
    for text in regexes:
        try:
            compiled.append(re.compile(text))
        except re.error as e:
            problems.append(f"--regex '{text}' is not a valid regular expression: {e}")
    if problems:
        raise UsageError("; ".join(problems))
    return compiled


def suggest(pattern: str, names: list[str], key: tuple = ()) -> str:
    """'; did you mean ...' with the closest names, or '' when nothing is close."""
    prefix = ".".join(map(str, key))
    if prefix and pattern.startswith(prefix + "."):
        return f"; names are relative to '{prefix}', so drop that prefix: '{pattern[len(prefix) + 1:]}'"
    if not any(c in pattern for c in "*?[") and any(n.startswith(pattern + ".") for n in names):
        return f"; a pattern matches whole names, did you mean '{pattern}.*'?"
    prefixed = _prefixed(pattern, names)
    if prefixed:
        return f"; did you mean '{prefixed}{pattern}'? (every match is under '{prefixed}')"
    parts = {part for name in names for part in name.split(".")}
    for piece in pattern.split("."):
        if piece and not any(c in piece for c in "*?[") and piece not in parts:
            close = difflib.get_close_matches(piece, sorted(parts), n=1, cutoff=0.7)
            if close:
                return f"; no name has a part '{piece}': did you mean '{close[0]}'?"
    return _closest(pattern, names)


def _suggest_regex(text: str, regex: re.Pattern, names: list[str]) -> str:
    """What to try when a --regex matches no whole name: most often it matches the start or a part
    of names, as re.match or re.search would take it."""
    tail = "" if text.endswith(".*") else ".*"
    if any(map(regex.match, names)):
        return f"; a --regex must match the whole name (re.fullmatch), did you mean '{text}{tail}'?"
    if any(map(regex.search, names)):
        return f"; a --regex must match the whole name (re.fullmatch), did you mean '.*{text}{tail}'?"
    return _closest(text, names)


def _closest(pattern: str, names: list[str]) -> str:
    scored = sorted(names, key=lambda n: -difflib.SequenceMatcher(None, pattern, n).ratio())
    close = [n for n in scored[:3] if difflib.SequenceMatcher(None, pattern, n).ratio() >= 0.5]
    return f"; closest names: {', '.join(close)}" if close else ""


def _prefixed(pattern: str, names: list[str]) -> str | None:
    """The module prefix ('model.') under which ``pattern`` would match, when one prefix takes them all."""
    prefixes = {name[:i + 1] for name in names for i, c in enumerate(name)
                if c == "." and matches(name[i + 1:], pattern)}
    shortest = sorted(prefixes, key=len)
    return shortest[0] if shortest and all(p.startswith(shortest[0]) for p in shortest) else None


def _tokens(glob: str) -> list[tuple[str, str]]:
    """('lit', text) and ('wild', regex) pieces of a glob."""
    tokens, i = [], 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            tokens.append(("wild", "(.*)"))
        elif c == "?":
            tokens.append(("wild", "(.)"))
        elif c == "[" and "]" in glob[i + 2:] or glob[i:i + 2] == "[]":
            end = glob.index("]", i + 2) if glob[i + 1:i + 2] in ("!", "]") else glob.index("]", i + 1)
            body = glob[i + 1:end]
            body = "^" + body[1:] if body.startswith("!") else body
            tokens.append(("wild", f"([{body.replace(chr(92), chr(92) * 2)}])"))
            i = end
        else:
            tokens.append(("lit", re.escape(c)))
        i += 1
    return tokens


def wildcard_map(source_glob: str, target_glob: str, names: list[str], option: str = "--from/--to") -> dict[str, str]:
    """Map each name matching ``source_glob`` to ``target_glob`` with its wildcards filled in order.

    ``copy --from 'layer1.0.*' --to 'layer1.1.*'`` maps layer1.0.conv1.weight to layer1.1.conv1.weight.
    Braces expand on both sides and pair up in order: ``--from 'layers.{0..3}.*' --to
    'layers.{4..7}.*'`` maps layer 0 to 4, 1 to 5, ...; a ``--to`` without braces takes every
    expansion of ``--from``. A name that several expansions match maps by the first.
    """
    sources, targets = expand(source_glob), expand(target_glob)
    if len(targets) not in (1, len(sources)):
        raise UsageError(f"{option}: '{source_glob}' expands to {len(sources)} globs but '{target_glob}' to"
                         f" {len(targets)}; braces pair up in order, so they must expand to as many (or --to to one)")
    mapping: dict[str, str] = {}
    for source, target in zip(sources, targets * len(sources) if len(targets) == 1 else targets):
        for name, new in _map_one(source, target, names, option).items():
            mapping.setdefault(name, new)
    return mapping


def _map_one(source_glob: str, target_glob: str, names: list[str], option: str) -> dict[str, str]:
    """``wildcard_map`` of one glob without braces."""
    source = _tokens(source_glob)
    target = _tokens(target_glob)
    if any(kind == "wild" and text.startswith("([") for kind, text in target):
        raise UsageError(f"{option}: '{target_glob}' may use * and ? but not [sets]")
    wild_in, wild_out = sum(k == "wild" for k, _ in source), sum(k == "wild" for k, _ in target)
    if wild_in != wild_out:
        raise UsageError(f"{option}: '{source_glob}' has {wild_in} wildcards but '{target_glob}' has {wild_out};"
                         " they must have the same number")
    pattern = re.compile("".join(text for _, text in source), re.S)
    mapping = {}
    for name in names:
        match = pattern.fullmatch(name)
        if not match:
            continue
        groups = iter(match.groups())
        mapping[name] = "".join(next(groups) if kind == "wild" else re.sub(r"\\(.)", r"\1", text)
                                for kind, text in target)
    return mapping


@dataclass(kw_only=True)
class Selection:
    """The selection options, declared once for every command that selects tensors."""

    pattern: list[str] = option([], "-p", "--pattern", metavar="GLOB",
                                help="Select names matching the glob ('*' crosses dots); repeatable.")
    regex: list[str] = option([], "--regex", metavar="RE", help="Select names the regex matches in full; repeatable.")
    exclude: list[str] = option([], "-x", "--exclude", metavar="GLOB",
                                help="Leave out names matching the glob; repeatable.")
    kind: list[str] = option([], "-k", "--kind", metavar="KIND",
                             help="Select by layer kind: conv, linear, batchnorm, layernorm, groupnorm, rmsnorm, norm,"
                                  " embedding, prelu, rnn, unknown; or role: weight, bias, buffer, parameter."
                                  " Repeatable: kinds of one family combine with OR, the two families with AND.")
    allow_empty: bool = option(False, "--allow-empty", help="Warn instead of failing when a selector matches nothing.")

    @property
    def selector(self) -> Selector:
        return Selector(list(self.pattern), list(self.regex), list(self.exclude), list(self.kind))

    def choose(self, tensors: Mapping[str, Tensor], key: tuple = ()) -> tuple[list[str], list[str]]:
        """The selected names among ``tensors`` (every one when nothing narrows), and warnings."""
        return select(tensors, self.selector, allow_empty=self.allow_empty, key=key)
