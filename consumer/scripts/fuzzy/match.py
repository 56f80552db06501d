"""Find the choices closest to a query string with rapidfuzz.

Returns {"matches": [{"choice": str, "score": float, "index": int}, ...]}, best first; score is
0-100 and index the choice's position in choices.
"""

from typing import Annotated, Any, Literal

from msgspec import Meta
from rapidfuzz import fuzz, process, utils


class Input:
    query: Annotated[str, Meta(max_length=10_000)]  # the string to look for
    choices: Annotated[list[str], Meta(max_length=100_000)]  # the strings to search
    # ratio: whole strings; partial_ratio: the best matching part of the longer one;
    # token_sort_ratio / token_set_ratio: words in any order / words in common;
    # WRatio: a weighted mix of them; QRatio: ratio, 0 when either string is empty.
    scorer: Literal[
        "ratio", "partial_ratio", "token_sort_ratio", "token_set_ratio", "WRatio", "QRatio"
    ] = "WRatio"
    limit: Annotated[int, Meta(ge=1, le=1000)] = 5  # at most this many matches
    score_cutoff: Annotated[float, Meta(ge=0, le=100)] = 0  # leave out matches scoring less
    # default_process: lowercase, non-alphanumerics to spaces, trimmed; none: compare as given
    processor: Literal["default_process", "none"] = "default_process"


SCORERS = {
    "ratio": fuzz.ratio,
    "partial_ratio": fuzz.partial_ratio,
    "token_sort_ratio": fuzz.token_sort_ratio,
    "token_set_ratio": fuzz.token_set_ratio,
    "WRatio": fuzz.WRatio,
    "QRatio": fuzz.QRatio,
}
PROCESSORS = {"default_process": utils.default_process, "none": None}


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    found = process.extract(
        ctx["query"],
        ctx["choices"],
        scorer=SCORERS[ctx["scorer"]],
        processor=PROCESSORS[ctx["processor"]],
        limit=ctx["limit"],
        score_cutoff=ctx["score_cutoff"],
    )
    matches = [
        {"choice": choice, "score": round(score, 2), "index": index}
        for choice, score, index in found
    ]
    return {"matches": matches}
