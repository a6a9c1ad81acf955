"""model/tool_calls.py: tools and calls written the way the model was trained, parsed back, forced by a grammar.

Expected prompts are written out from the templates they follow: Qwen2.5's chat template (tools in the
system turn, <tool_call> blocks, tool results as a user turn of <tool_response> blocks) and Meta's
Llama 3.1 JSON tool calling (tools and instructions open the first user message; a call is
{"name", "parameters"}).
"""

from __future__ import annotations

import json

import pytest

from model.chat import render_chat
from model.grammar import GrammarMatcher, GrammarSpec, allowed_tokens, new_bitmask
from model.tokenizer import ByteTokenizer
from model.tool_calls import Tool, ToolCallParser, forced_call_grammar, prepare_messages

CHATML = ByteTokenizer(("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
LLAMA3 = ByteTokenizer(("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
WEATHER = Tool(
    "get_weather",
    "Current weather in a city",
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]},
)
TIME = Tool("get_time", None, {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]})
HISTORY = [
    {"role": "user", "content": "Weather in Paris and Berlin?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"name": "get_weather", "arguments": '{"city":"Berlin"}'},
        ],
    },
    {"role": "tool", "content": "18C"},
    {"role": "tool", "content": "15C"},
]


def test_hermes_prompt_is_qwen25s_template() -> None:
    prepared, default_system = prepare_messages(HISTORY, [WEATHER], "hermes", "You are helpful.")
    ids = render_chat(prepared, CHATML, "chatml", default_system=default_system)
    tool_json = json.dumps(WEATHER.openai())
    expected = (
        "<|im_start|>system\nYou are helpful.\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
        "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{tool_json}\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Berlin?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n15C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids == CHATML.encode(expected, allow_special=True)


def test_hermes_tools_join_an_existing_system_message_and_need_no_default() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    prepared, default_system = prepare_messages(messages, [WEATHER], "hermes", "Default system.")
    assert default_system is None
    assert prepared[0]["role"] == "system" and prepared[0]["content"].startswith("Be brief.\n\n# Tools")
    assert "Default system." not in json.dumps(prepared)


def test_llama3_prompt_is_metas_json_tool_format() -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    prepared, _ = prepare_messages(
        [
            *messages,
            {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]},
        ]
        + [{"role": "tool", "content": "18C"}],
        [WEATHER],
        "llama3_json",
        None,
    )
    ids = render_chat(prepared, LLAMA3, "llama3")
    expected = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its proper arguments that best "
        'answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of argument name '
        "and its value}. Do not use variables.\n\n"
        f"{json.dumps(WEATHER.openai(), indent=4)}\n\nWeather in Paris?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n18C<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert ids == LLAMA3.encode(expected, allow_special=True)


def parse(text: str, style: str, chunk: int) -> tuple[str, list[tuple[str, dict[str, object]]]]:
    parser = ToolCallParser([WEATHER, TIME], style)  # type: ignore[arg-type]
    events = []
    for start in range(0, len(text), chunk):
        events += parser.feed(text[start : start + chunk])
    events += parser.finish()
    content = "".join(e.content for e in events)
    calls = [(e.call.name, json.loads(e.call.arguments)) for e in events if e.call is not None]
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == calls
    return content, calls


@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_hermes_output_splits_into_content_and_calls_whatever_the_chunking(chunk: int) -> None:
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    )
    content, calls = parse(text, "hermes", chunk)
    assert content == "Let me check.\n"
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',  # not one of the tools
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>\n{"name": "get_time", "arguments": "UTC"}\n</tool_call>',  # arguments must be an object
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}',  # never closed
        "a < b and <tool_c",  # a partial tag is held back, then released
    ],
)
def test_text_that_is_not_a_call_stays_content_to_the_last_character(text: str) -> None:
    for chunk in (1, 3, 1000):
        assert parse(text, "hermes", chunk) == (text, [])


def test_llama3_json_replies_are_calls_and_other_replies_stream_as_content() -> None:
    assert parse('  {"name": "get_weather", "parameters": {"city": "Oslo"}}', "llama3_json", 4) == (
        "",
        [("get_weather", {"city": "Oslo"})],
    )
    two = '{"name": "get_weather", "parameters": {"city": "a;b"}}; {"name": "get_time", "parameters": {"zone": "CET"}}'
    assert parse(two, "llama3_json", 7)[1] == [("get_weather", {"city": "a;b"}), ("get_time", {"zone": "CET"})]
    assert parse('{"not": "a call"}', "llama3_json", 3) == ('{"not": "a call"}', [])
    parser = ToolCallParser([WEATHER], "llama3_json")
    assert [e.content for e in parser.feed("It is ")] == ["It is "], "plain text is not held back"


def walk(grammar: str, text: str, tokenizer: ByteTokenizer = CHATML) -> GrammarMatcher:
    matcher = GrammarMatcher(GrammarSpec("grammar", grammar), tokenizer)
    for byte in text.encode():
        assert matcher.accept(byte), f"refused at {chr(byte)!r}"
    return matcher


def allowed_after(matcher: GrammarMatcher, tokenizer: ByteTokenizer = CHATML) -> set[int]:
    bitmask = new_bitmask(1, tokenizer.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    return set(allowed_tokens(bitmask, tokenizer.vocab_size)[0].nonzero().flatten().tolist())


def test_a_forced_hermes_call_follows_the_parameter_schema() -> None:
    grammar = forced_call_grammar([WEATHER, TIME], "hermes", parallel=False)
    one = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    assert walk(grammar, one).is_stopped, "one call and nothing more without parallel_tool_calls"
    matcher = walk(grammar, '<tool_call>\n{"name": "get_time", "arguments": {"zone": "')
    assert allowed_after(matcher) == {ord("U"), ord("C")}, "only the enum's values"
    refused = GrammarMatcher(GrammarSpec("grammar", grammar), CHATML)
    assert not all(refused.accept(b) for b in b'<tool_call>\n{"name": "launch')


def test_parallel_forced_calls_may_repeat_then_end() -> None:
    grammar = forced_call_grammar([WEATHER], "hermes", parallel=True)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    matcher = walk(grammar, call)
    assert allowed_after(matcher) == {ord("\n"), 257, 258}, "another call or an end"
    assert walk(grammar, call + "\n" + call).is_accepting


def test_a_forced_llama3_call_is_one_json_object() -> None:
    grammar = forced_call_grammar([WEATHER], "llama3_json", parallel=False)
    tokenizer = ByteTokenizer(("<|begin_of_text|>", "<|eot_id|>"))
    matcher = walk(grammar, '{"name": "get_weather", "parameters": {"city": "Oslo"}}', tokenizer)
    assert matcher.is_stopped


def test_forced_arguments_have_no_undeclared_keys_unless_the_schema_allows_them() -> None:
    prefix = '<tool_call>\n{"name": "f", "arguments": {"a": 1'
    closed = Tool("f", None, {"type": "object", "properties": {"a": {"type": "integer"}}})
    assert ord(",") not in allowed_after(walk(forced_call_grammar([closed], "hermes", False), prefix))
    open_ = Tool("f", None, {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True})
    assert ord(",") in allowed_after(walk(forced_call_grammar([open_], "hermes", False), prefix))
