"""ComfyUI nodes for a vLLM image server (`vllm serve <model> --task image`).

Copy this folder into `ComfyUI/custom_nodes/`; ComfyUI imports it as a package and reads the
two mappings below (its V1 node convention). It needs only what ComfyUI itself ships: torch,
numpy, Pillow and the standard library.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
