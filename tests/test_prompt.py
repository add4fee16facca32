"""Rendering API content into the chat template, and parsing tool calls back out."""
import asyncio
import json
from types import SimpleNamespace

from fastmode.engine.request import Status, TokenDelta
from fastmode.server.generation import Generation, Outcome
from fastmode.server.messages import _stream
from fastmode.server.prompt import forced_tool_prefix, parse_output, render_prompt
from fastmode.server.validate import parse_messages_request
from fastmode.tokenizer.chat_template import ChatTemplate
from fastmode.weights.tiny import CHATML_TEMPLATE

TEMPLATE = ChatTemplate(CHATML_TEMPLATE)
TOOLS = [{"name": "get_weather", "description": "Weather by city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def render(body):
    return render_prompt(parse_messages_request({"model": "m", "max_tokens": 5, **body}, "2023-06-01"), TEMPLATE)


def test_system_messages_render_where_they_stand():
    text = render({"system": "Be brief.", "messages": [
        {"role": "user", "content": "one"}, {"role": "system", "content": "Now answer in French."},
        {"role": "user", "content": "two"}]})
    assert text.index("Be brief.") < text.index("one") < text.index("Now answer in French.") < text.index("two")
    assert text.endswith("<|im_start|>assistant\n")


def test_tools_tool_use_and_tool_results_are_rendered():
    text = render({"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21C, sunny"}]}]})
    assert '"get_weather"' in text and "<tool_call>" in text and '"city": "Paris"' in text
    assert "<tool_response>\n21C, sunny\n</tool_response>" in text
    failed = render({"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                      "content": "city is required"}]}]})
    assert "<tool_response>\nError: city is required\n</tool_response>" in failed


def test_assistant_prefill_is_continued():
    text = render({"messages": [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}]})
    assert text.endswith("<|im_start|>assistant\n1, 2,")


def test_parse_output_turns_tool_calls_into_tool_use_blocks():
    out = parse_output('Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
                       TOOLS)
    assert out[0] == {"type": "text", "text": "Let me check."}
    assert out[1]["type"] == "tool_use" and out[1]["name"] == "get_weather" and out[1]["input"] == {"city": "Oslo"}
    assert out[1]["id"].startswith("toolu_")
    assert parse_output("<tool_call>{broken", TOOLS) == [{"type": "text", "text": "<tool_call>{broken"}]
    assert parse_output("plain", []) == [{"type": "text", "text": "plain"}]


def test_a_required_tool_call_is_started_for_the_model():
    two = TOOLS + [{"name": "get_time", "input_schema": {}}]
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    for choice, tools, prefix in (
            ({"type": "tool", "name": "get_time"}, two, '<tool_call>{"name": "get_time", "arguments": '),
            ({"type": "any"}, TOOLS, '<tool_call>{"name": "get_weather", "arguments": '),  # one tool: named
            ({"type": "any"}, two, '<tool_call>{"name": "'),
            ({"type": "auto"}, two, ""), ({"type": "none"}, two, ""), (None, two, "")):
        body = {"tools": tools, "messages": msgs, **({"tool_choice": choice} if choice else {})}
        req = parse_messages_request({"model": "m", "max_tokens": 5, **body}, "2023-06-01")
        assert forced_tool_prefix(req) == prefix
        assert render(body).endswith("<|im_start|>assistant\n" + prefix)


def test_parse_output_reads_the_call_object_and_keeps_the_text_before_it_as_streamed():
    out = parse_output('See: <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}} trailing</tool_call>', TOOLS)
    assert out[0] == {"type": "text", "text": "See: "}  # as the stream sent it, trailing space included
    assert out[1]["input"] == {"city": "Oslo"}
    unclosed = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
    assert parse_output(unclosed, TOOLS)[0]["input"] == {"city": "Rome"}
    assert parse_output('<tool_call>{"name": "nope", "arguments": {}}', TOOLS)[0]["type"] == "text"


def test_streamed_blocks_add_up_to_the_non_streamed_ones():
    """The SSE stream of a reply whose text was streamed before a held-back tail (a tool call,
    or a malformed one that stays text) gives the same blocks as the non-streamed reply."""
    class Gen:
        def __init__(self, sent, tail):
            self.sent, self.outcome = sent, Outcome(text=sent, tail=tail, output_tokens=3, stop_reason="end_turn")

        async def admitted(self):
            pass

        async def stream(self):
            yield self.sent

    prep = SimpleNamespace(entry=SimpleNamespace(id="m"), req=SimpleNamespace(tools=TOOLS, tool_choice=None),
                           usage=lambda n, cache=None: {"input_tokens": 1, "output_tokens": n})

    async def events(gen):
        return [chunk async for chunk in _stream(gen, "msg_1", prep)]

    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    for sent, tail in (("Let me check. ", call), ("Let me check. ", "<tool_call>{broken"), ("", "<tool_call>{broken")):
        blocks: list[dict] = []
        stop = None
        for raw in asyncio.run(events(Gen(sent, tail))):
            event = json.loads(raw.decode().split("data: ", 1)[1])
            if event["type"] == "content_block_start":
                assert event["index"] == len(blocks)
                blocks.append(dict(event["content_block"]))
            elif event["type"] == "content_block_delta":
                d = event["delta"]
                if d["type"] == "text_delta":
                    blocks[event["index"]]["text"] += d["text"]
                else:
                    blocks[event["index"]]["input"] = json.loads(d["partial_json"])
            elif event["type"] == "message_delta":
                stop = event["delta"]["stop_reason"]
        expect = parse_output(sent + tail, TOOLS)
        for b in blocks + expect:
            b.pop("id", None)
        assert blocks == expect, (sent, tail)
        assert stop == ("tool_use" if any(b["type"] == "tool_use" for b in expect) else "end_turn")


def test_a_call_whose_object_does_not_close_reads_by_its_arguments():
    """The model closes the arguments but not the call object (a forced call it continues):
    the arguments still make the tool_use; a call without readable arguments stays text."""
    short = '<tool_call>{"name": "get_weather", "arguments": \n{"city": "Paris"}\n</tool_call>\n<tools>\n{"name"'
    out = parse_output(short, TOOLS)
    assert [b["type"] for b in out] == ["tool_use"] and out[0]["input"] == {"city": "Paris"}
    assert parse_output('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', TOOLS)[0]["type"] == "text"
    assert parse_output('<tool_call>{"name": "get_weather", "arguments": [1]</tool_call>', TOOLS)[0]["type"] == "text"
    assert parse_output('<tool_call>{"name": "nope", "arguments": {"a": 1}</tool_call>', TOOLS)[0]["type"] == "text"
    # a closed call: arguments that are no object leave text; a string of a JSON object reads as it
    assert parse_output('<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', TOOLS)[0]["type"] == "text"
    quoted = parse_output('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>', TOOLS)
    assert quoted[0]["type"] == "tool_use" and quoted[0]["input"] == {"city": "Oslo"}
    assert parse_output('<tool_call>{"name": "get_weather"}</tool_call>', TOOLS)[0]["input"] == {}  # no arguments


def test_parallel_tool_use_off_keeps_the_first_call():
    calls = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
             '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>')
    assert [b["input"]["city"] for b in parse_output(calls, TOOLS)] == ["Oslo", "Rome"]
    assert [b["input"]["city"] for b in parse_output(calls, TOOLS, single=True)] == ["Oslo"]


class ScriptedEngine:
    """Hands a Generation its tokens one delta each, as the engine thread would, then finishes
    with max_tokens; records aborts."""

    def __init__(self, pieces, end=Status.FINISHED_LENGTH):
        self.pieces, self.end, self.aborted = pieces, end, []

    def add(self, request_id, prompt_ids, params, lane, on_delta, priority=0, cache=None, pool=None, max_len=None):
        for i in range(len(self.pieces)):
            on_delta(TokenDelta(request_id, [i], Status.RUNNING))
        on_delta(TokenDelta(request_id, [], self.end))

    def abort(self, request_id):
        self.aborted.append(request_id)


def generate(pieces, tools=True, single=False, prefix=""):
    """(streamed text, outcome, aborted) of a scripted reply whose token i decodes to pieces[i]."""
    engine = ScriptedEngine(pieces)
    tokenizer = SimpleNamespace(decode=lambda ids: "".join(pieces[i] for i in ids))

    async def run():
        gen = Generation(engine, tokenizer, [1], None, None, [], tool_names=[t["name"] for t in TOOLS] if tools else (),
                         prefix=prefix,
                         single_tool_call=single)
        gen.start()
        return "".join([chunk async for chunk in gen.stream()]), gen.outcome
    text, outcome = asyncio.run(run())
    return text, outcome, bool(engine.aborted)


def test_the_reply_ends_after_its_tool_calls():
    """Text after a reply's tool calls is dropped from the reply, so the model stops at the
    first token after them that is not another call: the rest is neither generated nor counted."""
    call = ['<tool_call>', '{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}', '</tool_call>']
    ramble = ['\n', 'The', ' weather', ' is', ' nice']
    text, out, aborted = generate(["Let me check. "] + call + ramble)
    assert text == "Let me check. " and out.tail == "".join(call)
    assert out.output_tokens == 1 + len(call) + 2  # up to the first token that is not another call
    assert out.stop_reason == "tool_use" and aborted
    assert [b["type"] for b in parse_output(text + out.tail, TOOLS)] == ["text", "tool_use"]
    # another call after the first: both kept, the reply ends after the second
    text, out, _ = generate(call + ['\n', '<tool', '_call>'] + call[1:] + ramble)
    assert out.tail == "".join(call) + "\n" + "".join(call) and out.output_tokens == len(call) + 3 + len(call) - 1 + 2
    # parallel tool use off: the first call's close ends it
    text, out, _ = generate(call + ['\n', '<tool_call>'] + call[1:], single=True)
    assert out.tail == "".join(call) and out.output_tokens == len(call)
    # a forced call's start is the prompt's: the model writes the rest
    text, out, _ = generate(['{"city": "Oslo"}}', '</tool_call>', ' Done', '.'], prefix=call[0] + call[1] + '"arguments": ')
    assert out.output_tokens == 3 and parse_output(text + out.tail, TOOLS)[0]["input"] == {"city": "Oslo"}
    # without tools a "call" is text, and the reply runs to its end
    text, out, aborted = generate(call + ramble, tools=False)
    assert text == "".join(call + ramble) and out.output_tokens == len(call + ramble)
    assert out.stop_reason == "max_tokens" and not aborted


def test_calls_that_do_not_read_end_nothing():
    """A reply that only mentions the tags, or whose call names no tool, runs to its end as
    text; with parallel tool use off, a first call that does not read leaves the next one to end it."""
    mention = ["Use ", "<tool_call>", "x", "</tool_call>", " to", " call", "."]
    text, out, aborted = generate(mention)
    assert out.text + out.tail == "".join(mention) and out.stop_reason == "max_tokens" and not aborted
    unknown = ['<tool_call>', '{"name": "nope", "arguments": {}}', '</tool_call>', ' then', ' more']
    text, out, _ = generate(unknown)
    assert out.output_tokens == len(unknown) and out.stop_reason == "max_tokens"
    good = ['<tool_call>', '{"name": "get_weather", "arguments": {"city": "Rome"}}', '</tool_call>']
    text, out, _ = generate(unknown[:3] + ['\n'] + good + [' bye'], single=True)
    assert out.output_tokens == 3 + 1 + 3 and out.stop_reason == "tool_use"
    assert [b["input"] for b in parse_output(out.text + out.tail, TOOLS, single=True) if b["type"] == "tool_use"] == [
        {"city": "Rome"}]


def test_a_cut_reply_streams_and_records_as_tool_use():
    """The reply cut after its call, through the SSE stream, the non-streamed message and the
    usage row: the same blocks, stop reason tool_use in all three; tool_choice none shows the
    model no tools, so a call it writes anyway is text."""
    from fastmode.server.messages import final_message, finish
    pieces = ["Checking. ", '<tool_call>', '{"name": "get_weather", "arguments": {"city": "Oslo"}}', '</tool_call>',
              ' Sure', '!']
    tokenizer = SimpleNamespace(decode=lambda ids: "".join(pieces[i] for i in ids))
    recorded = []
    for choice in (None, {"type": "none"}):
        prep = SimpleNamespace(entry=SimpleNamespace(id="m"), req=SimpleNamespace(tools=TOOLS, tool_choice=choice),
                               usage=lambda n, cache=None: {"output_tokens": n}, ledger_usage=lambda n, cache=None: n)
        names = [t["name"] for t in TOOLS] if choice is None else ()

        async def run(streamed):
            gen = Generation(ScriptedEngine(pieces), tokenizer, [1], None, None, [], tool_names=names)
            gen.start()
            if streamed:
                events = [json.loads(raw.decode().split("data: ", 1)[1]) async for raw in _stream(gen, "msg_1", prep)]
            else:
                events = [chunk async for chunk in gen.stream()]
            finish(gen, SimpleNamespace(finish=lambda usage, stop: recorded.append((usage, stop))), prep)
            return gen, events
        gen, events = asyncio.run(run(True))
        delta = next(e for e in events if e["type"] == "message_delta")
        kinds = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
        gen2, _ = asyncio.run(run(False))
        msg = final_message(prep, gen2, "msg_2")
        if choice is None:  # the model ends its turn right after the call: the row says tool_use too
            ended = Generation(ScriptedEngine(pieces[:4], Status.FINISHED_STOPPED), tokenizer, [1], None, None, [],
                               tool_names=names)

            async def drain():
                ended.start()
                return [chunk async for chunk in ended.stream()]
            asyncio.run(drain())
            assert ended.outcome.stop_reason == "end_turn"
            finish(ended, SimpleNamespace(finish=lambda usage, stop: recorded.append((usage, stop))), prep)
            assert recorded.pop() == (4, "tool_use")
        if choice is None:
            assert kinds == ["text", "tool_use"] and delta["delta"]["stop_reason"] == "tool_use"
            assert delta["usage"]["output_tokens"] == 5
            assert [b["type"] for b in msg["content"]] == ["text", "tool_use"] and msg["stop_reason"] == "tool_use"
            assert recorded == [(5, "tool_use"), (5, "tool_use")]
        else:
            assert kinds == ["text"] and delta["delta"]["stop_reason"] == "max_tokens"
            assert msg["content"] == [{"type": "text", "text": "".join(pieces)}] and msg["stop_reason"] == "max_tokens"
            assert recorded[2:] == [(6, "max_tokens"), (6, "max_tokens")]
