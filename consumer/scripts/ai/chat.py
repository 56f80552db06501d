"""One chat completion from an OpenAI-compatible API, with a token given for this call only.

Returns {"content": str | None, "role": str, "model": str, "finish_reason": str | None,
"usage": {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int} | None}.
"""

from typing import Annotated, Any, Literal

import openai
from msgspec import Meta


class Message:
    role: Literal["system", "user", "assistant"]
    content: str


class Input:
    model: Annotated[str, Meta(min_length=1)]  # e.g. "gpt-4o-mini"
    messages: Annotated[list[Message], Meta(min_length=1)]  # [{"role", "content"}, ...]
    api_key: Annotated[str, Meta(min_length=1)]  # token for this call: never stored or echoed
    base_url: Annotated[str, Meta(pattern=r"^https?://")] = "https://api.openai.com/v1"
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    timeout: Annotated[float, Meta(gt=0, le=120)] = 30  # seconds for the HTTP call
    response_format: Literal["text", "json_object"] = "text"


class ChatError(Exception):
    """The API call failed; the message never holds the token."""


def redact(text: object, secret: str) -> str:
    """``text`` with the token (and any bearer credential) taken out."""
    text = str(text).replace(secret, "***")
    words = text.split(" ")
    for index in range(1, len(words)):
        if words[index - 1].lower().endswith("bearer"):
            words[index] = "***"
    return " ".join(words)


def detail(exc: openai.APIStatusError) -> str:
    """The API's own error message if its body has one, else the client's."""
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else None
        if isinstance(message, str):
            return message
        if isinstance(error, str):
            return error
    return exc.message


def execute(ctx: dict[str, Any]) -> dict[str, Any]:
    secret = ctx["api_key"]
    options: dict[str, Any] = {"model": ctx["model"], "messages": ctx["messages"]}
    if ctx["temperature"] is not None:
        options["temperature"] = ctx["temperature"]
    if ctx["max_tokens"] is not None:
        options["max_tokens"] = ctx["max_tokens"]
    if ctx["response_format"] != "text":
        options["response_format"] = {"type": ctx["response_format"]}
    client = openai.OpenAI(
        api_key=secret, base_url=ctx["base_url"], timeout=ctx["timeout"], max_retries=0
    )
    failure = None
    try:
        completion = client.chat.completions.create(**options)
    except openai.APIStatusError as exc:
        failure = f"the AI API answered HTTP {exc.status_code}: {redact(detail(exc), secret)}"
    except openai.APITimeoutError:
        failure = f"the AI API did not answer within {ctx['timeout']} s"
    except openai.APIConnectionError as exc:
        failure = f"could not reach the AI API at {ctx['base_url']}: {redact(exc, secret)}"
    except openai.OpenAIError as exc:
        failure = f"the AI API call failed: {redact(exc, secret)}"
    finally:
        client.close()
    if failure is not None:
        raise ChatError(failure)
    # The response objects live in openai.types, a module path scripts may not touch: the
    # completion is read as plain data instead.
    data = completion.model_dump()
    if not data.get("choices"):
        raise ChatError("the AI API answered without any choice")
    choice = data["choices"][0]
    usage = data.get("usage")
    return {
        "content": choice["message"]["content"],
        "role": choice["message"]["role"],
        "model": data["model"],
        "finish_reason": choice["finish_reason"],
        "usage": None
        if usage is None
        else {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
        },
    }
