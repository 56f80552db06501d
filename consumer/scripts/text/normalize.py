"""Normalize text: Unicode form, whitespace and case.

Returns {"text": str, "changed": bool}.
"""

import re
import unicodedata
from typing import Any, Literal


class Input:
    text: str  # the text to normalize
    form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFKC"  # Unicode normalization form
    case: Literal["keep", "lower", "upper", "casefold"] = "keep"
    collapse_whitespace: bool = True  # runs of whitespace become one space; ends trimmed


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    text = ctx["text"]
    form = ctx["form"]
    case = ctx["case"]
    result = unicodedata.normalize(form, text)
    if ctx["collapse_whitespace"]:
        result = re.sub(r"\s+", " ", result).strip()
    if case == "lower":
        result = result.lower()
    elif case == "upper":
        result = result.upper()
    elif case == "casefold":
        result = result.casefold()
    return {"text": result, "changed": result != text}
