"""The `--image-engine` names, in a module that imports nothing: the flags read them in every
vLLM process."""

from typing import Literal, get_args

EngineName = Literal["auto", "omni", "diffusers"]

ENGINE_NAMES: tuple[EngineName, ...] = get_args(EngineName)
