"""One-time work in the warm parent that every run would otherwise repeat.

Importing a library is not all of its start-up cost: pandas, sqlglot, openpyxl and openai
import more modules on first use, and a pymorphy3 analyzer loads its dictionaries when it is
made. Doing each once here, before the warm parent forks, makes every run start where the
warm-up left off. Each step is best effort: a library that is missing or fails is skipped.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Callable
from typing import Any

SQL_DIALECTS = ("postgres", "mysql", "tsql", "sqlite", "snowflake", "bigquery", "oracle")


def warm_up() -> dict[str, float]:
    """Run every step whose library is imported; return each step's milliseconds."""
    steps: dict[str, Callable[[Any], None]] = {
        "pandas": _pandas,
        "sqlglot": _sqlglot,
        "openpyxl": _openpyxl,
        "pymorphy3": _pymorphy3,
        "nltk": _nltk,
        "rapidfuzz": _rapidfuzz,
        "requests": _requests,
        "openai": _openai,
    }
    timings: dict[str, float] = {}
    for name, step in steps.items():
        module = sys.modules.get(name)
        if module is None:
            continue
        started = time.perf_counter()
        with contextlib.suppress(Exception):
            step(module)
        timings[name] = round((time.perf_counter() - started) * 1000, 1)
    return timings


def _pandas(pd: Any) -> None:
    frame = pd.read_csv(io.StringIO("region,amount,day\na,1,2024-01-01\nb,2,2024-01-02\n"))
    frame["day"] = pd.to_datetime(frame["day"])
    grouped = frame.groupby("region").agg(total=("amount", "sum"), n=("amount", "count"))
    frame.pivot_table(index="region", values="amount", aggfunc="sum")
    frame.merge(grouped.reset_index(), on="region").to_dict(orient="records")
    frame.to_csv()
    frame.to_json()
    frame.describe()


def _sqlglot(sqlglot: Any) -> None:
    for dialect in SQL_DIALECTS:
        sqlglot.transpile("SELECT a, COUNT(*) FROM t WHERE b = 1 GROUP BY a", read=dialect)
        sqlglot.transpile("SELECT 1", write=dialect)


def _openpyxl(openpyxl: Any) -> None:
    workbook = openpyxl.Workbook()
    workbook.active.append(["a", 1, 2.5])
    buffer = io.BytesIO()
    workbook.save(buffer)
    buffer.seek(0)
    openpyxl.load_workbook(buffer).active.cell(1, 1)


def _pymorphy3(pymorphy3: Any) -> None:
    """Load the Russian dictionaries once; ``MorphAnalyzer()`` then returns that analyzer."""
    base = pymorphy3.MorphAnalyzer

    class MorphAnalyzer(base):  # type: ignore[misc, valid-type]
        __doc__ = base.__doc__

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs:
                return shared
            return super().__new__(cls)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if self is not shared:
                super().__init__(*args, **kwargs)

    MorphAnalyzer.__module__ = base.__module__
    shared = object.__new__(MorphAnalyzer)
    base.__init__(shared)
    shared.parse("стали")
    pymorphy3.MorphAnalyzer = MorphAnalyzer
    analyzer_module: Any = sys.modules.get("pymorphy3.analyzer")
    if analyzer_module is not None:
        analyzer_module.MorphAnalyzer = MorphAnalyzer


def _nltk(nltk: Any) -> None:
    from nltk.tokenize import (  # noqa: PLC0415 - warming nltk's lazily loaded tokenizers
        RegexpTokenizer,
        TweetTokenizer,
        wordpunct_tokenize,
    )

    wordpunct_tokenize("Warm up, please.")
    TweetTokenizer().tokenize("warm up #now")
    RegexpTokenizer(r"\w+").tokenize("warm up")


def _rapidfuzz(rapidfuzz: Any) -> None:
    from rapidfuzz import fuzz, process  # noqa: PLC0415 - submodules loaded on first use

    process.extractOne("warm", ["warm", "up"], scorer=fuzz.WRatio)


def _requests(requests: Any) -> None:
    requests.Session().prepare_request(requests.Request("GET", "https://example.invalid/"))


def _openai(openai: Any) -> None:
    # No request is made: building the client and its resources loads their modules.
    client = openai.OpenAI(api_key="warm-up", base_url="http://127.0.0.1:9/v1", max_retries=0)
    _ = client.chat.completions
    client.close()
