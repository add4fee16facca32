"""Checks a Messages API request body field by field and returns a typed MessagesRequest."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastmode.platform.catalog import EFFORT_LEVELS
from fastmode.server.errors import InvalidRequest

API_VERSIONS = ("2023-06-01", "2026-10-21")
ROLES = ("user", "assistant", "system")
INPUT_BLOCKS = {"text", "image", "document", "search_result", "thinking", "redacted_thinking", "tool_use",
                "tool_result", "server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
                "code_execution_tool_result", "bash_code_execution_tool_result",
                "text_editor_code_execution_tool_result", "tool_search_tool_result", "container_upload"}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")
SERVICE_TIERS = ("auto", "standard_only", "priority")  # priority: our explicit ask for the Priority Tier
MAX_CACHE_BREAKPOINTS = 4
# Stop sequences are looked for in the output as each token arrives: bounded, so that one
# request cannot make that work (and everyone's streams with it) slow
MAX_STOP_SEQUENCES, MAX_STOP_CHARS = 64, 1000
# Every top-level field the Messages API knows (count_tokens takes the same, unused ones
# included); server-side and beta-only features this server does not implement are accepted and
# ignored, as the API allows. Anything else (a misspelt `temprature`) is a 400, as on the API.
FIELDS = {"model", "max_tokens", "messages", "system", "stop_sequences", "stream", "temperature", "top_p", "top_k",
          "metadata", "tools", "tool_choice", "thinking", "output_config", "cache_control", "service_tier", "speed",
          "inference_geo", "container", "diagnostics", "billing_policy", "compaction", "context_management",
          "fallback_credit_token", "fallbacks", "mcp_servers", "thread"}
COUNT_EXCLUDES = {"max_tokens", "stream", "stop_sequences"}  # fields of create that count_tokens does not take
CACHE_TTLS = ("5m", "1h")


@dataclass
class Message:
    role: str
    blocks: list[dict[str, Any]]  # content blocks; a string content becomes one text block


@dataclass
class MessagesRequest:
    model: str
    messages: list[Message]
    max_tokens: int = 0
    system: list[dict[str, Any]] = field(default_factory=list)
    stop_sequences: list[str] = field(default_factory=list)
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: dict[str, Any] | None = None
    speed: str = "standard"
    service_tier: str | None = None
    inference_geo: str | None = None
    thinking: dict[str, Any] | None = None
    effort: str | None = None  # output_config.effort
    cache_control: dict[str, Any] | None = None  # top level: automatic caching at the last block
    user_id: str | None = None  # metadata.user_id: the end user (scopes the draft pool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text_blocks(value: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"type": "text", "text": value}] if value else []
    if not isinstance(value, list):
        raise InvalidRequest(f"{where}: Input should be a valid string or a list of text blocks")
    for i, b in enumerate(value):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise InvalidRequest(f"{where}.{i}: Input should be a text block with a string `text`")
    return value


def _content(value: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise InvalidRequest(f"{where}: Input should be a valid string or a list of content blocks")
    for i, b in enumerate(value):
        w = f"{where}.{i}"
        if not isinstance(b, dict):
            raise InvalidRequest(f"{w}: Input should be a valid object")
        t = b.get("type")
        if t not in INPUT_BLOCKS:
            raise InvalidRequest(f"{w}.type: Input tag {t!r} found using 'type' does not match any of the "
                                 f"expected tags: {', '.join(sorted(INPUT_BLOCKS))}")
        if t == "text" and not isinstance(b.get("text"), str):
            raise InvalidRequest(f"{w}.text: Field required (a string)")
        if t == "text" and not b["text"] and not b.get("cache_control"):  # (with it: the breakpoint rule's 400)
            raise InvalidRequest(f"{w}.text: text content blocks must be non-empty")
        if t == "tool_use" and (not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str)
                                or not isinstance(b.get("input", {}), dict)):
            raise InvalidRequest(f"{w}: a tool_use block needs string `id` and `name` and an object `input`")
        if t == "document":
            src = b.get("source")
            if not isinstance(src, dict) or not isinstance(src.get("type"), str):
                raise InvalidRequest(f"{w}.source: Field required (an object with a string `type`)")
            if src["type"] == "text" and not isinstance(src.get("data"), str):
                raise InvalidRequest(f"{w}.source.data: Field required (a string) for a text document")
            if src["type"] == "content":
                _text_blocks(src.get("content"), f"{w}.source.content")
        if t == "search_result":
            for key in ("title", "source"):
                if not isinstance(b.get(key, ""), str):
                    raise InvalidRequest(f"{w}.{key}: Input should be a valid string")
            _text_blocks(b.get("content"), f"{w}.content")
        if t == "tool_result":
            if not isinstance(b.get("tool_use_id"), str):
                raise InvalidRequest(f"{w}.tool_use_id: Field required (a string)")
            if "is_error" in b and not isinstance(b["is_error"], bool):
                raise InvalidRequest(f"{w}.is_error: Input should be a valid boolean")
            if "content" in b and not isinstance(b["content"], (str, list)):
                raise InvalidRequest(f"{w}.content: Input should be a valid string or a list of blocks")
            if isinstance(b.get("content"), list):
                _content(b["content"], f"{w}.content")
    return value


def api_fields(item: dict[str, Any]) -> dict[str, Any]:
    """The Messages API fields of a dict that holds others too (a workload item's category)."""
    return {k: v for k, v in item.items() if k in FIELDS}


def parse_messages_request(body: Any, version: str, *, for_count: bool = False) -> MessagesRequest:
    """Validate the JSON body of POST /v1/messages (or count_tokens when `for_count`)."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    unknown = sorted(set(body) - (FIELDS - COUNT_EXCLUDES if for_count else FIELDS))
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: Extra inputs are not permitted")
    model = body.get("model")
    if model is None:
        raise InvalidRequest("model: Field required")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Input should be a non-empty string")
    max_tokens = 0
    if not for_count:
        if "max_tokens" not in body:
            raise InvalidRequest("max_tokens: Field required")
        max_tokens = body["max_tokens"]
        if not _is_int(max_tokens) or max_tokens < 0:
            raise InvalidRequest("max_tokens: Input should be a non-negative integer")
    raw = body.get("messages")
    if raw is None:
        raise InvalidRequest("messages: Field required")
    if not isinstance(raw, list):
        raise InvalidRequest("messages: Input should be a valid list")
    if not raw:
        raise InvalidRequest("messages: at least one message is required")
    messages: list[Message] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages.{i}: Input should be a valid object with `role` and `content`")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"messages.{i}.role: Input should be 'user', 'assistant' or 'system'")
        if "content" not in m:
            raise InvalidRequest(f"messages.{i}.content: Field required")
        blocks = (_text_blocks(m["content"], f"messages.{i}.content") if role == "system"
                  else _content(m["content"], f"messages.{i}.content"))
        if version == "2026-10-21":
            _check_2026_rules(role, blocks, i)
        if not blocks or m["content"] == "":
            if role != "assistant" or i != len(raw) - 1:
                raise InvalidRequest(f"messages.{i}: all messages must have non-empty content except for the "
                                     f"optional final assistant message")
            blocks = []  # an empty prefill: the model starts its reply
        messages.append(Message(role, blocks))
    if messages[0].role == "assistant":
        raise InvalidRequest("messages: the first message must use the `user` role")
    _check_tool_results(messages)
    req = MessagesRequest(model=model, messages=messages, max_tokens=max_tokens)
    if "system" in body and body["system"] is not None:
        req.system = _text_blocks(body["system"], "system")
    if not for_count:
        stops = body.get("stop_sequences")
        if stops is not None:
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise InvalidRequest("stop_sequences: Input should be a list of strings")
            if any(not s for s in stops):
                raise InvalidRequest("stop_sequences: each stop sequence must be a non-empty string")
            if len(stops) > MAX_STOP_SEQUENCES or any(len(s) > MAX_STOP_CHARS for s in stops):
                raise InvalidRequest(f"stop_sequences: at most {MAX_STOP_SEQUENCES} stop sequences of at most "
                                     f"{MAX_STOP_CHARS} characters each")
            req.stop_sequences = stops
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise InvalidRequest("stream: Input should be a valid boolean")
        req.stream = bool(stream)
    _sampling(body, version, req)  # count_tokens takes them too (and refuses them on 2026-10-21)
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidRequest("tools: Input should be a valid list")
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
                raise InvalidRequest(f"tools.{i}.name: Field required (a non-empty string)")
            if t.get("type") not in (None, "custom"):
                raise InvalidRequest(f"tools.{i}.type: Anthropic-defined tools ({t['type']!r}) are not available "
                                     f"on this server (capabilities.server_tools in /v1/models); define a custom "
                                     f"tool with an input_schema instead")
            if t.get("type") in (None, "custom") and not isinstance(t.get("input_schema"), dict):
                raise InvalidRequest(f"tools.{i}.input_schema: Field required (a JSON schema object)")
        names = [t["name"] for t in tools]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InvalidRequest(f"tools: tool names must be unique; {', '.join(map(repr, twice))} "
                                 f"appears more than once")
        req.tools = tools
    tc = body.get("tool_choice")
    if tc is not None:
        if not isinstance(tc, dict) or tc.get("type") not in ("auto", "any", "tool", "none"):
            raise InvalidRequest("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        if tc["type"] == "tool" and not isinstance(tc.get("name"), str):
            raise InvalidRequest("tool_choice.name: Field required when type is 'tool'")
        if tc["type"] in ("any", "tool") and not req.tools:
            raise InvalidRequest(f"tool_choice: type {tc['type']!r} needs at least one tool in `tools`")
        if tc["type"] == "tool" and tc["name"] not in {t["name"] for t in req.tools}:
            raise InvalidRequest(f"tool_choice.name: {tc['name']!r} is not one of the tools in `tools`")
        req.tool_choice = tc
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise InvalidRequest("metadata: Input should be a valid dictionary")
        user_id = metadata.get("user_id")
        if user_id is not None and (not isinstance(user_id, str) or len(user_id) > 256):
            raise InvalidRequest("metadata.user_id: Input should be a string of at most 256 characters, or null")
        req.user_id = user_id
    speed = body.get("speed")
    if speed is not None and speed not in ("standard", "fast"):
        raise InvalidRequest("speed: Input should be 'standard' or 'fast'")
    req.speed = speed or "standard"
    tier = body.get("service_tier")
    if tier is not None and tier not in SERVICE_TIERS:
        raise InvalidRequest("service_tier: Input should be 'auto', 'standard_only' or 'priority'")
    req.service_tier = tier
    geo = body.get("inference_geo")
    if geo is not None and not isinstance(geo, str):
        raise InvalidRequest("inference_geo: Input should be a valid string")
    req.inference_geo = geo
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive", "disabled", "between_tools"):
            raise InvalidRequest("thinking.type: Input should be 'enabled', 'adaptive', 'disabled' or 'between_tools'")
        if thinking["type"] == "enabled":
            budget = thinking.get("budget_tokens")
            if not _is_int(budget) or budget < 1024:
                raise InvalidRequest("thinking.budget_tokens: Input should be an integer >= 1024")
            if not for_count and budget >= max_tokens:
                raise InvalidRequest("thinking.budget_tokens: must be less than max_tokens")
        req.thinking = thinking
    oc = body.get("output_config")
    if oc is not None:
        if not isinstance(oc, dict):
            raise InvalidRequest("output_config: Input should be a valid object")
        effort = oc.get("effort")
        if effort is not None and effort not in EFFORT_LEVELS:
            raise InvalidRequest(f"output_config.effort: Input should be one of {', '.join(EFFORT_LEVELS)}")
        req.effort = effort
        if oc.get("format") is not None:
            raise InvalidRequest("output_config.format: structured outputs are not available on this server "
                                 "(capabilities.structured_outputs in /v1/models); describe the JSON you want "
                                 "in the prompt instead")
    cc = body.get("cache_control")
    if cc is not None:
        req.cache_control = _cache_control(cc, "cache_control")
    _check_breakpoints(req)
    return req


def _cache_control(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("type") != "ephemeral":
        raise InvalidRequest(f"{where}: Input should be an object with type 'ephemeral'")
    ttl = value.get("ttl")
    if ttl is not None and ttl not in CACHE_TTLS:
        raise InvalidRequest(f"{where}.ttl: Input should be '5m' or '1h'")
    unknown = sorted(set(value) - {"type", "ttl"})
    if unknown:
        raise InvalidRequest(f"{where}.{unknown[0]}: Extra inputs are not permitted")
    return value


def cacheable_blocks(req: MessagesRequest) -> list[tuple[str, dict[str, Any]]]:
    """Every block that may carry cache_control, in prefix order (tools, system, messages),
    with its location for error messages."""
    out = [(f"tools.{i}", t) for i, t in enumerate(req.tools)]
    out += [(f"system.{i}", b) for i, b in enumerate(req.system)]
    for i, m in enumerate(req.messages):
        out += [(f"messages.{i}.content.{j}", b) for j, b in enumerate(m.blocks)]
    return out


def _check_breakpoints(req: MessagesRequest) -> None:
    """At most 4 breakpoints (automatic caching takes one unless the last block has its own);
    1h breakpoints before 5m ones; no breakpoint on an empty text block."""
    ttls: list[tuple[str, str]] = []
    blocks = cacheable_blocks(req)
    for where, block in blocks:
        nested = block.get("content") if block.get("type") == "tool_result" else None
        for k, inner in enumerate(nested if isinstance(nested, list) else []):
            if isinstance(inner, dict) and inner.get("cache_control") is not None:
                ttls.append((f"{where}.content.{k}", _ttl(inner, f"{where}.content.{k}")))
        if block.get("cache_control") is None:
            continue
        if block.get("type") == "text" and not block.get("text"):
            raise InvalidRequest(f"{where}.cache_control: cache_control cannot be set for empty text blocks")
        if block.get("type") in ("thinking", "redacted_thinking"):
            raise InvalidRequest(f"{where}.cache_control: cache_control cannot be set on thinking blocks; "
                                 f"set it on a later block")
        ttls.append((where, _ttl(block, where)))
    last = blocks[-1][1] if blocks else None
    if req.cache_control is not None and last is not None and breakpoint_ttl(last) is None:
        ttls.append(("cache_control", req.cache_control.get("ttl") or "5m"))
    if len(ttls) > MAX_CACHE_BREAKPOINTS:
        raise InvalidRequest(f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. "
                             f"Found {len(ttls)}.")
    seen_5m = None
    for where, ttl in ttls:
        if ttl == "5m":
            seen_5m = seen_5m or where
        elif seen_5m is not None:
            raise InvalidRequest(f"{where}.cache_control.ttl: a ttl='1h' cache_control breakpoint must not come "
                                 f"after a ttl='5m' one ({seen_5m}); put 1h breakpoints first (order: tools, "
                                 f"system, messages)")


def breakpoint_ttl(block: dict[str, Any]) -> str | None:
    """The TTL of a block's breakpoint (its own, or one on a block inside a tool result: the
    longer wins), or None."""
    ccs = [block.get("cache_control")]
    if block.get("type") == "tool_result" and isinstance(block.get("content"), list):
        ccs += [c.get("cache_control") for c in block["content"] if isinstance(c, dict)]
    ttls = [cc.get("ttl") or "5m" for cc in ccs if isinstance(cc, dict)]
    return ("1h" if "1h" in ttls else "5m") if ttls else None


def _ttl(block: dict[str, Any], where: str) -> str:
    return _cache_control(block["cache_control"], f"{where}.cache_control").get("ttl") or "5m"


def _check_tool_results(messages: list[Message]) -> None:
    """Each tool_result answers a tool_use of the assistant message before it (as the API
    requires: a result the model never asked for has nothing to answer)."""
    asked: set[str] = set()
    for i, m in enumerate(messages):
        if m.role == "assistant":  # consecutive assistant messages are one turn
            ids = {b["id"] for b in m.blocks if b.get("type") == "tool_use"}
            asked = asked | ids if i and messages[i - 1].role == "assistant" else ids
            continue
        for j, b in enumerate(m.blocks):
            if b.get("type") == "tool_result" and b["tool_use_id"] not in asked:
                raise InvalidRequest(f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` "
                                     f"blocks: {b['tool_use_id']}. Each `tool_result` block must have a "
                                     f"corresponding `tool_use` block in the previous assistant message.")


def _check_2026_rules(role: str, blocks: list[dict[str, Any]], i: int) -> None:
    for j, b in enumerate(blocks):
        if role == "assistant" and b.get("type") == "document":
            raise InvalidRequest(f"messages.{i}.content.{j}: `document` blocks are not allowed in assistant "
                                 f"messages with anthropic-version 2026-10-21")
        cited = [b] + ([c for c in b.get("content", []) if isinstance(c, dict)] if b.get("type") == "search_result" else [])
        if role == "user" and any(c.get("type") == "text" and c.get("citations") for c in cited):
            raise InvalidRequest(f"messages.{i}.content.{j}: text blocks with citations are not allowed in user "
                                 f"messages with anthropic-version 2026-10-21")


def _sampling(body: dict[str, Any], version: str, req: MessagesRequest) -> None:
    present = [f for f in SAMPLING_FIELDS if f in body]
    if version == "2026-10-21" and present:
        raise InvalidRequest(f"{present[0]}: is not supported with anthropic-version 2026-10-21; remove "
                             f"{', '.join(present)} (the model's default decoding applies) or send "
                             f"anthropic-version: 2023-06-01")
    t, p, k = body.get("temperature"), body.get("top_p"), body.get("top_k")
    if t is not None and (not _is_number(t) or not 0.0 <= t <= 1.0):
        raise InvalidRequest("temperature: Input should be a number between 0 and 1")
    if p is not None and (not _is_number(p) or not 0.0 < p <= 1.0):
        raise InvalidRequest("top_p: Input should be a number greater than 0 and at most 1")
    if k is not None and (not _is_int(k) or k < 0):
        raise InvalidRequest("top_k: Input should be a non-negative integer")
    req.temperature, req.top_p, req.top_k = t, p, k
