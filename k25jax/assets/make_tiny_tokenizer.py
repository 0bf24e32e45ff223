"""Make ``tiny_tiktoken.model``: 1024 byte-level BPE ranks trained on the fixed text below.

Run ``python -m k25jax.assets.make_tiny_tokenizer`` to regenerate; the output is deterministic (a test checks
the shipped file equals a fresh run). Training uses tiktoken's educational trainer with the release
pre-tokenisation pattern (``(?V1)`` makes the ``regex`` package read its ``&&`` intersections as tiktoken does).
"""

from __future__ import annotations

import os

from k25jax.tokenizer import PATTERN, write_tiktoken_ranks

NUM_RANKS = 1024

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still say hello to the world.
Hello! How are you today? I am fine, thank you. What is 2+2? The answer is 4.
You are a helpful assistant. Answer the question as well as you can, and think step by step.
Let me think about this. First, we read the question. Then we look for the facts we need.
The weather in Paris is clear and the temperature is 18 degrees. Tomorrow it will rain in London.
I should call the tool to get the current weather for the city. The tool returned a result.
Kimi is a large language model with a mixture of experts. Each token is routed to a few experts.
The attention uses a latent cache, so every token keeps only a short vector per layer in memory.
Images are split into patches, and each patch becomes a token that the language model can read.
Training a model takes data, compute and patience; inference needs memory and fast kernels.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 32 64 100 128 256 512 1000 1024 2048 4096 65536 3.14159.
Dates and times: 2025-01-29, 12:30:45.000, Monday, Tuesday, Wednesday, Thursday, Friday.
Questions people ask: Where is the nearest station? Why is the sky blue? When does the shop open?
Can you write a poem about the sea? Please summarise this article in three sentences.
Translate "good morning" into French: bonjour. Into German: guten Morgen. Into Spanish: buenos dias.
Chinese text: 你好，世界。今天天气很好。我们一起学习机器学习和语言模型。谢谢你的帮助。
Japanese text: こんにちは。ありがとうございます。 Korean: 안녕하세요.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))

class Model:
    def __init__(self, config):
        self.config = config

    def __call__(self, input_ids):
        return self.forward(input_ids)

import json
data = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}
print(json.dumps(data, indent=2))
if x >= 0 and y <= 1 or not z:
    result = [x * 2 for x in values if x % 2 == 0]
Markdown: # Title, ## Section, - item one, - item two, **bold**, `code`, [link](https://example.com).
The user said: "I don't know what you're talking about, but I'll try." They've asked twice; we'd better answer.
It's a nice day. She's here. We're ready. They'll come. I'm sure. You'd like it. I've seen it.
Functions, arguments, results, errors, values, tokens, layers, heads, experts, weights, scales, groups.
The assistant answers in plain words. The system prompt sets the rules. The user asks; the model replies.
Mathematics: x^2 + y^2 = z^2, sum_{i=1}^{n} i = n(n+1)/2, e^{i pi} + 1 = 0, f(x) = max(0, x).
Reasoning: if all birds can fly and a penguin is a bird, the premise must be wrong, because penguins cannot fly.
Lists: apples, oranges, bananas, grapes, pears, cherries, lemons, melons, peaches, plums.
Colours: red, green, blue, yellow, orange, purple, black, white, grey, brown, pink.
Animals: cat, dog, horse, cow, sheep, goat, bird, fish, mouse, lion, tiger, bear, wolf.
Programming languages: Python, JavaScript, TypeScript, Rust, Go, Java, C, C++, Haskell, Julia.
JAX compiles functions with XLA; Flax NNX holds parameters in modules; Pallas writes kernels.
Thank you for reading. Goodbye, and have a wonderful day!
"""


def train(corpus: str = CORPUS, num_ranks: int = NUM_RANKS) -> dict[bytes, int]:
    """BPE ranks (bytes 0..255 first, then merges by frequency) for ``corpus``."""
    from tiktoken._educational import bpe_train

    return bpe_train(corpus, num_ranks, "(?V1)" + PATTERN, visualise=None)


def main() -> None:
    out = os.path.join(os.path.dirname(__file__), "tiny_tiktoken.model")
    write_tiktoken_ranks(train(), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
