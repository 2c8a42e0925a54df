"""Which questions a run measures and warms up on (texts: bench.models.prompts). Warm-up questions
never overlap the measured ones."""
from bench.models.prompts import BUILTIN_QUESTIONS, WARMUP_QUESTIONS


def load_questions(path: str | None, text_prompt: str | None) -> list[str]:
    """Measured questions: lines of --questions FILE, else --text-prompt, else the built-in list."""
    from pathlib import Path

    from bench.errors import UsageError

    if path:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"--questions file not found: {path}")
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise UsageError(f"--questions file has no questions: {path}")
        return lines
    if text_prompt:
        return [text_prompt]
    return list(BUILTIN_QUESTIONS)


def warmup_questions(measured: list[str]) -> list[str]:
    return [q for q in WARMUP_QUESTIONS if q not in set(measured)]
