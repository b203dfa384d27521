"""Selecting tensors: globs, regular expressions, exclusions and layer kinds -> names.

A glob or regex matches the whole dotted name (``*`` crosses dots). A tensor is selected
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
            problems.append(f"--regex '{text}' matches no tensor{suggest(text, names, key)}")
    for wanted in selector.kinds:
        if not any(kinds[n].matches(wanted) for n in names):
            problems.append(f"--kind {wanted} matches no tensor (run 'paramsurgeon inspect' to see each tensor's kind)")
    if not selector.narrows:
        picked = names
    elif selector.patterns and not regexes and not selector.kinds:  # globs alone: one compiled regex for them all
        glob = re.compile("|".join(fnmatch.translate(p) for p in selector.patterns)).fullmatch
        picked = [n for n in names if glob(n)]
    else:
        picked = [n for n in names if _picked(n, selector, regexes, kinds)]
    if picked:
        problems += _idle_excludes(names, picked, selector.excludes, key)
    chosen = [n for n in picked if not any(fnmatch.fnmatchcase(n, x) for x in selector.excludes)] \
        if selector.excludes else picked
    if not chosen and not problems:
        problems.append("the selection is empty (every match is excluded or has another kind)")
    if problems and not allow_empty:
        raise SelectionError("; ".join(problems) + "; pass --allow-empty to go on anyway")
    return chosen, problems


def unmatched(names: list[str], globs: Iterable[str], option: str, key: tuple = ()) -> list[str]:
    """A message for each glob of ``option`` that matches none of ``names``, with suggestions."""
    return [f"{option} '{glob}' matches no tensor{suggest(glob, names, key)}" for glob in globs
            if not any(fnmatch.fnmatchcase(n, glob) for n in names)]


def _idle_excludes(names: list[str], picked: list[str], excludes: list[str], key: tuple) -> list[str]:
    """A message for each exclusion that leaves out none of the ``picked`` names."""
    problems = []
    for glob in excludes:
        if any(fnmatch.fnmatchcase(n, glob) for n in picked):
            continue
        elsewhere = [n for n in names if fnmatch.fnmatchcase(n, glob)]
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
        if not (any(fnmatch.fnmatchcase(name, p) for p in selector.patterns)
                or any(r.fullmatch(name) for r in regexes)):
            return False
    return not selector.kinds or kinds[name].matches_all(selector.kinds)


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
    scored = sorted(names, key=lambda n: -difflib.SequenceMatcher(None, pattern, n).ratio())
    close = [n for n in scored[:3] if difflib.SequenceMatcher(None, pattern, n).ratio() >= 0.5]
    return f"; closest names: {', '.join(close)}" if close else ""


def _prefixed(pattern: str, names: list[str]) -> str | None:
    """The module prefix ('model.') under which ``pattern`` would match, when one prefix takes them all."""
    prefixes = {name[:i + 1] for name in names for i, c in enumerate(name)
                if c == "." and fnmatch.fnmatchcase(name[i + 1:], pattern)}
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
    """
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
