"""Warm-parent tiers: which modules each tier's parent imports, and which tier a script needs.

A fork costs in proportion to the parent's memory: page tables are copied at the fork and torn
down at the exit. A script that imports nothing but the standard library has no use for a
parent with pandas and numpy imported, so the pool keeps a small ``stdlib`` parent beside the
``full`` one and sends each run to the smallest parent whose preload covers what the script
imports. The imports are read from the script's text (every ``import`` and ``from ... import``
statement, wherever it is, including in functions never called); an import the scan misses
still works, loaded on demand in the child.
"""

from __future__ import annotations

import re
import sys
from collections import OrderedDict
from typing import Literal

from sandbox.compiler import source_key
from sandbox.config import PoolConfig

Tier = Literal["stdlib", "full"]
TIER_ORDER: tuple[Tier, ...] = ("stdlib", "full")  # smallest first
ROUTES_KEPT = 4096


def preload_for(tier: Tier, config: PoolConfig) -> tuple[str, ...]:
    """The allowed modules a tier's warm parent imports before it forks."""
    if not config.preload:
        return ()
    if tier == "stdlib":
        return tuple(name for name in config.allowed_modules if name in sys.stdlib_module_names)
    return config.allowed_modules


def tiers_of(config: PoolConfig) -> tuple[Tier, ...]:
    """The tiers a pool keeps, smallest first. Without a preload one parent is enough."""
    if not config.preload:
        return ("full",)
    tiers = tuple(tier for tier in TIER_ORDER if tier in config.tiers)
    if not tiers:
        raise ValueError(f"no warm-parent tier among {config.tiers!r}: use 'stdlib', 'full'")
    return tiers


def imported_modules(source: str) -> frozenset[str]:
    """The top-level modules ``source``'s import statements name.

    A scan of the text, not a parse: parsing a large script takes long enough to stall the
    caller's event loop, and the answer only picks a parent. It errs on the safe side: a word
    ``import`` in a string or comment may add a name (the run then goes to a larger parent,
    which works); an import it misses (split over lines with a backslash) is loaded on demand.
    """
    names: set[str] = set()
    # "from a.b import c, d" names a; the names after its import are not modules.
    for match in _FROM.finditer(source):
        if _starts_a_word(source, match.start()):
            names.add(match.group(1))
    rest = _FROM.sub(" ", source)
    for match in _IMPORT.finditer(rest):
        if not _starts_a_word(rest, match.start()):
            continue
        for item in match.group(1).split(","):
            name = item.strip().split(" ", 1)[0].partition(".")[0]
            if name.isidentifier():
                names.add(name)
    return frozenset(names)


def _starts_a_word(text: str, at: int) -> bool:
    return at == 0 or not (text[at - 1].isalnum() or text[at - 1] in "_.")


# Both start with a literal, which keeps the scan of a large script fast (a leading \b does not).
_FROM = re.compile(r"from[ \t]+([A-Za-z_]\w*)[\w.]*[ \t]+import\b")
_IMPORT = re.compile(r"import[ \t]+([^\n;#()]+)")


class Router:
    """Picks the tier for each script, remembering the answer for recent sources."""

    def __init__(self, config: PoolConfig, tiers: tuple[Tier, ...]) -> None:
        self.tiers = tiers
        self._preloads = {tier: frozenset(preload_for(tier, config)) for tier in tiers}
        self._routes: OrderedDict[str, Tier] = OrderedDict()
        smallest = self._preloads[tiers[0]]
        self._larger_only = sorted(
            {name for preload in self._preloads.values() for name in preload} - smallest
        )

    def tier_for(self, source: str, *, live: frozenset[Tier] | None = None) -> Tier:
        """The smallest tier whose preload covers the script's imports (of those ``live``, when
        given and not empty: a tier that is down sends its runs to a larger one)."""
        key = source_key(source)
        tier = self._routes.get(key)
        if tier is None:
            tier = self._route(source)
            self._routes[key] = tier
            while len(self._routes) > ROUTES_KEPT:
                self._routes.popitem(last=False)
        else:
            self._routes.move_to_end(key)
        if live is None or tier in live or not live:
            return tier
        larger = [t for t in self.tiers[self.tiers.index(tier) :] if t in live]
        return larger[0] if larger else tier

    def _route(self, source: str) -> Tier:
        # Cheap first: a script that does not even mention a module only a larger tier has
        # preloaded needs the smallest (an import names its module literally).
        if not any(name in source for name in self._larger_only):
            return self.tiers[0]
        imports = imported_modules(source)
        if not imports:
            return self.tiers[0]
        for tier in self.tiers:
            preload = self._preloads[tier]
            if all(name in preload or self._nowhere(name) for name in imports):
                return tier
        return self.tiers[-1]

    def _nowhere(self, name: str) -> bool:
        """A module no tier preloads (refused, or loaded on demand): it needs no larger tier."""
        return not any(name in preload for preload in self._preloads.values())
