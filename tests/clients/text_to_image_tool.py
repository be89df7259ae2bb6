"""LlamaIndex's `TextToImageToolSpec`, called as an agent calls its tools: generate images for a
prompt, then a variation of the first one's URL. Run by tests/clients with a client
environment's Python; the server and key come from `OPENAI_API_BASE` and `OPENAI_API_KEY`, the
settings of the openai SDK the tool calls (its constructor takes only the key).

Usage: python text_to_image_tool.py PROMPT SIZE
Prints, as JSON on its last line, what each tool call returned: `{"generated": ...,
"variations": ...}`, without `variations` when `generated` is no list of URLs (the tool returns
an API error's body instead of raising it).
"""

from __future__ import annotations

import json
import os
import sys

from llama_index.tools.text_to_image import TextToImageToolSpec


def main(prompt: str, size: str) -> None:
    tool = TextToImageToolSpec(api_key=os.environ["OPENAI_API_KEY"])
    generated = tool.generate_images(prompt, n=1, size=size)
    answers = {"generated": generated}
    if isinstance(generated, list) and generated:
        answers["variations"] = tool.generate_image_variation(generated[0], n=1, size=size)
    print(json.dumps(answers))


if __name__ == "__main__":
    main(*sys.argv[1:])
