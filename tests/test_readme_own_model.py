"""README "Your own model": every Python block of the section runs, in order, in one namespace (each
block asserts its own result)."""

import os
import re

import pytest

pytest.importorskip("transformers")

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def section_blocks() -> list[str]:
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Your own model"):]
    section = section[: section.index("\n## ", 5)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_own_model_snippets_run():
    blocks = section_blocks()
    assert len(blocks) == 6  # plain loop, HF model, Trainer, torch.compile, DDP, mixed precision
    namespace: dict = {}
    for k, block in enumerate(blocks):
        exec(compile(block, f"README 'Your own model' block {k}", "exec"), namespace)
