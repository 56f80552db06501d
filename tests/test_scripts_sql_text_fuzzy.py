"""The shipped sql.analyze, sql.validate, text.lemmatize_ru, text.tokenize, fuzzy.match and
fuzzy.dedupe scripts, called by name on a real replica."""

# Russian text is the point of several tests here: the Cyrillic letters are meant.
# ruff: noqa: RUF001, RUF002

from __future__ import annotations

from typing import Any

from consumer.protocol import Reply
from tests.conftest import Caller


def ok(reply: Reply) -> Any:
    """The result of a reply that must have succeeded."""
    assert reply.status == "ok", reply.error
    return reply.result


def run(caller: Caller, name: str, **ctx: Any) -> Any:
    """The result of calling the script ``name`` with ``ctx``; the call must succeed."""
    return ok(caller.named(name, ctx))


def refused(reply: Reply, field: str) -> None:
    """A reply that must be invalid_request with a message naming ``field``."""
    assert reply.status == "rejected", reply
    assert reply.error is not None
    assert reply.error.code == "invalid_request"
    assert field in reply.error.message, reply.error.message


def failed(reply: Reply, error_type: str) -> str:
    """The message of a reply that must be a script_error of ``error_type``."""
    assert reply.status == "error", reply
    assert reply.error is not None
    assert (reply.error.code, reply.error.type) == ("script_error", error_type)
    return reply.error.message


def table(name: str, schema: str | None = None, catalog: str | None = None) -> dict[str, Any]:
    return {"catalog": catalog, "schema": schema, "name": name}


# -- sql.analyze -------------------------------------------------------------------------------


def test_sql_analyze_describes_a_postgres_select(caller: Caller) -> None:
    """sql.analyze lists tables with schema, columns, functions and CTEs of a read-only query."""
    sql = """
        WITH recent AS (SELECT customer_id, amount FROM sales.orders WHERE placed > now() - 7)
        SELECT c.name, SUM(r.amount) AS total, lower(c.email)
        FROM recent AS r JOIN public.customers AS c ON c.id = r.customer_id
        GROUP BY c.name, c.email
    """
    result = run(caller, "sql.analyze", sql=sql, dialect="postgres")
    assert result == {
        "statements": [
            {
                "type": "select",
                "writes": False,
                "tables": [table("customers", "public"), table("orders", "sales")],
                "columns": [
                    "amount",
                    "c.email",
                    "c.id",
                    "c.name",
                    "customer_id",
                    "placed",
                    "r.amount",
                    "r.customer_id",
                ],
                "functions": ["CURRENT_TIMESTAMP", "LOWER", "SUM"],
                "ctes": ["recent"],
            }
        ],
        "writes": False,
    }


def test_sql_analyze_types_each_statement_and_flags_writes(caller: Caller) -> None:
    """sql.analyze gives one entry per statement with its type and whether it writes."""
    sql = """
        INSERT INTO audit.log (id, msg) VALUES (1, 'x');
        UPDATE users SET name = 'b' WHERE id = 2;
        DELETE FROM users WHERE id = 3;
        MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET t.v = s.v;
        CREATE TABLE archive (id INT);
        ALTER TABLE archive ADD COLUMN note TEXT;
        DROP TABLE IF EXISTS archive;
        TRUNCATE TABLE staging.raw;
        SELECT 1
    """
    result = run(caller, "sql.analyze", sql=sql)
    assert [(s["type"], s["writes"]) for s in result["statements"]] == [
        ("insert", True),
        ("update", True),
        ("delete", True),
        ("merge", True),
        ("create", True),
        ("alter", True),
        ("drop", True),
        ("truncate", True),
        ("select", False),
    ]
    assert result["writes"] is True
    assert result["statements"][0]["tables"] == [table("log", "audit")]
    assert result["statements"][1]["columns"] == ["id", "name"]
    assert result["statements"][7]["tables"] == [table("raw", "staging")]


def test_sql_analyze_sees_writes_hidden_in_a_read(caller: Caller) -> None:
    """SELECT ... INTO (T-SQL) and a DELETE inside WITH (PostgreSQL) count as writing."""
    into = run(caller, "sql.analyze", sql="SELECT * INTO copy FROM src", dialect="tsql")
    [statement] = into["statements"]
    assert (statement["type"], statement["writes"]) == ("select", True)
    assert statement["tables"] == [table("copy"), table("src")]
    sql = "WITH gone AS (DELETE FROM jobs WHERE done RETURNING id) SELECT count(*) FROM gone"
    deleted = run(caller, "sql.analyze", sql=sql, dialect="postgres")
    [statement] = deleted["statements"]
    assert (statement["type"], statement["writes"]) == ("select", True)
    assert statement["tables"] == [table("jobs")]  # the CTE "gone" is not a table
    assert statement["ctes"] == ["gone"]


def test_sql_analyze_reads_dialect_quoting_and_qualified_names(caller: Caller) -> None:
    """MySQL backticks, T-SQL brackets and BigQuery project.dataset.table resolve to parts."""
    sql = "SELECT `u`.`id` FROM `shop`.`users` AS `u`"
    [mysql] = run(caller, "sql.analyze", sql=sql, dialect="mysql")["statements"]
    assert (mysql["tables"], mysql["columns"]) == ([table("users", "shop")], ["u.id"])
    sql = "SELECT TOP 5 [Name] FROM [sales].[dbo].[Items]"
    [tsql] = run(caller, "sql.analyze", sql=sql, dialect="tsql")["statements"]
    assert (tsql["tables"], tsql["columns"]) == ([table("Items", "dbo", "sales")], ["Name"])
    sql = "SELECT DATE(ts) FROM `proj.ds.events`"
    [bigquery] = run(caller, "sql.analyze", sql=sql, dialect="bigquery")["statements"]
    assert bigquery["tables"] == [table("events", "ds", "proj")]
    assert bigquery["functions"] == ["DATE"]


def test_sql_analyze_names_user_functions_and_unparsed_statements(caller: Caller) -> None:
    """An unknown function keeps its name; an unparsed statement is typed by its first word."""
    sql = "SELECT my_udf(a) FROM t; VACUUM"
    first, second = run(caller, "sql.analyze", sql=sql, dialect="postgres")["statements"]
    assert first["functions"] == ["MY_UDF"]
    assert (second["type"], second["writes"]) == ("vacuum", True)


def test_sql_analyze_reports_bad_sql_and_dialects_as_script_errors(caller: Caller) -> None:
    """Unparseable SQL and an unknown dialect end as script_error with sqlglot's exception."""
    failed(caller.named("sql.analyze", {"sql": "SELECT a FROM WHERE"}), "ParseError")
    unknown = caller.named("sql.analyze", {"sql": "SELECT 1", "dialect": "nosuchsql"})
    assert "nosuchsql" in failed(unknown, "ValueError")


def test_sql_analyze_refuses_blank_sql_and_bad_fields(caller: Caller) -> None:
    """Blank SQL, a non-string dialect and a misspelt field are refused naming the field."""
    refused(caller.named("sql.analyze", {"sql": " \n "}), "ctx.sql")
    refused(caller.named("sql.analyze", {"sql": "SELECT 1", "dialect": 5}), "ctx.dialect")
    refused(caller.named("sql.analyze", {"sql": "SELECT 1", "dialekt": "mysql"}), "`dialekt`")


# -- sql.validate ------------------------------------------------------------------------------


def test_sql_validate_counts_statements_of_valid_sql(caller: Caller) -> None:
    """Valid SQL in several dialects is {"valid": true} with the number of statements."""
    cases = [
        ("SELECT 1; SELECT a FROM t;", None, 2),
        ("SELECT a::int FROM t WHERE b ILIKE 'x%'", "postgres", 1),
        ("SELECT `a` FROM `t` LIMIT 1; UPDATE `t` SET `a` = 2", "mysql", 2),
        ("SELECT TOP 5 [a] FROM [t]", "tsql", 1),
        ("SELECT * FROM `proj.ds.tbl`", "bigquery", 1),
    ]
    for sql, dialect, count in cases:
        result = run(caller, "sql.validate", sql=sql, dialect=dialect)
        assert result == {"valid": True, "statements": count}, (sql, dialect)


def test_sql_validate_locates_an_error_by_line_and_column(caller: Caller) -> None:
    """An unclosed parenthesis is reported at the line and column of the token it stopped at."""
    sql = "SELECT id, name\nFROM users\nWHERE id IN (1, 2\nORDER BY name;"
    assert run(caller, "sql.validate", sql=sql) == {
        "valid": False,
        "errors": [{"message": "Expecting )", "line": 4, "column": 1, "near": "ORDER BY"}],
    }


def test_sql_validate_depends_on_the_dialect(caller: Caller) -> None:
    """T-SQL's TOP parses as T-SQL and fails as PostgreSQL, at the column of the 5."""
    sql = "SELECT TOP 5 a FROM t"
    assert run(caller, "sql.validate", sql=sql, dialect="tsql")["valid"] is True
    result = run(caller, "sql.validate", sql=sql, dialect="postgres")
    assert result["valid"] is False
    assert [(e["line"], e["column"], e["near"]) for e in result["errors"]] == [(1, 12, "5")]


def test_sql_validate_reports_every_error_with_readable_messages(caller: Caller) -> None:
    """Several errors are all reported, their messages free of sqlglot's token reprs."""
    result = run(caller, "sql.validate", sql="SELECT a FROM\nWHERE x = ", dialect="postgres")
    assert result["valid"] is False
    assert result["errors"] == [
        {
            "message": "Expected table name but got 'WHERE'",
            "line": 2,
            "column": 1,
            "near": "WHERE",
        },
        {
            "message": "Required keyword: 'expression' missing for EQ",
            "line": 2,
            "column": 9,
            "near": "=",
        },
    ]


def test_sql_validate_reports_a_tokenizer_error_without_position(caller: Caller) -> None:
    """An unterminated string is invalid, with sqlglot's message and no line or column."""
    result = run(caller, "sql.validate", sql="SELECT 'abc FROM t")
    assert result["valid"] is False
    [error] = result["errors"]
    assert error["message"].startswith("Error tokenizing")
    assert (error["line"], error["column"], error["near"]) == (None, None, None)


def test_sql_validate_refuses_bad_input_and_fails_on_unknown_dialects(caller: Caller) -> None:
    """Blank or oversized SQL is invalid_request; an unknown dialect is a script_error."""
    refused(caller.named("sql.validate", {"sql": ""}), "ctx.sql")
    refused(caller.named("sql.validate", {"sql": "SELECT 1 " * 25_000}), "ctx.sql")
    unknown = caller.named("sql.validate", {"sql": "SELECT 1", "dialect": "nosuchsql"})
    assert "nosuchsql" in failed(unknown, "ValueError")


# -- text.lemmatize_ru -------------------------------------------------------------------------


def test_lemmatize_ru_gives_lemma_and_part_of_speech(caller: Caller) -> None:
    """Each word of a Russian sentence gets its normal form, part of speech and full tag."""
    result = run(caller, "text.lemmatize_ru", text="Кошки бегали по крышам домов.")
    assert [(w["word"], w["lemma"], w["pos"]) for w in result["words"]] == [
        ("Кошки", "кошка", "NOUN"),
        ("бегали", "бегать", "VERB"),
        ("по", "по", "PREP"),
        ("крышам", "крыша", "NOUN"),
        ("домов", "дом", "NOUN"),
    ]
    assert result["words"][0]["tag"] == "NOUN,anim,femn plur,nomn"


def test_lemmatize_ru_offers_the_other_readings_of_an_ambiguous_word(caller: Caller) -> None:
    """The likeliest reading of "мыла" is мыло (soap); alternatives offer the verb мыть."""
    plain = run(caller, "text.lemmatize_ru", text="мама мыла раму", lemmas_only=True)
    assert plain == {"lemmas": ["мама", "мыло", "рама"]}
    result = run(caller, "text.lemmatize_ru", text="мама мыла раму", alternatives=True)
    mother, soap, frame = result["words"]
    assert (soap["lemma"], soap["pos"]) == ("мыло", "NOUN")
    assert {"lemma": "мыть", "pos": "VERB"} in soap["alternatives"]
    assert mother["alternatives"] == []
    assert frame["lemma"] == "рама"


def test_lemmatize_ru_filters_by_part_of_speech(caller: Caller) -> None:
    """With pos the words of other parts of speech are left out."""
    text = "Мальчики читали интересные книги в большой библиотеке"
    nouns = run(caller, "text.lemmatize_ru", text=text, pos=["NOUN"], lemmas_only=True)
    assert nouns == {"lemmas": ["мальчик", "книга", "библиотека"]}
    others = run(caller, "text.lemmatize_ru", text=text, pos=["VERB", "ADJF"])
    assert [(w["lemma"], w["pos"]) for w in others["words"]] == [
        ("читать", "VERB"),
        ("интересный", "ADJF"),
        ("большой", "ADJF"),
    ]


def test_lemmatize_ru_tokenizes_numbers_latin_and_hyphenated_words(caller: Caller) -> None:
    """Numbers, Latin words and hyphenated words are tokens; punctuation is skipped."""
    result = run(caller, "text.lemmatize_ru", text="Кто-то купил 3,5 кг яблок в IKEA!")
    assert [(w["word"], w["lemma"], w["pos"]) for w in result["words"]] == [
        ("Кто-то", "кто-то", "NPRO"),
        ("купил", "купить", "VERB"),
        ("3,5", "3,5", "NUMB"),
        ("кг", "кг", "NOUN"),
        ("яблок", "яблоко", "NOUN"),
        ("в", "в", "PREP"),
        ("IKEA", "ikea", "LATN"),
    ]


def test_lemmatize_ru_reports_every_occurrence_of_a_repeated_word(caller: Caller) -> None:
    """A word form met again is reported again, as written, in text order."""
    result = run(caller, "text.lemmatize_ru", text="Кот видит кота, кот спит.")
    assert [(w["word"], w["lemma"]) for w in result["words"]] == [
        ("Кот", "кот"),
        ("видит", "видеть"),
        ("кота", "кот"),
        ("кот", "кот"),
        ("спит", "спать"),
    ]


def test_lemmatize_ru_takes_a_text_of_the_largest_size(caller: Caller) -> None:
    """A text of exactly 20,000 characters is lemmatized in full."""
    text = "Мама мыла раму. " * 1250
    assert len(text) == 20_000
    result = run(caller, "text.lemmatize_ru", text=text, lemmas_only=True)
    assert result["lemmas"] == ["мама", "мыло", "рама"] * 1250
    words = run(caller, "text.lemmatize_ru", text=text, alternatives=True)["words"]
    assert len(words) == 3750


def test_lemmatize_ru_handles_empty_and_wordless_text(caller: Caller) -> None:
    """Empty text and text without words give no words."""
    assert run(caller, "text.lemmatize_ru", text="") == {"words": []}
    assert run(caller, "text.lemmatize_ru", text=" ... — !") == {"words": []}
    assert run(caller, "text.lemmatize_ru", text="", lemmas_only=True) == {"lemmas": []}


def test_lemmatize_ru_refuses_unknown_parts_of_speech_and_long_text(caller: Caller) -> None:
    """An unknown POS tag, text over 20,000 characters and no text are refused naming the field."""
    refused(caller.named("text.lemmatize_ru", {"text": "мама", "pos": ["NOUNS"]}), "ctx.pos[0]")
    refused(caller.named("text.lemmatize_ru", {"text": "я" * 20_001}), "ctx.text")
    refused(caller.named("text.lemmatize_ru", {}), "`text`")


# -- text.tokenize -----------------------------------------------------------------------------


def test_tokenize_english_words_follow_treebank_rules(caller: Caller) -> None:
    """English words: contractions split, sentence-final periods split, abbreviations kept."""
    text = "Mr. Smith doesn't live in the U.S. anymore. He moved to Paris!"
    tokens = run(caller, "text.tokenize", text=text)["tokens"]
    assert " ".join(tokens) == "Mr. Smith does n't live in the U.S. anymore . He moved to Paris !"


def test_tokenize_english_sentences_keep_abbreviations_and_split_paragraphs(
    caller: Caller,
) -> None:
    """English sentences do not end at Dr. or e.g., and a blank line always ends one."""
    text = "Dr. Who arrived, e.g. at noon. Was it late? Yes\n\nNew paragraph here"
    assert run(caller, "text.tokenize", text=text, kind="sentences") == {
        "sentences": [
            "Dr. Who arrived, e.g. at noon.",
            "Was it late?",
            "Yes",
            "New paragraph here",
        ]
    }


def test_tokenize_russian_words_and_sentences(caller: Caller) -> None:
    """Russian: т.е. and г. stay whole and end no sentence; decimals with a comma stay whole."""
    text = "Мама мыла раму. Т.е. это было в 1999 г. в Москве! Цена 3,5 руб."
    tokens = run(caller, "text.tokenize", text=text, language="russian")["tokens"]
    assert " ".join(tokens) == "Мама мыла раму . Т.е. это было в 1999 г. в Москве ! Цена 3,5 руб ."
    sentences = run(
        caller, "text.tokenize", text=text, language="russian", kind="sentences", lowercase=True
    )
    assert sentences == {
        "sentences": ["мама мыла раму.", "т.е. это было в 1999 г. в москве!", "цена 3,5 руб."]
    }


def test_tokenize_language_changes_where_sentences_end(caller: Caller) -> None:
    """The abbreviation "проф." ends no sentence in Russian, but does with the English list."""
    text = "Лекцию читал проф. Иванов. Было интересно."
    russian = run(caller, "text.tokenize", text=text, kind="sentences", language="russian")
    assert russian["sentences"] == ["Лекцию читал проф. Иванов.", "Было интересно."]
    english = run(caller, "text.tokenize", text=text, kind="sentences")
    assert english["sentences"] == ["Лекцию читал проф.", "Иванов.", "Было интересно."]


def test_tokenize_tweet_and_wordpunct_tokenizers(caller: Caller) -> None:
    """tweet keeps @names, #tags and URLs whole; wordpunct splits at every letter/punctuation
    edge; lowercase and punctuation=false apply."""
    text = "@Bob loves #NLP :) see https://example.com/a?b=1"
    tweet = run(
        caller, "text.tokenize", text=text, tokenizer="tweet", lowercase=True, punctuation=False
    )
    assert tweet == {"tokens": ["@bob", "loves", "#nlp", "see", "https://example.com/a?b=1"]}
    wordpunct = run(caller, "text.tokenize", text="It's 3.5-ish", tokenizer="wordpunct")
    assert wordpunct == {"tokens": ["It", "'", "s", "3", ".", "5", "-", "ish"]}


def test_tokenize_empty_and_blank_text(caller: Caller) -> None:
    """Empty or blank text has no tokens and no sentences."""
    assert run(caller, "text.tokenize", text="") == {"tokens": []}
    assert run(caller, "text.tokenize", text=" \n\n ", kind="sentences") == {"sentences": []}


def test_tokenize_refuses_unknown_options(caller: Caller) -> None:
    """An unknown kind, language or tokenizer and an oversized text are refused naming the field."""
    refused(caller.named("text.tokenize", {"text": "a", "kind": "letters"}), "ctx.kind")
    refused(caller.named("text.tokenize", {"text": "a", "language": "german"}), "ctx.language")
    refused(caller.named("text.tokenize", {"text": "a", "tokenizer": "punkt"}), "ctx.tokenizer")
    refused(caller.named("text.tokenize", {"text": "a" * 200_001}), "ctx.text")


# -- fuzzy.match -------------------------------------------------------------------------------

TEAMS = ["Atlanta Falcons", "New York Jets", "New York Giants", "Dallas Cowboys"]


def test_fuzzy_match_finds_the_best_choice_first(caller: Caller) -> None:
    """The closest choice comes first with its index; limit caps the matches."""
    assert run(caller, "fuzzy.match", query="new york jets", choices=TEAMS, limit=2) == {
        "matches": [
            {"choice": "New York Jets", "score": 100.0, "index": 1},
            {"choice": "New York Giants", "score": 78.57, "index": 2},
        ]
    }


def test_fuzzy_match_scorers_differ_as_documented(caller: Caller) -> None:
    """token_sort_ratio ignores word order; partial_ratio matches a part; ratio does neither."""

    def best(query: str, scorer: str) -> dict[str, Any]:
        result = run(caller, "fuzzy.match", query=query, choices=TEAMS, scorer=scorer, limit=1)
        [match] = result["matches"]
        return match  # type: ignore[no-any-return]

    jets = {"choice": "New York Jets", "score": 100.0, "index": 1}
    assert best("jets new york", "token_sort_ratio") == jets
    cowboys = {"choice": "Dallas Cowboys", "score": 100.0, "index": 3}
    assert best("cowboys", "partial_ratio") == cowboys
    assert best("cowboys", "ratio")["score"] < 100


def test_fuzzy_match_processor_none_compares_as_given(caller: Caller) -> None:
    """Without the default processor, case and punctuation count."""
    choices = ["APPLE!", "apple"]
    default = run(caller, "fuzzy.match", query="apple", choices=choices, scorer="ratio")
    assert [m["score"] for m in default["matches"]] == [100.0, 100.0]
    raw = run(
        caller, "fuzzy.match", query="apple", choices=choices, scorer="ratio", processor="none"
    )
    assert raw["matches"] == [
        {"choice": "apple", "score": 100.0, "index": 1},
        {"choice": "APPLE!", "score": 0.0, "index": 0},
    ]


def test_fuzzy_match_score_cutoff_and_empty_inputs(caller: Caller) -> None:
    """score_cutoff drops weak matches; no choices, or an empty query with a cutoff, match
    nothing."""
    strict = run(
        caller, "fuzzy.match", query="new york", choices=TEAMS, scorer="ratio", score_cutoff=60
    )
    assert [m["index"] for m in strict["matches"]] == [1, 2]
    assert run(caller, "fuzzy.match", query="x", choices=[]) == {"matches": []}
    empty = run(caller, "fuzzy.match", query="", choices=TEAMS, score_cutoff=1)
    assert empty == {"matches": []}


def test_fuzzy_match_refuses_bad_options(caller: Caller) -> None:
    """An unknown scorer, a limit of 0, a cutoff over 100 and a non-string choice are refused."""
    base = {"query": "a", "choices": ["a", "b"]}
    refused(caller.named("fuzzy.match", {**base, "scorer": "jaro"}), "ctx.scorer")
    refused(caller.named("fuzzy.match", {**base, "limit": 0}), "ctx.limit")
    refused(caller.named("fuzzy.match", {**base, "score_cutoff": 101}), "ctx.score_cutoff")
    refused(caller.named("fuzzy.match", {"query": "a", "choices": ["a", 2]}), "ctx.choices[1]")
    refused(caller.named("fuzzy.match", {"query": "a"}), "`choices`")


# -- fuzzy.dedupe ------------------------------------------------------------------------------

COMPANIES = ["Acme Inc.", "Globex", "ACME inc", "Initech", "acme, inc", "Globex Corp", "Initech"]


def test_fuzzy_dedupe_groups_near_duplicates_in_first_seen_order(caller: Caller) -> None:
    """Near-duplicates form groups in the order of their first member, with their indices."""
    assert run(caller, "fuzzy.dedupe", strings=COMPANIES) == {
        "groups": [
            {"members": ["Acme Inc.", "ACME inc", "acme, inc"], "indices": [0, 2, 4]},
            {"members": ["Initech", "Initech"], "indices": [3, 6]},
        ],
        "distinct": 4,
    }


def test_fuzzy_dedupe_threshold_scorer_and_singletons(caller: Caller) -> None:
    """token_set_ratio merges Globex and Globex Corp; singletons lists the rest as well."""
    result = run(caller, "fuzzy.dedupe", strings=COMPANIES, scorer="token_set_ratio", threshold=100)
    assert [g["indices"] for g in result["groups"]] == [[0, 2, 4], [1, 5], [3, 6]]
    assert result["distinct"] == 3
    every = run(caller, "fuzzy.dedupe", strings=["a b", "x", "b a"], singletons=True)
    assert every == {
        "groups": [
            {"members": ["a b", "b a"], "indices": [0, 2]},
            {"members": ["x"], "indices": [1]},
        ],
        "distinct": 2,
    }


def test_fuzzy_dedupe_does_not_chain_matches(caller: Caller) -> None:
    """b matches a and c matches b, but c does not match a: c starts its own group."""
    strings = ["aaaaaaaaaa", "aaaaaaaabb", "aaaaaabbbb"]  # ratio: a~b 80, b~c 80, a~c 60
    result = run(
        caller, "fuzzy.dedupe", strings=strings, scorer="ratio", threshold=80, singletons=True
    )
    assert [g["indices"] for g in result["groups"]] == [[0, 1], [2]]


def test_fuzzy_dedupe_handles_thousands_of_strings_across_blocks(caller: Caller) -> None:
    """3000 strings (several scoring blocks) with known duplicates group exactly."""
    strings = [f"customer number {n:04d} ltd" for n in range(1000)]
    strings += [s.upper() for s in strings] + [s.replace("ltd", "LTD.") for s in strings]
    ctx = {"strings": strings, "scorer": "ratio", "threshold": 100}
    result = ok(caller.named("fuzzy.dedupe", ctx, timeout=10))
    assert result["distinct"] == 1000
    assert result["groups"][0] == {
        "members": [
            "customer number 0000 ltd",
            "CUSTOMER NUMBER 0000 LTD",
            "customer number 0000 LTD.",
        ],
        "indices": [0, 1000, 2000],
    }
    assert result["groups"][999]["indices"] == [999, 1999, 2999]


def test_fuzzy_dedupe_bounds_and_edges(caller: Caller) -> None:
    """No strings give no groups; over 5000 strings or a threshold over 100 are refused."""
    assert run(caller, "fuzzy.dedupe", strings=[]) == {"groups": [], "distinct": 0}
    assert run(caller, "fuzzy.dedupe", strings=["only"]) == {"groups": [], "distinct": 1}
    refused(caller.named("fuzzy.dedupe", {"strings": ["x"] * 5001}), "ctx.strings")
    refused(caller.named("fuzzy.dedupe", {"strings": ["x"], "threshold": 101}), "ctx.threshold")
