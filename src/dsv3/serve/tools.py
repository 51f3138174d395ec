"""DeepSeek-V3 tool calls <-> OpenAI `tool_calls`.

DeepSeek-V3 writes a tool call with dedicated added tokens (the format its chat template renders
for an assistant message with `tool_calls`, tokenizer_config.json of the release):

    [content]<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
    [\\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>]*<｜tool▁calls▁end｜><｜end▁of▁sentence｜>

`ToolCallParser` reads the generated token ids one at a time. The markers are single token ids,
so the parser switches state on ids, never on text that merely looks like a marker; the text
between markers is decoded incrementally (UTF-8 safe). It returns the content text (what precedes
the tool calls) as it goes, and keeps OpenAI streaming deltas for the calls: the first delta of a
call carries index, id, type and the function name; the next ones carry pieces of the arguments,
whose concatenation is exactly the final `arguments` string (vLLM / OpenAI streaming semantics).

The released chat template ignores `tools`, so the server tells the model about its functions
with a system message (`tools_system_prompt`), and implements tool_choice "required" / a named
function by writing the first tokens of the call into the prompt (`forced_prefix`): the model
then generates the rest of the call (no grammar constraint: arguments are the model's own text).
"""
from __future__ import annotations

import json
import uuid

from dsv3.tokenizer import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP,
                            IncrementalDetokenizer, Tokenizer)

# what the template writes around the arguments (a JSON code fence)
FENCE_OPEN = "```json\n"
FENCE_CLOSE = "\n```"


def supports_tools(tok: Tokenizer) -> bool:
    return all(tok.token_to_id(t) is not None
               for t in (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP))


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _held_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a prefix of marker, the whole marker included:
    it may be (or grow into) the closing fence, which is not part of the arguments, so it is not
    streamed until the next piece shows whether the arguments go on."""
    for k in range(min(len(marker), len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ToolCallParser:
    """Incremental parser of DeepSeek tool-call tokens. Also usable as the detokenizer of
    dsv3.infer.params.StopOnText (push(token_id) -> content text, flush() -> content tail), so
    stop strings apply to the content only, never to the arguments of a call."""

    CONTENT, CALLS, TYPE, NAME, ARGS, DONE = range(6)

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        if not supports_tools(tok):
            raise ValueError("this tokenizer has no DeepSeek tool-call tokens; tools are not supported")
        self.tok = tok
        self.skip_special_tokens = skip_special_tokens
        self.ids = {name: tok.token_to_id(t) for name, t in (
            ("calls_begin", TOOL_CALLS_BEGIN), ("calls_end", TOOL_CALLS_END), ("call_begin", TOOL_CALL_BEGIN),
            ("call_end", TOOL_CALL_END), ("sep", TOOL_SEP))}
        self.state = self.CONTENT
        self._content = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
        self._seg: IncrementalDetokenizer | None = None  # decodes the text inside a call
        self.calls: list[dict] = []      # OpenAI tool calls: {"id", "type", "function": {"name", "arguments"}}
        self._type = ""
        self._name = ""
        self._raw = ""                  # argument text as generated, fence included
        self._fence: bool | None = None  # None: not yet known whether the arguments open with FENCE_OPEN
        self._sent = 0                  # characters of the arguments body already streamed
        self._deltas: list[dict] = []

    @property
    def in_tool_calls(self) -> bool:
        return self.state != self.CONTENT

    # -------------------------------------------------------------- token input
    def push(self, token_id: int) -> str:
        t = int(token_id)
        ids = self.ids
        if self.state == self.CONTENT:
            if t == ids["calls_begin"] or t == ids["call_begin"]:
                tail = self._content.flush()
                self.state = self.CALLS
                if t == ids["call_begin"]:  # a call without the outer marker: accept it
                    self._open_call()
                return tail
            return self._content.push(t)
        if self.state == self.DONE:
            return ""
        if t == ids["calls_end"]:
            self._close_call()
            self.state = self.DONE
        elif t == ids["call_begin"]:
            self._close_call()
            self._open_call()
        elif t == ids["call_end"]:
            self._close_call()
            self.state = self.CALLS
        elif t == ids["sep"] and self.state == self.TYPE:
            self._type += self._seg.flush()
            self._seg = IncrementalDetokenizer(self.tok, skip_special_tokens=True)
            self.state = self.NAME
        elif self.state in (self.TYPE, self.NAME, self.ARGS):
            self._text(self._seg.push(t))
        # CALLS: text between calls (the template writes "\n") is not part of any call
        return ""

    def flush(self) -> str:
        """End of generation: the content tail, and a call cut short (max_tokens) is closed with
        what it has."""
        if self.state == self.CONTENT:
            return self._content.flush()
        self._close_call()
        self.state = self.DONE
        return ""

    def take_deltas(self) -> list[dict]:
        """Streaming deltas produced since the last call, consecutive argument pieces merged."""
        out: list[dict] = []
        for d in self._deltas:
            if out and out[-1]["index"] == d["index"] and set(d) == {"index", "function"} \
                    and set(d["function"]) == {"arguments"}:
                out[-1]["function"]["arguments"] = out[-1]["function"].get("arguments", "") + d["function"]["arguments"]
            else:
                out.append({k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()})
        self._deltas = []
        return out

    # -------------------------------------------------------------- calls
    def _open_call(self):
        self.state = self.TYPE
        self._seg = IncrementalDetokenizer(self.tok, skip_special_tokens=True)
        self._type, self._name, self._raw, self._fence, self._sent = "", "", "", None, 0

    def _text(self, piece: str):
        if not piece:
            return
        if self.state == self.TYPE:
            self._type += piece
        elif self.state == self.NAME:
            self._name += piece
            if "\n" in self._name:
                name, rest = self._name.split("\n", 1)
                self._name = name
                self._start_args()
                self._args(rest)
        else:
            self._args(piece)

    def _start_args(self):
        name = self._name.strip()
        self.calls.append({"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": ""}})
        i = len(self.calls) - 1
        self._deltas.append({"index": i, "id": self.calls[i]["id"], "type": "function",
                             "function": {"name": name, "arguments": ""}})
        self.state = self.ARGS

    def _args(self, piece: str):
        self._raw += piece
        if self._fence is None:
            if FENCE_OPEN.startswith(self._raw):
                return  # could still be the opening fence
            self._fence = self._raw.startswith(FENCE_OPEN)
        body = self._body()
        end = len(body) - _held_suffix(body, FENCE_CLOSE)
        self._emit(body[self._sent:end])

    def _body(self) -> str:
        return self._raw[len(FENCE_OPEN):] if self._fence else self._raw

    def _emit(self, text: str):
        if text:
            i = len(self.calls) - 1
            self.calls[i]["function"]["arguments"] += text
            self._deltas.append({"index": i, "function": {"arguments": text}})
            self._sent += len(text)

    def _close_call(self):
        if self._seg is None:
            return
        self._text(self._seg.flush())
        self._seg = None
        if self.state in (self.TYPE, self.NAME):
            if self.state == self.TYPE or not self._name.strip():
                self.state = self.CALLS  # nothing usable: no name
                return
            self._start_args()
        if self._fence is None:  # ended before the fence was complete: it was not one
            self._fence = False
        body = self._body()
        if body.endswith(FENCE_CLOSE):
            body = body[:-len(FENCE_CLOSE)]
        self._emit(body[self._sent:])
        self.state = self.CALLS


def parse_tool_calls(tok: Tokenizer, token_ids, skip_special_tokens: bool = True) -> tuple[str, list[dict]]:
    """(content, tool_calls) of a complete generation."""
    p = ToolCallParser(tok, skip_special_tokens)
    content = "".join(p.push(t) for t in token_ids) + p.flush()
    return content, p.calls


def forced_prefix(tool_choice, tools: list[dict]) -> str:
    """Text appended after the generation prompt so that the model's answer is a tool call:
    tool_choice "required" opens a call (the model names the function), a named tool_choice
    also writes the name and the opening of the arguments. "" for "auto" / "none"."""
    if tool_choice in (None, "auto", "none"):
        return ""
    head = TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP
    if tool_choice == "required":
        return head
    name = tool_choice["function"]["name"]
    if name not in {t["function"]["name"] for t in tools}:
        raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
    return head + name + "\n" + FENCE_OPEN


def tools_system_prompt(tools: list[dict]) -> str:
    """A system message that lists the functions and shows the call format (the released chat
    template renders tool calls of past turns but never the tool definitions)."""
    lines = ["## Tools", "",
             "You can call the functions below. To call one, answer with",
             f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}FUNCTION_NAME",
             FENCE_OPEN + "ARGUMENTS_AS_JSON" + FENCE_CLOSE + TOOL_CALL_END + TOOL_CALLS_END,
             "(several calls go one after the other between the outer markers).", "", "### Functions", ""]
    for t in tools:
        f = t["function"]
        lines.append(f"- `{f['name']}`" + (f": {f['description']}" if f.get("description") else ""))
        if f.get("parameters") is not None:
            lines.append("```json\n" + json.dumps(f["parameters"], ensure_ascii=False) + "\n```")
    return "\n".join(lines)
