"""Split text into words or sentences with nltk's rule-based tokenizers (no data downloads).

Returns {"tokens": [str, ...]} for kind "words", {"sentences": [str, ...]} for "sentences".
"""

import re
from typing import Annotated, Any, Literal

from msgspec import Meta
from nltk.tokenize import NLTKWordTokenizer, ToktokTokenizer, TweetTokenizer, WordPunctTokenizer
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer


class Input:
    text: Annotated[str, Meta(max_length=200_000)]  # the text
    kind: Literal["words", "sentences"] = "words"
    # Sentences: which abbreviations do not end one. Words with tokenizer "auto": "treebank"
    # for English, "toktok" for Russian.
    language: Literal["english", "russian"] = "english"
    # treebank: Penn Treebank rules (splits "don't" into "do", "n't"; quotes become `` and '');
    # toktok: language-neutral rules, keeps "т.е." and "3,5"; wordpunct: runs of letters and
    # digits, runs of punctuation; tweet: keeps #tags, @names, URLs and emoticons whole.
    tokenizer: Literal["auto", "treebank", "toktok", "wordpunct", "tweet"] = "auto"
    lowercase: bool = False  # lowercase the tokens or sentences
    punctuation: bool = True  # keep tokens made only of punctuation (words only)


# Punkt without trained data ends a sentence at every ".", "!" or "?" followed by a space;
# these abbreviations (written without the final period, lowercase) do not end one.
ABBREVIATIONS = {
    "english": [
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "inc",
        "ltd", "co", "corp", "no", "fig", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
        "sep", "sept", "oct", "nov", "dec", "a.m", "p.m", "u.s", "u.k",
    ],
    "russian": [
        "т.е", "т.д", "т.п", "т.к", "т.н", "т.ч", "и.о", "др", "пр", "см", "ср", "напр", "г",
        "гг", "в", "вв", "им", "ул", "пер", "д", "кв", "стр", "рис", "табл", "руб", "коп",
        "тыс", "млн", "млрд", "проф", "акад", "доц", "англ", "рус", "лат", "мин", "сек",
    ],
}  # fmt: skip
AUTO = {"english": "treebank", "russian": "toktok"}
TOKENIZERS = {
    "treebank": NLTKWordTokenizer,
    "toktok": ToktokTokenizer,
    "wordpunct": WordPunctTokenizer,
    "tweet": TweetTokenizer,
}
PARAGRAPH = re.compile(r"\n\s*\n")  # a blank line always ends a sentence
ALPHANUMERIC = re.compile(r"[^\W_]")


def execute(ctx: dict[str, Any]) -> dict[str, list[str]]:
    sentences = split_sentences(ctx["text"], ctx["language"])
    if ctx["kind"] == "sentences":
        return {"sentences": [cased(sentence, ctx) for sentence in sentences]}
    name = ctx["tokenizer"] if ctx["tokenizer"] != "auto" else AUTO[ctx["language"]]
    tokenizer = TOKENIZERS[name]()
    tokens: list[str] = []
    for sentence in sentences:  # word tokenizers split off a final period only at the end
        for token in tokenizer.tokenize(sentence):
            if ctx["punctuation"] or ALPHANUMERIC.search(token):
                tokens.append(cased(token, ctx))
    return {"tokens": tokens}


def split_sentences(text: str, language: str) -> list[str]:
    parameters = PunktParameters()
    parameters.abbrev_types.update(ABBREVIATIONS[language])
    punkt = PunktSentenceTokenizer(parameters)
    sentences: list[str] = []
    for paragraph in PARAGRAPH.split(text):
        sentences.extend(sentence.strip() for sentence in punkt.tokenize(paragraph))
    return [sentence for sentence in sentences if sentence]


def cased(text: str, ctx: dict[str, Any]) -> str:
    return text.lower() if ctx["lowercase"] else text
