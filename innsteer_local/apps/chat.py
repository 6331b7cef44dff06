"""The interactive chat loop behind `innsteer-local chat` (also driven through piped stdin)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Optional, TextIO

HELP = """commands:
  /strength A   set the strength of every flow (e.g. /strength 2.5, /strength -1)
  /on  /off     turn steering on or off
  /gate MODE    off, density or target (flows that carry gate parameters)
  /flows        list the attached flows
  /reset        forget the conversation
  /help         this text
  /quit         leave (also Ctrl-D)"""


@dataclass
class ChatSession:
    llm: Any  # SteeredLlama
    system: Optional[str] = None
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    repeat_penalty: float = 1.1
    compare: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    messages: list[dict[str, str]] = field(default_factory=list)
    shifted: int = 0  # exchanges dropped to fit the context window

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _print(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def describe_flows(self) -> str:
        if not self.llm.flows:
            return "no flows attached"
        state = "on" if self.llm.steering_active else "off"
        rows = [f"steering {state}"]
        for a in self.llm.flows:
            rows.append(f"  [{a.id}] {a.path}  strength {a.strength:g}  gate {a.gate}  layers {a.layers}  "
                        f"{a.flow.method} / {a.flow.behavior or '-'}{'' if a.enabled else '  (disabled)'}")
        return "\n".join(rows)

    def command(self, line: str) -> bool:
        """Runs a /command; returns False when the session should end."""
        cmd, _, arg = line.strip().partition(" ")
        cmd = cmd.lower()
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/help":
            self._print(HELP)
        elif cmd == "/strength":
            try:
                value = float(arg)
                if value != value or value in (float("inf"), float("-inf")):
                    raise ValueError
            except ValueError:
                self._print(f"/strength needs a finite number, got '{arg}'")
                return True
            self.llm.set_strength(value)
            self._print(f"strength set to {value:g}")
        elif cmd == "/gate":
            try:
                self.llm.set_gate(arg.strip())
            except (ValueError, KeyError) as e:
                self._print(str(e))
                return True
            self._print(f"gate {arg.strip()}")
        elif cmd == "/on":
            self.llm.enable()
            self._print("steering on")
        elif cmd == "/off":
            self.llm.disable()
            self._print("steering off")
        elif cmd == "/reset":
            self.reset()
            self._print("conversation cleared")
        elif cmd == "/flows":
            self._print(self.describe_flows())
        else:
            self._print(f"unknown command {cmd}; /help lists the commands")
        return True

    def _stream(self, messages: list[dict[str, str]], label: str) -> str:
        if label:
            self._print(label, end="")
        parts: list[str] = []
        for chunk in self.llm.create_chat_completion(
                messages=messages, stream=True, max_tokens=self.max_tokens, temperature=self.temperature,
                seed=self.seed, repeat_penalty=self.repeat_penalty):
            text = chunk["choices"][0]["delta"].get("content") or ""
            if text:
                parts.append(text)
                self._print(text, end="")
        self._print()
        return "".join(parts)

    def _fit(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """Context shift: drop the oldest exchanges (never the system message or the new turn)
        until the prompt plus the reply fit in the context window."""
        from ..runtime.prompts import render_chat

        budget = self.llm.n_ctx() - self.max_tokens - 8
        head = [m for m in messages[:1] if m["role"] == "system"]
        body = messages[len(head):]
        while len(body) > 1:
            text = render_chat(self.llm, head + body, add_generation_prompt=True)
            if len(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)) <= budget:
                break
            body = body[2:] if len(body) > 2 else body[1:]
            self.shifted += 1
        return head + body

    def turn(self, user_text: str) -> str:
        """One user turn; returns the (steered) reply kept in the history."""
        messages = self._fit(self.messages + [{"role": "user", "content": user_text}])
        if self.compare:
            was_active = self.llm.steering_active
            self.llm.disable()
            self._stream(messages, "[unsteered] ")
            if was_active:
                self.llm.enable()
            label = "[steered] " if was_active else "[steering off] "
            reply = self._stream(messages, label)
        else:
            reply = self._stream(messages, "")
        self.messages = messages + [{"role": "assistant", "content": reply}]
        return reply

    def run(self, stdin: TextIO, interactive: bool) -> None:
        if interactive:
            self._print(self.describe_flows())
            self._print("type /help for commands")
        while True:
            if interactive:
                self._print("you> ", end="")
            line = stdin.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
                continue
            if interactive:
                self._print("bot> ", end="")
            self.turn(line)
