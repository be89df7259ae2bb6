"""The baseline: the image server `shared/original-plan.txt` sketched, built the naive way.

A standalone FastAPI app with the pipeline in a global, a synchronous pipeline call inside the
`async` handler (so it blocks the event loop), no batching, no queue, and PIL's default PNG
settings. The benchmarks run it beside `vllm serve --task image` for comparison.

    python -m benchmarks.naive_server --model tiny-qwen-image --port 8100
"""

from __future__ import annotations

import argparse
import base64
import io
import time
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from vllm_omni_images.tiny_model import resolve_model_path

app = FastAPI()
pipeline: Any = None


class ImageRequest(BaseModel):
    prompt: str
    n: int = 1
    size: str = "256x256"
    num_inference_steps: int = 4
    seed: int | None = None


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/images/generations")
async def generate(request: ImageRequest) -> dict[str, Any]:
    width, height = (int(v) for v in request.size.split("x"))
    generator = None
    if request.seed is not None:
        generator = torch.Generator().manual_seed(request.seed)
    result = pipeline(
        prompt=request.prompt,
        width=width,
        height=height,
        num_inference_steps=request.num_inference_steps,
        num_images_per_prompt=request.n,
        generator=generator,
    )
    data = []
    for image in result.images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode()})
    return {"created": int(time.time()), "data": data}


def main() -> None:
    global pipeline
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-qwen-image")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(resolve_model_path(args.model))
    pipeline.set_progress_bar_config(disable=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
