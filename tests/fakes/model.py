"""What the fake model answers, whatever wire format asks it: each format reads its own body
into a Question and writes the Answer in its own shapes.

The model calls a tool when tools are offered and the tool choice asks for one (a named
tool, `required` or `any`), or allows one (`auto` or none given) and the last message is
the user's; after a tool's result it answers text. A tool's arguments are TOOL_ARGUMENTS,
or for a tool of free text (one string parameter, `input`) FREE_TEXT_ARGUMENTS. Its text is the upstream's `pieces`
(one stream chunk each), JSON in JSON mode, cut before the first stop sequence it holds
and after `max_tokens` pieces (a piece counts as a token).
"""

import json
import time
from dataclasses import dataclass

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
TOOL_ARGUMENTS = '{"city": "Paris"}'
# A patch as Codex's apply_patch takes it: lines, quotes, a backslash, a character beyond ASCII.
FREE_TEXT_INPUT = '*** Begin Patch\n*** Add File: hello.txt\n+print("Hello \\ world") # café\n*** End Patch\n'
FREE_TEXT_ARGUMENTS = json.dumps({"input": FREE_TEXT_INPUT})
JSON_ANSWER = '{"answer": "Hello!"}'
ARGUMENT_PART_LENGTH = 7  # a stream sends the tool's arguments in parts of this many characters


@dataclass(frozen=True)
class Question:
    tools: tuple = ()  # the names of the tools offered
    free_text_tools: tuple = ()  # those taking free text: one string parameter, `input`
    forced_tool: str | None = None  # the tool the choice names
    tool_choice: str = "auto"  # auto, none or required
    last_is_users: bool = True  # the last message is the user's, not a tool's result
    json_mode: bool = False
    max_tokens: int | None = None
    stop_sequences: tuple = ()


@dataclass(frozen=True)
class Answer:
    pieces: tuple  # the text, one stream chunk a piece
    tool: str | None = None  # the tool called
    finish: str = "stop"  # stop, length, stop_sequence or tool_calls
    stop_sequence: str | None = None
    arguments: str = TOOL_ARGUMENTS  # the tool call's

    @property
    def text(self):
        return "".join(self.pieces)


def called_tool(question):
    if not question.tools or question.tool_choice == "none":
        return None
    if question.forced_tool:
        return question.forced_tool
    if question.tool_choice == "required" or question.last_is_users:
        return question.tools[0]
    return None


def cut(pieces, length):
    """The pieces holding the first `length` characters of their text."""
    kept, size = [], 0
    for piece in pieces:
        if size + len(piece) > length:
            kept.append(piece[: length - size])
            break
        kept.append(piece)
        size += len(piece)
    return [piece for piece in kept if piece]


def answer_to(question, pieces):
    """What the model says to the question, its text made of `pieces`."""
    tool = called_tool(question)
    if tool:
        arguments = FREE_TEXT_ARGUMENTS if tool in question.free_text_tools else TOOL_ARGUMENTS
        return Answer((), tool=tool, finish="tool_calls", arguments=arguments)
    pieces = [JSON_ANSWER] if question.json_mode else list(pieces)
    text = "".join(pieces)
    found = [(text.find(stop), stop) for stop in question.stop_sequences if stop and stop in text]
    stop_sequence = None
    if found:
        at, stop_sequence = min(found)
        pieces = cut(pieces, at)
    if question.max_tokens is not None and len(pieces) > question.max_tokens:
        return Answer(tuple(pieces[: question.max_tokens]), finish="length")
    return Answer(tuple(pieces), finish="stop_sequence" if stop_sequence else "stop", stop_sequence=stop_sequence)


def last_text(body):
    """The text of the body's last message (its text blocks, when it has blocks)."""
    content = (body.get("messages") or [{}])[-1].get("content")
    if isinstance(content, list):
        return " ".join(block.get("text", "") for block in content if isinstance(block, dict))
    return content if isinstance(content, str) else ""


def knobs_of(body):
    """A benchmark's knobs, `fake_pieces=N` and `fake_interval=S` among the words of the last
    message: there they reach the fake through every protocol, where unknown fields do not."""
    words = last_text(body).split()
    return dict(word.split("=", 1) for word in words if word.startswith(("fake_pieces=", "fake_interval=")))


def long_stream_prompt(pieces, interval):
    """A prompt whose streamed answer is `pieces` chunks, `interval` seconds apart."""
    return f"Hi fake_pieces={pieces} fake_interval={interval}"


def pieces_of(upstream, body):
    """The upstream's pieces; a benchmark's `fake_pieces` asks for that many."""
    pieces = knobs_of(body).get("fake_pieces")
    return ["tok "] * int(pieces) if pieces else upstream.pieces


def interval_of(upstream, body):
    """Seconds between a stream's chunks; a benchmark's `fake_interval` sets them."""
    return float(knobs_of(body).get("fake_interval", upstream.chunk_interval))


def takes_free_text(parameters):
    """Whether a tool's parameters (a JSON schema) are one string, `input`."""
    properties = (parameters or {}).get("properties") or {}
    return list(properties) == ["input"] and properties["input"].get("type") == "string"


def argument_parts(arguments):
    """A tool call's arguments as a stream sends them: in several parts."""
    return [arguments[at : at + ARGUMENT_PART_LENGTH] for at in range(0, len(arguments), ARGUMENT_PART_LENGTH)]


def unique_id(prefix):
    return f"{prefix}{time.monotonic_ns()}"
