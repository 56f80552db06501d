"""Group near-duplicate strings with rapidfuzz.

Returns {"groups": [{"members": [str, ...], "indices": [int, ...]}, ...], "distinct": int}:
groups in the order of their first member, members in input order; "distinct" counts the
strings left after merging each group into one.
"""

from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy
from msgspec import Meta
from rapidfuzz import fuzz, process, utils


class Input:
    strings: Annotated[list[str], Meta(max_length=5000)]  # compared pairwise: O(n²)
    threshold: Annotated[float, Meta(ge=0, le=100)] = 90  # a pair scoring at least this matches
    scorer: Literal[
        "ratio", "partial_ratio", "token_sort_ratio", "token_set_ratio", "WRatio", "QRatio"
    ] = "token_sort_ratio"
    # default_process: lowercase, non-alphanumerics to spaces, trimmed; none: compare as given
    processor: Literal["default_process", "none"] = "default_process"
    singletons: bool = False  # list strings without a duplicate as groups of one too


SCORERS = {
    "ratio": fuzz.ratio,
    "partial_ratio": fuzz.partial_ratio,
    "token_sort_ratio": fuzz.token_sort_ratio,
    "token_set_ratio": fuzz.token_set_ratio,
    "WRatio": fuzz.WRatio,
    "QRatio": fuzz.QRatio,
}
BLOCK = 256  # rows scored per rapidfuzz call: 256 × 5000 float32 scores are 5 MB


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    strings = ctx["strings"]
    if ctx["processor"] == "default_process":
        compared = [utils.default_process(s) for s in strings]  # once, not once per pair
    else:
        compared = strings
    group_of = group_by_leader(compared, SCORERS[ctx["scorer"]], ctx["threshold"])
    members: dict[int, list[int]] = {}
    for index, leader in enumerate(group_of):
        members.setdefault(leader, []).append(index)
    groups = [
        {"members": [strings[i] for i in indices], "indices": indices}
        for indices in members.values()
        if len(indices) > 1 or ctx["singletons"]
    ]
    return {"groups": groups, "distinct": len(members)}


def group_by_leader(
    compared: list[str], scorer: Callable[..., float], threshold: float
) -> list[int]:
    """For each string, the index of its group's first string (its leader).

    In input order, a string not yet in a group starts one and takes in every later string
    not yet in a group that scores at least threshold against it. A string joins the group of
    the first such leader only, so groups do not chain (a ~ b and b ~ c does not merge a and
    c unless c matches a).
    """
    n = len(compared)
    group_of = numpy.full(n, -1)
    for start in range(0, n, BLOCK):
        rows = [i for i in range(start, min(start + BLOCK, n)) if group_of[i] < 0]
        if not rows:
            continue
        scores = process.cdist(
            [compared[i] for i in rows],
            compared[start:],
            scorer=scorer,
            score_cutoff=threshold,
            dtype=numpy.float32,
        )
        for row, i in enumerate(rows):
            if group_of[i] >= 0:
                continue  # taken in by a leader earlier in this block
            group_of[i] = i
            later = numpy.flatnonzero(scores[row, i - start + 1 :] >= threshold) + i + 1
            later = later[group_of[later] < 0]
            group_of[later] = i
    return [int(leader) for leader in group_of]
