"""How a prompt and a reply become tokens: the model's own chat template (or a plain transcript
for base models), with the position where the reply starts. Chat, eval and training share it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


def has_chat_template(llm: Any) -> bool:
    """Whether the model ships a chat template: replies are then asked in its chat format, else as
    a plain transcript (base models)."""
    return bool(llm.metadata.get("tokenizer.chat_template"))


def render_chat(llm: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Formats messages with the model's own chat template (plain 'User:/Assistant:' without one)."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + ("Assistant:" if add_generation_prompt else "")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def token_text(key: str) -> str:
        tid = llm.metadata.get(key)
        return llm.detokenize([int(tid)], special=True).decode("utf-8", errors="ignore") if tid is not None else ""

    fmt = Jinja2ChatFormatter(template=template, eos_token=token_text("tokenizer.ggml.eos_token_id"),
                              bos_token=token_text("tokenizer.ggml.bos_token_id"),
                              add_generation_prompt=add_generation_prompt)
    return fmt(messages=messages).prompt


@dataclass
class Example:
    """One text to run through the model; `start` is the first token position that carries the
    behaviour (the reply), so rows [start:] are the completion tokens."""

    tokens: list[int]
    start: int


def chat_example(llm: Any, user: str, reply: str, system: Optional[str] = None) -> Example:
    """User turn + assistant reply, templated; the reply's tokens are the completion positions."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    prefix = render_chat(llm, messages, add_generation_prompt=True)
    head = llm.tokenize(prefix.encode("utf-8"), add_bos=True, special=True)
    full = llm.tokenize((prefix + reply).encode("utf-8"), add_bos=True, special=True)
    start = len(head)
    if full[:start] != head:  # a merge across the boundary: fall back to the common prefix
        start = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
    return Example(tokens=full, start=min(start, len(full) - 1))


def text_example(llm: Any, prefix: str, completion: str) -> Example:
    """Plain text (no template), for base models."""
    head = llm.tokenize(prefix.encode("utf-8"), add_bos=True, special=False)
    full = llm.tokenize((prefix + completion).encode("utf-8"), add_bos=True, special=False)
    return Example(tokens=full, start=min(len(head), len(full) - 1))


def plain_prompt(prompt: str) -> str:
    """How base models (no chat template) are asked: a plain User/Assistant transcript. No space
    after the colon: the reply's first token carries it (" Paris"), as it does in reply_example."""
    return f"User: {prompt}\nAssistant:"


# where a base model's turn ends: it goes on to write the user's next line
BASE_TURN_END = "\nUser:"


def prompt_text(llm: Any, prompt: str, system: str = "", chat: bool = True) -> str:
    """The one way every part of the project asks a model (chat, eval, training, selection,
    serve): the chat template with an optional system message, or for base models the plain
    transcript with the instruction before the prompt."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return render_chat(llm, messages)
    return plain_prompt(f"{system} {prompt}" if system else prompt)


def reply_stops(chat: bool) -> tuple[str, ...]:
    """Stop strings that end a reply (a chat model ends its turn with an end-of-generation token)."""
    return () if chat else (BASE_TURN_END,)


def finish_reply(text: str, chat: bool) -> str:
    """The one cut of a generated text into a reply: up to the end of the model's turn, stripped."""
    if not chat:
        text = text.split(BASE_TURN_END)[0]
    return text.strip()


def reply_example(llm: Any, prompt: str, reply: str, chat: bool, system: str = "") -> Example:
    """The prompt as the model is asked it (prompt_text: with the instruction, if any), followed by
    the reply (the scored tokens)."""
    if chat:
        return chat_example(llm, prompt, reply, system or None)
    return text_example(llm, plain_prompt(f"{system} {prompt}" if system else prompt), " " + reply.lstrip())
