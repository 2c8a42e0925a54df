"""Which questions a run measures and warms up on (texts: bench.models.prompts). Warm-up questions
never overlap the measured ones."""
import os
import re
import unicodedata

from bench.models.prompts import BUILTIN_QUESTIONS, WARMUP_QUESTIONS


def blank(text: str) -> bool:
    """No visible character: whitespace, control and format characters only (a byte-order mark
    or a zero-width space is no question)."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def load_questions(path: str | None, text_prompt: str | None) -> list[str]:
    """Measured questions: lines of --questions FILE, else --text-prompt, else the built-in list."""
    from pathlib import Path

    from bench.errors import UsageError, path_problem

    if path is not None and text_prompt is not None:
        raise UsageError("give --text-prompt or --questions, not both")
    if path is not None:
        p = Path(path)
        problem = path_problem(p)
        if problem:
            raise UsageError(f"--questions {path}: {problem}")
        data = p.read_bytes()
        try:
            text = data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not part of the question
        except UnicodeDecodeError as e:
            raise UsageError(f"--questions {path}: not UTF-8 text (byte {e.start}); save it as UTF-8, "
                             "one question per line") from None
        if "\x00" in text:
            raise UsageError(f"--questions {path}: a binary file (NUL bytes); give UTF-8 text, one question per line")
        # lines end at \n, \r\n or \r only: str.splitlines() would also split a question at a form
        # feed, U+2028 and the like
        lines = [ln.strip() for ln in re.split(r"\r\n|\r|\n", text) if not blank(ln)]
        if not lines:
            raise UsageError(f"--questions {path}: no questions in it (every line is empty); give one question "
                             "per line")
        return lines
    if text_prompt is not None:
        if blank(text_prompt):
            raise UsageError("--text-prompt is empty; give the question to ask")
        try:  # argv that is not UTF-8 arrives with lone surrogates (surrogateescape)
            text_prompt.encode("utf-8")
        except UnicodeEncodeError:
            try:  # UTF-8 bytes read under an ASCII locale (LC_ALL=C without UTF-8 mode) are the question still
                text_prompt = os.fsencode(text_prompt).decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError("--text-prompt is not valid UTF-8 text; pass the question in UTF-8") from None
        if "\x00" in text_prompt:
            raise UsageError("--text-prompt contains a NUL character; pass plain text")
        return [text_prompt]
    return list(BUILTIN_QUESTIONS)


def warmup_questions(measured: list[str]) -> list[str]:
    return [q for q in WARMUP_QUESTIONS if q not in set(measured)]
