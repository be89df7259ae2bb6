"""Generate images from a `vllm serve <model> --task image` server with the official `openai` SDK.

python examples/generate_image.py "a lighthouse at dawn" --size 256x256 --seed 42 -o out.png
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if any")
    parser.add_argument("--model", default=None, help="defaults to the served model")
    parser.add_argument("--size", default="auto", help="WIDTHxHEIGHT, or auto")
    parser.add_argument("-n", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("-o", "--output", type=Path, default=Path("image.png"))
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    extensions = {
        "seed": args.seed,
        "num_inference_steps": args.steps,
        "negative_prompt": args.negative_prompt,
    }
    result = client.images.generate(
        model=model,
        prompt=args.prompt,
        n=args.n,
        size=args.size,
        response_format="b64_json",
        extra_body={key: value for key, value in extensions.items() if value is not None},
    )
    for index, image in enumerate(result.data or []):
        assert image.b64_json is not None
        path = args.output if args.n == 1 else args.output.with_stem(f"{args.output.stem}-{index}")
        path.write_bytes(base64.b64decode(image.b64_json))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
