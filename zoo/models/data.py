"""Training data: JSONL of chat messages or prompt/completion pairs.

Every line is checked before any model is loaded; a bad one stops the run
with its line number. Examples are rendered with the base's chat template
(plain ``prompt + completion`` text for a model without one), and only the
assistant's answer tokens carry a loss: everything else is labelled -100.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zoo.core.files import sha256_file
from zoo.errors import DataError, FormatError

IGNORE = -100
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, str]]


@dataclass(frozen=True)
class Dataset:
    path: Path
    sha256: str
    examples: list[Example]


def load_dataset(path: Path) -> Dataset:
    """Read and validate every line of a JSONL training file."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"training data {path} not found", path=str(path),
                          hint="Pass a JSONL file with --data.")
    examples = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM: Windows
            except UnicodeDecodeError:
                raise DataError(str(path), number, "not UTF-8 text") from None
            if line.strip():
                examples.append(_parse_line(str(path), number, line))
    if not examples:
        raise DataError(str(path), 0, "the file holds no examples")
    return Dataset(path, sha256_file(path), examples)


def _parse_line(path: str, number: int, line: str) -> Example:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:  # ValueError: a number of over 4,300 digits too
        raise DataError(path, number, f"not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(record, dict):
        raise DataError(path, number, "not a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(path, number, "'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
                    m.get("content"), str):
                raise DataError(path, number, f"message {i} needs a role ({', '.join(ROLES)}) "
                                "and a string content")
        if messages[-1]["role"] != "assistant":
            raise DataError(path, number, "the last message must be the assistant's answer")
        return Example([{"role": m["role"], "content": m["content"]} for m in messages])
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise DataError(path, number, "'prompt' and 'completion' must both be strings, "
                            "the completion non-empty")
        return Example([{"role": "user", "content": prompt},
                        {"role": "assistant", "content": completion}])
    raise DataError(path, number, "expected a 'messages' list or 'prompt' and 'completion'")


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Text of a conversation: the chat template, or plain text for a model without one."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    text = "".join(m["content"] + ("" if m["role"] == "assistant" else "\n") for m in messages)
    return text


def answer_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The full text and the character spans of every assistant answer in it."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not upto.startswith(before):  # a template that rewrites earlier turns
            before = render(tokenizer, messages[:i])
        spans.append((len(before), len(upto)))
    text = render(tokenizer, messages)
    if not tokenizer.chat_template and tokenizer.eos_token:
        text += tokenizer.eos_token
        spans[-1] = (spans[-1][0], len(text))
    return text, spans


def tokenize_example(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` with labels only on the answers' tokens."""
    text, spans = answer_spans(tokenizer, example.messages)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False,
                        truncation=True, max_length=max_length)
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        inside = any(s <= start and end <= e and end > start for s, e in spans)
        labels.append(token if inside else IGNORE)
    return list(encoded["input_ids"]), labels


PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"
CALIBRATION_TEXT = PACKAGE_DATA / "calibration.txt"
# more calibration, frozen: chat examples (the demo datasets' first 16 examples as they
# were when the default int8 base was tuned: a new demo example must not change the
# base), and text in other languages, code and everyday writing (*.txt)
CALIBRATION_CHATS = PACKAGE_DATA / "calibration"
HELDOUT_TEXT = PACKAGE_DATA / "heldout.txt"
HELDOUT_DOMAINS = PACKAGE_DATA / "domains"  # one text per domain, never calibrated on


def calibration_texts(path: Path | None = None) -> list[str]:
    """Text to calibrate quantization on: ``path`` (plain text, or JSONL of the training
    formats), or what ships with zoo: English prose, chat examples, four other languages,
    code in four languages and everyday writing (none of the held-out domains' texts)."""
    if path is not None:
        texts = texts_of(Path(path))
        if not any(t.strip() for t in texts):
            raise FormatError(f"{path} holds no text to calibrate on", path=str(path), hint=(
                "Pass plain text or JSONL of the training formats, or leave --calibration "
                "out for the text zoo ships."))
        return texts
    texts = texts_of(CALIBRATION_TEXT)
    for jsonl in sorted(CALIBRATION_CHATS.glob("*.jsonl")):
        texts += texts_of(jsonl)
    for text in sorted(CALIBRATION_CHATS.glob("*.txt")):  # other languages, code, letters
        texts += texts_of(text)
    return texts


def texts_of(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        dataset = load_dataset(path)
        return ["\n".join(m["content"] for m in e.messages) for e in dataset.examples]
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"cannot read {path} ({type(exc).__name__})", path=str(path),
                          hint="Give a UTF-8 text file (paragraphs apart by a blank line), "
                               "or a .jsonl of chats.") from None
    # paragraphs keep their first line's indentation (code)
    return [p.lstrip("\n").rstrip() for p in text.split("\n\n") if p.strip()]


def token_batches(tokenizer, texts: list[str], max_length: int = 512) -> list:
    """Texts tokenized and packed into batches of one sequence of at most max_length."""
    import torch

    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
    return [torch.tensor([ids[i:i + max_length]]) for i in range(0, len(ids), max_length)
            if len(ids[i:i + max_length]) > 1]
