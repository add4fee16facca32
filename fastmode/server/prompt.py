"""Messages API content -> the model's prompt text, and model output text -> content blocks."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from fastmode.server.errors import InvalidRequest, new_id
from fastmode.server.validate import MessagesRequest, breakpoint_ttl, cacheable_blocks
from fastmode.tokenizer.chat_template import ChatTemplate, ChatTemplateError

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
MARK = "\ufdd0"  # a Unicode noncharacter: marks where a block ends while rendering (see render_marked)
_TOOL_CALL = re.compile(re.escape(TOOL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CLOSE) + r"|$)", re.S)


def _tool_prompt(tools: list[dict[str, Any]], choice: dict[str, Any] | None, mark: str) -> str:
    specs = "\n".join(json.dumps({"name": t["name"], "description": t.get("description", ""),
                                  "input_schema": t.get("input_schema", {})}, ensure_ascii=False) + mark
                      for t in tools)
    text = ("You can call these tools. To call one, reply with "
            f'{TOOL_OPEN}{{"name": "<tool name>", "arguments": {{...}}}}{TOOL_CLOSE}\n<tools>\n{specs}\n</tools>')
    if choice and choice.get("type") == "any":
        text += "\nYou must call one of the tools."
    elif choice and choice.get("type") == "tool":
        text += f"\nYou must call the tool {choice['name']}."
    return text


def forced_tool_prefix(req: MessagesRequest) -> str:
    """The start of a tool call that the model continues when `tool_choice` requires one: the
    call's opening and, for type "tool" (or "any" with a single tool), the tool's name, so that
    the model writes the arguments. Part of the prompt, and of the text parsed into blocks."""
    choice = (req.tool_choice or {}).get("type")
    if not req.tools or choice not in ("any", "tool"):
        return ""
    if choice == "tool" or len(req.tools) == 1:
        name = req.tool_choice["name"] if choice == "tool" else req.tools[0]["name"]  # type: ignore[index]
        return f'{TOOL_OPEN}{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '
    return f'{TOOL_OPEN}{{"name": "'


def callable_tools(req: MessagesRequest) -> list[dict[str, Any]]:
    """The tools the model is shown and may call: none with `tool_choice` "none"."""
    return [] if (req.tool_choice or {}).get("type") == "none" else req.tools


def single_tool_call(req: MessagesRequest) -> bool:
    """Whether a reply may hold one tool call at most (`disable_parallel_tool_use`)."""
    return bool((req.tool_choice or {}).get("disable_parallel_tool_use"))


def _block_text(block: dict[str, Any], where: str, model: str) -> str:
    t = block["type"]
    if t == "text":
        return block["text"]
    if t == "image":
        raise InvalidRequest(f"{where}: model {model} is text-only and does not accept image input; "
                             f"remove the image block or describe it in text")
    if t == "document":
        src = block.get("source") or {}
        if src.get("type") == "text" and isinstance(src.get("data"), str):
            return src["data"]
        if src.get("type") == "content" and isinstance(src.get("content"), (list, str)):
            inner = src["content"]
            return inner if isinstance(inner, str) else "\n".join(
                c.get("text", "") for c in inner if isinstance(c, dict))
        raise InvalidRequest(f"{where}: model {model} reads only plain-text documents "
                             f"(source type 'text' or 'content'), not {src.get('type')!r}")
    if t == "search_result":
        parts = [block.get("title", "")] + [c.get("text", "") for c in block.get("content", []) if isinstance(c, dict)]
        return "\n".join(p for p in parts if p)
    if t == "tool_use":
        call = {"name": block["name"], "arguments": block.get("input", {})}
        return f"{TOOL_OPEN}{json.dumps(call, ensure_ascii=False)}{TOOL_CLOSE}"
    if t == "tool_result":
        content = block.get("content", "")
        if isinstance(content, list):
            content = "\n".join(_block_text(c, where, model) for c in content if c.get("type") != "image")
        if block.get("is_error"):
            content = f"Error: {content}"
        return f"<tool_response>\n{content}\n</tool_response>"
    return ""  # thinking and server-tool blocks carry nothing this model reads


def render_prompt(req: MessagesRequest, template: ChatTemplate) -> str:
    """The full prompt text; a final assistant message is a prefill the model continues.

    Content comes in the API's prefix order: tool definitions, then system text, then the
    messages, so a cached prefix ending at a tool or system block holds only what precedes it."""
    return _render(req, template, "")


@dataclass
class Rendered:
    """The prompt text, and per cacheable block (tools, system blocks, message blocks, in
    order) the offset in `text` where the block ends and its breakpoint TTL, if it has one."""

    text: str
    ends: list[int]
    ttls: list[str | None]


def render_marked(req: MessagesRequest, template: ChatTemplate) -> Rendered | None:
    """Render once with a mark after every block to learn where each block ends; None when that
    cannot be told (the text holds the mark character itself, or the template drops content)."""
    blocks = cacheable_blocks(req)
    marked = _render(req, template, MARK)
    if marked.count(MARK) != len(blocks):
        return None
    ends, text = [], []
    at = 0
    for part in marked.split(MARK)[:-1]:
        at += len(part)
        ends.append(at)
    text = marked.replace(MARK, "")
    if text != _render(req, template, ""):
        return None
    return Rendered(text, ends, [breakpoint_ttl(b) for _, b in blocks])


def _render(req: MessagesRequest, template: ChatTemplate, mark: str) -> str:
    system = "\n\n".join(b["text"] + mark for b in req.system)
    if req.tools and (req.tool_choice or {}).get("type") != "none":
        tools = _tool_prompt(req.tools, req.tool_choice, mark)
        system = tools + "\n\n" + system if req.system else tools
    turns: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for i, m in enumerate(req.messages):
        text = "".join(_block_text(b, f"messages.{i}.content.{j}", req.model) + mark for j, b in enumerate(m.blocks))
        if turns and turns[-1]["role"] == m.role and m.role != "system":
            turns[-1]["content"] += "\n\n" + text  # consecutive same-role turns are merged
        else:
            turns.append({"role": m.role, "content": text})
    if req.tools and (req.tool_choice or {}).get("type") == "none":
        # tools not shown to the model are still blocks of the prefix: mark them at the start
        # of the first turn (a turn of marks alone would change the rendered text)
        turns[0]["content"] = mark * len(req.tools) + turns[0]["content"]
    prefill = ""
    if turns[-1]["role"] == "assistant":
        prefill = _rstrip_keeping(turns.pop()["content"], mark)
    try:
        return template.render(turns, add_generation_prompt=True) + prefill + forced_tool_prefix(req)
    except ChatTemplateError as e:
        raise InvalidRequest(f"messages: {e}") from e


def _rstrip_keeping(text: str, mark: str) -> str:
    """`text.rstrip()`, keeping the marks that stood in the stripped whitespace."""
    if not mark:
        return text.rstrip()
    i = len(text)
    while i and (text[i - 1].isspace() or text[i - 1] == mark):
        i -= 1
    return text[:i] + mark * text[i:].count(mark)


def parse_output(text: str, tools: list[dict[str, Any]], single: bool = False) -> list[dict[str, Any]]:
    """Model text -> content blocks: the text before the first tool call as it streamed, then a
    tool_use block per tool call that reads (only the first with `single`: parallel tool use
    off); all text when none does. A call reads when its JSON object does (what follows the
    object up to the call's close is ignored), or, where the object does not close, when it
    starts with a known tool's name and its arguments object reads."""
    if not tools or TOOL_OPEN not in text:
        return [{"type": "text", "text": text}] if text else []
    names = {t["name"] for t in tools}
    head = text[: text.index(TOOL_OPEN)]
    blocks: list[dict[str, Any]] = [{"type": "text", "text": head}] if head else []
    for m in _TOOL_CALL.finditer(text):
        call = read_call(m.group(1))
        if call is None or call[0] not in names:
            continue
        blocks.append({"type": "tool_use", "id": new_id("toolu_"), "name": call[0], "input": call[1]})
        if single:
            break
    if not any(b["type"] == "tool_use" for b in blocks):
        return [{"type": "text", "text": text}]
    return blocks


_DECODER = json.JSONDecoder()
# a call's start as the prompt asks for it: its name, then its arguments (or input)
_CALL_START = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|input)"\s*:\s*')


def read_call(body: str) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) of a tool call's text (what stands between its tags), or None where
    it does not read. Arguments given as a string of JSON (a habit from other APIs) read as
    that object; no arguments, as an empty one."""
    try:
        call, _ = _DECODER.raw_decode(body)
    except json.JSONDecodeError:
        call = None
    if isinstance(call, dict) and isinstance(call.get("name"), str):
        args = call.get("arguments", call.get("input", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        return (call["name"], args) if isinstance(args, dict) else None
    start = _CALL_START.match(body)  # the object does not close: read the arguments alone
    if start is None:
        return None
    try:
        name, (args, _) = json.loads(start.group(1)), _DECODER.raw_decode(body, start.end())
    except json.JSONDecodeError:
        return None
    return (name, args) if isinstance(args, dict) else None
