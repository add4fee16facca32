"""Rendering API content into the chat template, and parsing tool calls back out."""
from fastmode.server.prompt import parse_output, render_prompt
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
