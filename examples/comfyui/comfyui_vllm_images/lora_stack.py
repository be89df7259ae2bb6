"""The "vLLM Image LoRA" node: a stack of the server's LoRA adapters, each at a strength,
which the generate and edit nodes send as the request's `lora` list.

Chained as ComfyUI's own LoRA hook nodes (`CreateHookLora`: `prev_hooks` in, `HOOKS` out)
and the common LoRA-stack nodes (`lora_stack` in, `LORA_STACK` out) are: each node adds one
adapter to the stack it is given. The type is `VLLM_LORA_STACK`, not `LORA_STACK`: those
stacks hold LoRA files on the ComfyUI machine, for a local model; these hold the names of
adapters a vLLM server serves. ComfyUI links only outputs and inputs of one type, so neither
kind reaches the other's nodes by mistake; and since the node's input and output share the
type, a bypassed node (Ctrl+B) passes the stack on without its adapter.
"""

from __future__ import annotations

from typing import Any

from . import model_list
from .client import SERVER_URL_ENV_VAR
from .model_list import accepts_adapter, adapter_problem

STACK_TYPE = "VLLM_LORA_STACK"
LoRAStack = tuple[tuple[str, float], ...]
"""`(adapter name, strength)` pairs in chain order (the server applies them together, in any
order alike). A tuple: ComfyUI hands one node's output to every node linked to it and caches
it, so a stack is never changed in place."""
LORA_SCALE_RANGE = 100.0
"""Most strength (either sign) of an adapter, here and in the image nodes' `lora_scale`: as
ComfyUI's own LoraLoader strengths, and the server's limit on a scale."""


class VLLMImageLoRA:
    """One served LoRA adapter at a strength, added to an incoming stack."""

    DESCRIPTION = (
        "Adds a LoRA adapter served by the vLLM server (a card of /v1/models with a parent) "
        "to a stack; link the stack to vLLM Image Generate or Edit, which apply every adapter "
        "of it together (the request's lora list). Chain these nodes to stack several."
    )
    CATEGORY = "image/vLLM"
    RETURN_TYPES = (STACK_TYPE,)
    RETURN_NAMES = ("lora_stack",)
    OUTPUT_TOOLTIPS = ("The incoming stack with this adapter added.",)
    FUNCTION = "stack"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, Any]]:  # noqa: N802  (ComfyUI's name)
        return {
            "required": {
                "lora_name": (
                    model_list.MODELS.adapters(),
                    {
                        "tooltip": "A LoRA adapter the server serves: the adapters of "
                        f"/v1/models of ${SERVER_URL_ENV_VAR} (else "
                        "http://127.0.0.1:8000), read when the page loads and when node "
                        "definitions are refreshed (R); a name that is not listed is still "
                        "sent, and the server says if it does not serve it.",
                    },
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -LORA_SCALE_RANGE,
                        "max": LORA_SCALE_RANGE,
                        "step": 0.01,
                        "tooltip": "The adapter's strength (its scale): 1.0 as trained. 0 "
                        "leaves it out of the stack, as ComfyUI's own LoRA nodes do.",
                    },
                ),
            },
            "optional": {
                "lora_stack": (
                    STACK_TYPE,
                    {"tooltip": "Adapters added by earlier vLLM Image LoRA nodes; none: "
                     "a stack of this adapter alone."},
                ),
            },
        }  # fmt: skip

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name: object = None) -> bool | str:  # noqa: N802
        return accepts_adapter(lora_name)

    def stack(
        self, lora_name: str, strength: float, lora_stack: LoRAStack | None = None
    ) -> tuple[LoRAStack]:
        incoming = tuple(lora_stack or ())
        if strength == 0:
            return (incoming,)
        problem = adapter_problem(lora_name)  # a linked name, not validated before the run
        if problem is not None:
            raise ValueError(problem)
        return ((*incoming, (lora_name.strip(), float(strength))),)


def lora_field(lora_stack: LoRAStack | None) -> list[dict[str, str | float]] | None:
    """The request's `lora`: a `{"name", "scale"}` object per adapter of the stack; None (not
    sent) for no stack or an empty one."""
    if not lora_stack:
        return None
    return [{"name": name, "scale": strength} for name, strength in lora_stack]
