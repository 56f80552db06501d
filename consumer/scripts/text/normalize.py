"""Normalize text: Unicode form, whitespace and case.

ctx:
    text (str, required): the text to normalize.
    form (str): Unicode normalization form, one of NFC, NFKC, NFD, NFKD (default NFKC).
    case (str): "keep" (default), "lower", "upper" or "casefold".
    collapse_whitespace (bool): turn runs of whitespace into one space and trim (default true).

Returns {"text": str, "changed": bool}.
"""

import re
import unicodedata

FORMS = ("NFC", "NFKC", "NFD", "NFKD")
CASES = ("keep", "lower", "upper", "casefold")


def execute(ctx):
    text = ctx.get("text")
    if not isinstance(text, str):
        raise ValueError("ctx.text must be a string")
    form = ctx.get("form", "NFKC")
    if form not in FORMS:
        raise ValueError(f"ctx.form must be one of {', '.join(FORMS)}")
    case = ctx.get("case", "keep")
    if case not in CASES:
        raise ValueError(f"ctx.case must be one of {', '.join(CASES)}")
    result = unicodedata.normalize(form, text)
    if ctx.get("collapse_whitespace", True):
        result = re.sub(r"\s+", " ", result).strip()
    if case == "lower":
        result = result.lower()
    elif case == "upper":
        result = result.upper()
    elif case == "casefold":
        result = result.casefold()
    return {"text": result, "changed": result != text}
