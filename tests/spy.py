"""A real generator that also records what it is asked: tests read the prompts a judge rendered."""

from __future__ import annotations


class Spy:
    def __init__(self, inner):
        self.inner, self.inputs = inner, []
        self.name, self.tokenizer, self.max_context = inner.name, inner.tokenizer, inner.max_context

    def generate(self, prompts, n, sampling):
        self.inputs += prompts
        return self.inner.generate(prompts, n, sampling)

    def close(self):
        self.inner.close()
