"""Built-in question texts: the questions a run measures by default, the warm-up questions (never
measured) and the fidelity probe. Preset tokenizers are trained on them (bench.models.tokenizer), so
they tokenize into words as a real tokenizer would."""

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

# The fidelity columns are measured on this question, never on a measured one.
FIDELITY_PROBE = "Fidelity probe: describe everything you see, object by object."
