"""vllm-omni platforms this package adds; loaded by vllm-omni through its plugin entry point."""

from __future__ import annotations


def cpu_omni_platform_plugin() -> str | None:
    """The entry point `image_task`: the CPU platform's path where vllm-omni's built-in
    detection finds no accelerator, else `None`."""
    from vllm_omni.platforms import builtin_omni_platform_plugins

    for detect in builtin_omni_platform_plugins.values():
        try:
            if detect() is not None:
                return None
        except Exception:
            continue
    return "vllm_omni_images.platforms.cpu.CpuOmniPlatform"
