"""Lemmatize Russian text with pymorphy3: the normal form and part of speech of each word.

Returns {"words": [{"word": str, "lemma": str, "pos": str, "tag": str}, ...]}, or with
lemmas_only {"lemmas": [str, ...]}, in text order.
"""

import re
from typing import Annotated, Any, Literal

import pymorphy3
from msgspec import Meta

# A word is a run of letters (Cyrillic, Latin, ...) with inner hyphens or apostrophes
# ("кто-то", "по-русски", "O'Neil"); a number is digits with an optional decimal part.
WORD = re.compile(r"[^\W\d_]+(?:[-'’][^\W\d_]+)*|\d+(?:[.,]\d+)?")


class Input:
    text: Annotated[str, Meta(max_length=20_000)]  # the text
    # Keep only words whose part of speech is one of these (OpenCorpora tags; NUMB: a number,
    # LATN: a Latin word, ROMN: a Roman numeral, UNKN: not recognised). None: every word.
    pos: list[Literal[
        "NOUN", "ADJF", "ADJS", "COMP", "VERB", "INFN", "PRTF", "PRTS", "GRND", "NUMR", "ADVB",
        "NPRO", "PRED", "PREP", "CONJ", "PRCL", "INTJ", "NUMB", "LATN", "ROMN", "UNKN",
    ]] | None = None  # fmt: skip
    lemmas_only: bool = False  # return the lemmas as a list of strings
    alternatives: bool = False  # add the other readings of ambiguous words, likeliest first


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    morph = pymorphy3.MorphAnalyzer()  # once per run: cheap when the warm parent loaded it
    wanted = set(ctx["pos"]) if ctx["pos"] is not None else None
    # Each word form is analysed once: texts repeat their words.
    known: dict[str, dict[str, Any]] = {}
    words: list[dict[str, Any]] = []
    for match in WORD.finditer(ctx["text"]):
        word = match.group()
        if word not in known:
            known[word] = analyse(morph, word, ctx["alternatives"])
        if wanted is None or known[word]["pos"] in wanted:
            words.append({"word": word, **known[word]})
    if ctx["lemmas_only"]:
        return {"lemmas": [word["lemma"] for word in words]}
    return {"words": words}


def analyse(morph: Any, word: str, alternatives: bool) -> dict[str, Any]:
    """The likeliest reading of a word: lemma, part of speech, tag (and the other readings)."""
    parses = morph.parse(word)
    best = parses[0]
    analysis: dict[str, Any] = {
        "lemma": best.normal_form,
        "pos": part_of_speech(best),
        "tag": str(best.tag),
    }
    if alternatives:
        analysis["alternatives"] = other_readings(parses)
    return analysis


def part_of_speech(parse: Any) -> str:
    """The part of speech, or for a number, Latin word and the like the kind of token."""
    return parse.tag.POS or str(parse.tag).split(",")[0]


def other_readings(parses: list[Any]) -> list[dict[str, str]]:
    """Each other (lemma, part of speech) pair the word may have, without repeats."""
    seen = [(parses[0].normal_form, part_of_speech(parses[0]))]
    for parse in parses[1:]:
        reading = (parse.normal_form, part_of_speech(parse))
        if reading not in seen:
            seen.append(reading)
    return [{"lemma": lemma, "pos": pos} for lemma, pos in seen[1:]]
