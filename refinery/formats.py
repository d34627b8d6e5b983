"""Instruction-data formats: recognise one record's format and turn it into chat messages.

Every format maps to ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` (the roles
of refinery.records). A record that cannot be mapped raises ``RecordError`` naming the offending
field (a dotted path such as ``conversations[3].from``) and the reason; the ingest stage puts it
in quarantine. Fields a format does not use are not an error: the whole source record is kept in
``original``.

Formats (the names of refinery.config.Format):

- ``alpaca``: instruction, input, output; optional system and history ``[[user, assistant], ...]``
  (LLaMA-Factory's lima.json). The self-instruct seed-task shape (instruction plus
  ``instances: [{input, output}]`` with exactly one instance) is read as Alpaca too.
- ``sharegpt``: ``conversations: [{from, value}]``; optional top-level system and tools
  (LLaMA-Factory's glaive_toolcall) and ``chosen`` (LLaMA-Factory's preference pairs: the
  answer). Tool turns have no role of their own in refinery's schema: a ``function_call`` is
  what the assistant said, an ``observation`` is fed back as a user turn, and the tool list
  becomes part of the system message, so the conversation still makes sense.
- ``openai``: ``messages: [{role, content}]``, and OpenAI's preference fine-tuning shape
  ``{input: {messages}, preferred_output: [...], non_preferred_output: [...]}`` (preferred output
  is the answer; the rejected one stays in ``original``).
- ``oasst``: OpenAssistant export trees ``{message_tree_id, prompt: {..., replies: [...]}}`` and
  message exports whose root message carries its replies. A tree becomes ONE conversation: the
  best-ranked path (at each turn the reply with the lowest ``rank``, deleted or failed-review
  replies skipped), cut after its last assistant turn. One conversation per tree keeps every
  prompt once (every root-to-leaf path would repeat each prompt and shared prefixes many times)
  and keeps ``read = kept + quarantined`` per source line. ``flatten_oasst_tree(tree, paths="all")``
  gives every path for callers who want them.
- ``dolly``: instruction, context, response (category is kept in ``original``).
- ``openorca``: system_prompt, question, response (OpenOrca) and system, question, chosen,
  rejected (orca_dpo_pairs: chosen is the answer, rejected stays in ``original``).

Every conversation must have a user turn and an answer; turns after the last answer (an
unanswered question, common at the end of ShareGPT dumps) are cut from ``messages``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

FORMATS = ("alpaca", "sharegpt", "openai", "oasst", "dolly", "openorca")

# ShareGPT speaker names seen in the wild (FastChat, LLaMA-Factory, Vicuna dumps) -> role.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "observation": "user",  # a tool's answer, handed back to the model
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "function_call": "assistant",  # the assistant's tool call (JSON text)
}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "user", "function": "user"}
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


class RecordError(ValueError):
    """One record that cannot be normalized: ``field`` is the offending field (or None)."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


# --------------------------------------------------------------------------- detection


def detect_format(obj: dict) -> str | None:
    """The format a record looks like, from its keys alone; None when it matches none."""
    if not isinstance(obj, dict):
        return None
    keys = obj.keys()
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys or (isinstance(obj.get("input"), dict) and "preferred_output" in keys):
        return "openai"
    if "message_tree_id" in keys and "prompt" in keys:
        return "oasst"
    if "message_id" in keys and "text" in keys and _hashable(obj.get("role")) in OASST_ROLES:
        return "oasst"
    if "question" in keys and ("response" in keys or "chosen" in keys):
        return "openorca"
    if "instruction" in keys and "response" in keys:
        return "dolly"
    if "instruction" in keys and ("output" in keys or "instances" in keys):
        return "alpaca"
    return None


# --------------------------------------------------------------------------- helpers


def _text(obj: dict, field: str, *, required: bool = True, path: str | None = None) -> str:
    """A string field; missing or null optional fields are ''. Wrong types name the field."""
    name = path or field
    if field not in obj or obj[field] is None:
        if required:
            raise RecordError(name, "missing")
        return ""
    value = obj[field]
    if not isinstance(value, str):
        raise RecordError(name, f"expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RecordError(name, "empty")
    return value


def _object(value: Any, path: str) -> dict:
    """``value`` when it is a JSON object; a RecordError naming ``path`` otherwise."""
    if value is None:
        raise RecordError(path, "missing")
    if not isinstance(value, dict):
        raise RecordError(path, f"expected an object, got {type(value).__name__}")
    return value


def _list(obj: dict, field: str, *, path: str | None = None) -> list:
    name = path or field
    if field not in obj or obj[field] is None:
        raise RecordError(name, "missing")
    value = obj[field]
    if not isinstance(value, list):
        raise RecordError(name, f"expected a list, got {type(value).__name__}")
    if not value:
        raise RecordError(name, "empty")
    return value


def _hashable(value: Any) -> Any:
    """``value``, or None when it is a list or object (a wrong type, not a dict key)."""
    return None if isinstance(value, (list, dict)) else value


def _join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p.strip())


def _check(messages: list[dict]) -> list[dict]:
    """A usable conversation has a user turn and ends with an answer.

    Trailing turns after the last answer (an unanswered question) teach nothing and are cut;
    ``original`` still has them.
    """
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(None, "no assistant turn")
    while messages[-1]["role"] != "assistant":
        messages = messages[:-1]
    if not any(m["role"] == "user" for m in messages):
        raise RecordError(None, "no user turn")
    return messages


def _system(text: str) -> list[dict]:
    return [{"role": "system", "content": text}] if text.strip() else []


# --------------------------------------------------------------------------- formats


def _alpaca(obj: dict) -> list[dict]:
    if "instruction" not in obj:
        raise RecordError("instruction", "missing")
    instruction = _text(obj, "instruction", required=False)
    if "instances" in obj and "output" not in obj:  # self-instruct seed task
        instances = _list(obj, "instances")
        if len(instances) != 1:
            raise RecordError("instances", f"{len(instances)} instances; one record is one conversation")
        instance = _object(instances[0], "instances[0]")
        query = _text(instance, "input", required=False, path="instances[0].input")
        output = _text(instance, "output", path="instances[0].output")
    else:
        query = _text(obj, "input", required=False)
        output = _text(obj, "output")
    prompt = _join(instruction, query)
    if not prompt:
        raise RecordError("instruction", "empty")
    messages = _system(_text(obj, "system", required=False))
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RecordError("history", f"expected a list of [user, assistant] pairs, got {type(history).__name__}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RecordError(f"history[{i}]", "expected a [user, assistant] pair")
        for j, (role, turn) in enumerate(zip(("user", "assistant"), pair)):
            if not isinstance(turn, str):
                raise RecordError(f"history[{i}][{j}]", f"expected a string, got {type(turn).__name__}")
            if not turn.strip():
                raise RecordError(f"history[{i}][{j}]", "empty")
            messages.append({"role": role, "content": turn})
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return messages


def _sharegpt(obj: dict) -> list[dict]:
    system = _text(obj, "system", required=False)
    tools = obj.get("tools")
    if tools not in (None, "", "[]", []):
        tools_text = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        system = _join(system, f"Available tools:\n{tools_text}")
    messages = _system(system)
    for i, turn in enumerate(_list(obj, "conversations")):
        where = f"conversations[{i}]"
        turn = _object(turn, where)
        speaker = _text(turn, "from", path=f"{where}.from")
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise RecordError(f"{where}.from", f"unknown speaker {speaker!r}")
        messages.append({"role": role, "content": _text(turn, "value", path=f"{where}.value")})
    if isinstance(obj.get("chosen"), dict):  # LLaMA-Factory's preference pairs: chosen is the answer
        role = SHAREGPT_ROLES.get(str(obj["chosen"].get("from", "")).lower())
        if role != "assistant":
            raise RecordError("chosen.from", f"expected an assistant speaker, got {obj['chosen'].get('from')!r}")
        messages.append({"role": role, "content": _text(obj["chosen"], "value", path="chosen.value")})
    return messages


def _openai_messages(turns: list, where: str) -> list[dict]:
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where}[{i}]"
        turn = _object(turn, at)
        name = _text(turn, "role", path=f"{at}.role")
        role = OPENAI_ROLES.get(name)
        if role is None:
            raise RecordError(f"{at}.role", f"unknown role {name!r}")
        content = turn.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
                raise RecordError(f"{at}.content", "content parts must be objects with a text string")
            content = "".join(p.get("text", "") for p in content)
        if content is None and turn.get("tool_calls"):
            content = json.dumps(turn["tool_calls"], ensure_ascii=False)
        if content is None:
            raise RecordError(f"{at}.content", "missing")
        if not isinstance(content, str):
            raise RecordError(f"{at}.content", f"expected a string, got {type(content).__name__}")
        if not content.strip():
            raise RecordError(f"{at}.content", "empty")
        messages.append({"role": role, "content": content})
    return messages


def _openai(obj: dict) -> list[dict]:
    if "messages" in obj:
        return _openai_messages(_list(obj, "messages"), "messages")
    prompt = _object(obj.get("input"), "input")
    return (_openai_messages(_list(prompt, "messages", path="input.messages"), "input.messages")
            + _openai_messages(_list(obj, "preferred_output"), "preferred_output"))


def _dolly(obj: dict) -> list[dict]:
    prompt = _join(_text(obj, "instruction"), _text(obj, "context", required=False))
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(obj, "response")}]


def _openorca(obj: dict) -> list[dict]:
    system = _text(obj, "system_prompt", required=False) or _text(obj, "system", required=False)
    question = _text(obj, "question")
    answer = _text(obj, "chosen") if "chosen" in obj and "response" not in obj else _text(obj, "response")
    return _system(system) + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# --------------------------------------------------------------------------- OASST trees


def _oasst_root(tree: dict) -> tuple[dict, str]:
    if "prompt" in tree:
        return _object(tree["prompt"], "prompt"), "prompt"
    if tree.get("parent_id") is not None and not tree.get("replies"):
        raise RecordError("parent_id", "a reply outside its tree; ingest export trees or root messages "
                                       "with their replies")
    return tree, ""


def _usable(node: Any) -> bool:
    return isinstance(node, dict) and not node.get("deleted") and node.get("review_result") is not False


def _replies(node: dict, where: str) -> list[tuple[dict, str]]:
    replies = node.get("replies") or []
    if not isinstance(replies, list):
        raise RecordError(f"{where}replies", f"expected a list, got {type(replies).__name__}")
    return [(r, f"{where}replies[{i}]") for i, r in enumerate(replies) if _usable(r)]


def _oasst_turn(node: dict, where: str) -> dict:
    at = f"{where}." if where else ""
    role = OASST_ROLES.get(_hashable(node.get("role")))
    if role is None:
        raise RecordError(f"{at}role", f"unknown role {node.get('role')!r}")
    return {"role": role, "content": _text(node, "text", path=f"{at}text")}


def _rank_key(item: tuple[int, tuple[dict, str]]) -> tuple:
    index, (node, _) = item
    rank = node.get("rank")
    return (not isinstance(rank, (int, float)), rank if isinstance(rank, (int, float)) else 0, index)


def _ends_with_answer(path: list[dict]) -> list[dict]:
    while path and path[-1]["role"] != "assistant":
        path = path[:-1]
    return path


def flatten_oasst_tree(tree: dict, *, paths: Literal["best", "all"] = "best") -> list[list[dict]]:
    """Conversations of an OASST tree (or root message with replies), each ending with an answer.

    ``best``: one conversation, following the best-ranked reply at every turn.
    ``all``: every root-to-leaf path. Deleted and failed-review replies are skipped.
    """
    root, where = _oasst_root(tree)
    first = _oasst_turn(root, where)
    if first["role"] != "user":
        raise RecordError(f"{where}.role" if where else "role", "a conversation starts with the prompter")
    conversations: list[list[dict]] = []

    def walk(node: dict, at: str, path: list[dict]) -> None:
        children = sorted(enumerate(_replies(node, f"{at}." if at else "")), key=_rank_key)
        if paths == "best":
            children = children[:1]
        if not children:
            conversations.append(_ends_with_answer(path))
        for _, (child, child_at) in children:
            walk(child, child_at, path + [_oasst_turn(child, child_at)])

    walk(root, where, [first])
    unique = []
    for conv in conversations:
        if conv and conv not in unique:
            unique.append(conv)
    if not unique:
        raise RecordError(f"{where}.replies" if where else "replies", "no assistant reply")
    return unique


def _oasst(obj: dict) -> list[dict]:
    return flatten_oasst_tree(obj, paths="best")[0]


# --------------------------------------------------------------------------- entry point

_CONVERTERS: dict[str, Callable[[dict], list[dict]]] = {
    "alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai, "oasst": _oasst,
    "dolly": _dolly, "openorca": _openorca,
}


def to_messages(obj: dict, fmt: str) -> list[dict]:
    """Normalize one record of format ``fmt``; raises RecordError naming the field."""
    if fmt not in _CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if not isinstance(obj, dict):
        raise RecordError(None, f"expected a JSON object, got {type(obj).__name__}")
    try:
        return _check(_CONVERTERS[fmt](obj))
    except RecordError as exc:
        looks_like = detect_format(obj)
        if looks_like and looks_like != fmt:  # the usual cause: the source's format is wrong
            raise RecordError(exc.field, f"{exc.reason} (record looks like {looks_like}, not {fmt})") from None
        raise
