"""Previews (`partial_images`) through vllm-omni's chunked streaming output: `StepPreviews` ends
a chunk at each preview step of a request, so that vllm-omni's model runner, with
`streaming_output`, decodes it there (`post_decode`) and its engine streams it as an unfinished
output. An engine installs it through vllm-omni's `custom_pipeline_args`, naming the pipeline
class `<this module>.<registered class name>` (docs/architecture.md, "Previews on vllm-omni")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm_omni_images.engine.omni_requests import PARTIAL_IMAGES_ARG
from vllm_omni_images.engine.previews import preview_steps

if TYPE_CHECKING:
    from vllm_omni.diffusion.data import DiffusionOutput, OmniDiffusionConfig
    from vllm_omni.diffusion.models.interface import SupportsStepExecution as _StepPipeline
    from vllm_omni.diffusion.worker.utils import StepRequestState
else:
    _StepPipeline = object  # the pipeline class it is mixed into comes after it

_CHUNK_ENDS = "vllm_omni_images_chunk_ends"
"""`StepRequestState.extra`: the step count at which each chunk ends (the last: all steps)."""


class StepPreviews(_StepPipeline):
    """Mixin for a step-execution pipeline: a request whose sampling `extra_args` ask for
    `partial_images` runs in chunks ending at `preview_steps`; each chunk's `post_decode`
    output is unfinished but the last's. Other requests run as the pipeline runs them.

    vllm-omni builds a custom pipeline class by calling it, bypassing its registry's set-up
    (quantization, VAE tiling and slicing, sequence parallelism); a `StepPreviews` class is
    built by that registry (`initialize_model`) instead, then takes its class."""

    def __new__(cls, *, od_config: OmniDiffusionConfig) -> StepPreviews:
        from vllm_omni.diffusion.registry import initialize_model

        pipeline = initialize_model(od_config)
        pipeline.__class__ = cls
        return pipeline

    def __init__(self, *, od_config: OmniDiffusionConfig) -> None:
        """Built whole by `__new__`."""

    def prepare_encode(self, state: StepRequestState, **kwargs: Any) -> StepRequestState:
        state = super().prepare_encode(state, **kwargs)
        partial_images = int(state.sampling.extra_args.get(PARTIAL_IMAGES_ARG, 0))
        previews = [step + 1 for step in preview_steps(partial_images, state.total_steps)]
        if previews:
            state.extra[_CHUNK_ENDS] = [*previews, state.total_steps]
            state.total_chunks = len(previews) + 1
            state.chunk_index = 0
            _start_chunk(state)
        return state

    def step_scheduler(self, state: StepRequestState, noise_pred: Any, **kwargs: Any) -> None:
        super().step_scheduler(state, noise_pred, **kwargs)
        if state.chunk_num_steps is not None:
            state.step_in_chunk = state.step_index - _chunk_start(state)

    def post_decode(self, state: StepRequestState, **kwargs: Any) -> DiffusionOutput:
        output = super().post_decode(state, **kwargs)
        if state.chunk_num_steps is None:
            return output
        output.chunk_index = state.chunk_index
        output.total_chunks = state.total_chunks
        state.chunk_index += 1
        output.finished = state.request_denoise_completed
        if not output.finished:
            _start_chunk(state)
        return output


def _chunk_start(state: StepRequestState) -> int:
    return 0 if state.chunk_index == 0 else int(state.extra[_CHUNK_ENDS][state.chunk_index - 1])


def _start_chunk(state: StepRequestState) -> None:
    """Point the state's chunk fields (vllm-omni's chunk contract) at chunk `chunk_index`."""
    start = _chunk_start(state)
    state.chunk_num_steps = int(state.extra[_CHUNK_ENDS][state.chunk_index]) - start
    state.step_in_chunk = state.step_index - start


_WITH_PREVIEWS: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """`<this module>.<name>`: vllm-omni's registered pipeline class `name` with `StepPreviews`
    (what it resolves a custom pipeline's qualified name to, in each process)."""
    if name not in _WITH_PREVIEWS:
        from vllm_omni.diffusion.registry import DiffusionModelRegistry

        registered = DiffusionModelRegistry._try_load_model_cls(name)
        if registered is None:
            raise AttributeError(f"vllm-omni's registry has no pipeline {name!r}")
        _WITH_PREVIEWS[name] = type(name, (StepPreviews, registered), {})
    return _WITH_PREVIEWS[name]
