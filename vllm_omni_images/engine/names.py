"""The `--image-engine` names; imports nothing (the flags read them in every vLLM process)."""

from typing import Literal, get_args

EngineName = Literal["auto", "omni", "diffusers"]

ENGINE_NAMES: tuple[EngineName, ...] = get_args(EngineName)
