"""Built-in questions. Warm-up questions never overlap the measured ones."""

BUILTIN_QUESTIONS = [
    "Describe this image in detail.",
    "What objects can you see in the picture?",
    "What colors dominate the scene?",
    "Is there any text visible? If so, what does it say?",
    "How many people are in the image?",
    "What is happening in the background?",
    "What time of day does it appear to be?",
    "Describe the lighting and the weather.",
    "What is the main subject doing?",
    "Write a short caption for this photo.",
    "What emotions does the image convey?",
    "Where might this picture have been taken?",
]

WARMUP_QUESTIONS = [
    "Warm-up: list three shapes you notice.",
    "Warm-up: name one color that appears.",
    "Warm-up: is the image dark or bright?",
    "Warm-up: give a one-word summary.",
]


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

# The fidelity columns are measured on this question, never on a measured one.
FIDELITY_PROBE = "Fidelity probe: describe everything you see, object by object."
