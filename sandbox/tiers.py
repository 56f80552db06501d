"""Warm-parent tiers: which modules each tier's parent imports, and which tier a script needs.

A fork costs in proportion to the parent's memory: page tables are copied at the fork and torn
down at the exit. A script that imports nothing but the standard library has no use for a
parent with pandas and numpy imported, so the pool keeps a small ``stdlib`` parent beside the
``full`` one and sends each run to the smallest parent whose preload covers what the script
imports. The imports are read from the script's syntax tree (every ``import`` and ``from``
statement, wherever it is, including in functions never called); an import the tree does not
show (code a script builds and hands to ``exec``) still works, loaded on demand in the child.
"""

from __future__ import annotations

import ast
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


def imported_modules(source: str) -> frozenset[str] | None:
    """The top-level modules ``source``'s import statements name; None if it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return frozenset(names)


class Router:
    """Picks the tier for each script, remembering the answer for recent sources."""

    def __init__(self, config: PoolConfig, tiers: tuple[Tier, ...]) -> None:
        self.tiers = tiers
        self._preloads = {tier: frozenset(preload_for(tier, config)) for tier in tiers}
        self._routes: OrderedDict[str, Tier] = OrderedDict()

    def tier_for(self, source: str, *, live: frozenset[Tier] | None = None) -> Tier:
        """The smallest tier whose preload covers the script's imports (of those ``live``, when
        given and not empty: a tier that is down sends its runs to a larger one)."""
        key = source_key(source)
        tier = self._routes.get(key)
        if tier is None:
            tier = self._route(imported_modules(source))
            self._routes[key] = tier
            while len(self._routes) > ROUTES_KEPT:
                self._routes.popitem(last=False)
        else:
            self._routes.move_to_end(key)
        if live is None or tier in live or not live:
            return tier
        larger = [t for t in self.tiers[self.tiers.index(tier) :] if t in live]
        return larger[0] if larger else tier

    def _route(self, imports: frozenset[str] | None) -> Tier:
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
