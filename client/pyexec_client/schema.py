"""JSON Schemas of the wire messages, generated from their Structs.

``python -m pyexec_client.schema DIR`` writes one ``<name>.schema.json`` per message (JSON Schema
2020-12) into DIR; the project keeps them in ``docs/schema/`` and a test fails when they drift from
the Structs. Backends in other languages generate their types from these files, and
``docs/asyncapi.yaml`` refers to them for every payload.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from pyexec_client import messages

DIALECT = "https://json-schema.org/draft/2020-12/schema"

# File stem -> (title, the Struct it describes (or the Structs one of which it is), what it is).
MESSAGES: dict[str, tuple[str, Any, str]] = {
    "request": (
        "Request",
        (messages.CodeRequest, messages.NamedRequest),
        "Body of <prefix>.code and <prefix>.jobs.code (a CodeRequest), or of <prefix>.named "
        "and <prefix>.jobs.named (a NamedRequest).",
    ),
    "reply": (
        "Reply",
        messages.Reply,
        "The reply to a request on <prefix>.code or <prefix>.named.",
    ),
    "completion": (
        "Completion",
        messages.Completion,
        "An async job's completion, on <prefix>.results.<job_id>.",
    ),
    "job-ref": (
        "JobRef",
        messages.JobRef,
        "Body of <prefix>.job.status and <prefix>.job.cancel.",
    ),
    "job-status": (
        "JobStatus",
        messages.JobStatus,
        "The answer of <prefix>.job.status.",
    ),
    "job-cancel": (
        "JobCancel",
        messages.JobCancel,
        "The answer of <prefix>.job.cancel.",
    ),
    "progress": (
        "Progress",
        messages.Progress,
        "A progress event on <prefix>.progress.<job_id>.",
    ),
    "file-ref": (
        "FileRef",
        messages.FileRef,
        "One input file of a request's files: an object of the PYEXEC_FILES store.",
    ),
}


def schema_of(stem: str) -> dict[str, Any]:
    """The JSON Schema document of the message ``stem`` names."""
    title, kind, description = MESSAGES[stem]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    roots, definitions = msgspec.json.schema_components(kinds, ref_template="#/$defs/{name}")
    document: dict[str, Any] = {"$schema": DIALECT, "title": title}
    if len(kinds) == 1:
        # A Struct: its own definition is the document, the others are its $defs.
        document |= {k: v for k, v in definitions.pop(kinds[0].__name__).items() if k != "title"}
    else:
        # Untagged Structs told apart by their required fields (and no unknown field).
        document["oneOf"] = list(roots)
    document["description"] = description
    if definitions:
        document["$defs"] = dict(sorted(definitions.items()))
    return document


def render(stem: str) -> str:
    return json.dumps(schema_of(stem), indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def write(directory: Path) -> list[Path]:
    """Write every message's schema into ``directory``; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stem in MESSAGES:
        path = directory / f"{stem}.schema.json"
        path.write_text(render(stem), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pyexec_client.schema DIR", file=sys.stderr)
        return 2
    for path in write(Path(args[0])):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
