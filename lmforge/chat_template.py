"""Chat conversations: dataset records as messages, checked, and rendered as token ids with the mask
of the positions SFT trains on.

A conversation renders as `<|bos|>`, then per message its role marker, its content and `<|end|>`:

    <|bos|><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>

Role markers and the end of turn are special tokens, so every content is encoded on its own and the
rendering is the same whether it is done here, token by token, or by `transformers` from the Jinja
string (`jinja_template`), which tokenizes the text between special tokens piece by piece. Only the
assistant's content and its `<|end|>` are supervised: the model learns to answer and to stop, not to
write the user's turns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmforge.errors import DataError

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_OF_TURN)
DEFAULT_BOS = "<|bos|>"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


class ChatFormatError(DataError):
    """A conversation that the template cannot render (bad roles, order or content)."""


def jinja_template(bos: str) -> str:
    """The template as Jinja, for `tokenizer_config.json` (transformers' `apply_chat_template`)."""
    known = ", ".join(f"'{r}'" for r in ROLE_TOKENS)
    return (
        f"{{{{ '{bos}' }}}}"
        "{% for message in messages %}"
        f"{{% if message['role'] not in [{known}] %}}"
        "{{ raise_exception('unknown role: ' + message['role']) }}"
        "{% endif %}"
        f"{{{{ '<|' + message['role'] + '|>' + message['content'] + '{END_OF_TURN}' }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{ROLE_TOKENS['assistant']}' }}}}{{% endif %}}"
    )


def problem(messages: Any, *, for_training: bool = True) -> str | None:
    """Why `messages` is not a well-formed conversation (a short reason, used as a skip count key), or None.

    Well formed: an optional system message first, then user and assistant turns alternating, starting
    with the user; for training it ends with an assistant turn, for a generation prompt with a user turn."""
    if not isinstance(messages, list) or not messages:
        return "no messages"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return "malformed message"
        if m.get("role") not in ROLE_TOKENS:
            return "unknown role"
        if not m["content"].strip():
            return "empty content"
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        return "system message not first"
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns or turns[0] != "user":
        return "does not start with a user turn"
    for a, b in zip(turns, turns[1:], strict=False):
        if a == b:
            return f"two {a} turns in a row"
    if for_training and turns[-1] != "assistant":
        return "no assistant answer at the end"
    return None


# ---- dataset records --------------------------------------------------------------------------------
def to_messages(rec: Any, fmt: str = "auto", system_prompt: str = "") -> list[dict] | str:
    """A record as [{"role", "content"}] messages, or the reason it is not one (see chat_template.problem)."""
    if not isinstance(rec, dict):
        return "malformed record"
    if fmt == "auto":
        fmt = next((f for f, key in (("messages", "messages"), ("conversations", "conversations"),
                                     ("alpaca", "instruction")) if key in rec), "")
        if not fmt:
            return "unknown format"
    if fmt == "messages":
        msgs = rec.get("messages")
    elif fmt == "conversations":
        msgs = _conversation(rec.get("conversations"))
    else:
        msgs = _alpaca(rec)
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        return "malformed record"
    msgs = [{"role": m.get("role"), "content": m.get("content")} for m in msgs]
    if system_prompt and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return problem(msgs) or msgs


def _conversation(turns: Any) -> list[dict] | None:
    if not isinstance(turns, list):
        return None
    if all(isinstance(t, str) for t in turns):  # LIMA: user and assistant in turn
        return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    out = []
    for t in turns:  # ShareGPT
        if not isinstance(t, dict):
            return None
        role = t.get("from", t.get("role"))
        out.append({"role": SHAREGPT_ROLES.get(role, role), "content": t.get("value", t.get("content"))})
    return out


def _alpaca(rec: dict) -> list[dict] | None:
    instruction, extra, output = rec.get("instruction"), rec.get("input") or "", rec.get("output")
    history = rec.get("history") or []
    if not isinstance(instruction, str) or not isinstance(extra, str) or not isinstance(history, list):
        return None
    msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
    for pair in history:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            return None
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


# ---- rendering ----------------------------------------------------------------------------------------
def render(tokenizer: Any, messages: Sequence[dict], *, add_generation_prompt: bool = False,
           validate: bool = True) -> tuple[list[int], list[bool]]:
    """Messages → (ids, supervised): supervised[i] says whether token i is a training target.

    `tokenizer` needs `encode`, `special_tokens` and the chat tokens (`Tokenizer.with_chat_tokens`)."""
    specials = tokenizer.special_tokens
    missing = [t for t in CHAT_TOKENS if t not in specials]
    if missing:
        raise ChatFormatError(f"the tokenizer lacks the chat tokens {missing}; use Tokenizer.with_chat_tokens()")
    if validate:
        why = problem(list(messages), for_training=not add_generation_prompt)
        if why and not (add_generation_prompt and why == "no assistant answer at the end"):
            raise ChatFormatError(f"cannot render this conversation: {why}")
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else specials[DEFAULT_BOS]
    ids, sup = [bos], [False]
    end = specials[END_OF_TURN]
    for m in messages:
        trained = m["role"] == "assistant"
        content = tokenizer.encode(m["content"])
        ids += [specials[ROLE_TOKENS[m["role"]]], *content, end]
        sup += [False, *([trained] * len(content)), trained]
    if add_generation_prompt:
        ids.append(specials[ROLE_TOKENS["assistant"]])
        sup.append(False)
    return ids, sup


def show(tokenizer: Any, ids: Sequence[int], supervised: Sequence[bool]) -> str:
    """A rendered conversation as text, with the supervised spans in [[ ]], for inspecting the mask."""
    out, run, state = [], [], False
    for i, s in zip(ids, supervised, strict=True):
        if s != state and run:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if state else text)
            run = []
        state = s
        run.append(i)
    if run:
        text = tokenizer.decode(run)
        out.append(f"[[{text}]]" if state else text)
    return "".join(out)
