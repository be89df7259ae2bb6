"""The engines, admission and the engine and LoRA benchmarks must import where vLLM is not
installed (a GPU machine with only torch, transformers and diffusers runs their benchmarks)."""

from __future__ import annotations

import subprocess
import sys

BLOCK_VLLM = """
import importlib.abc, sys

class NoVllm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("vllm", "vllm_omni", "httpx") or name.startswith(("vllm.", "vllm_omni.")):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoVllm())
"""


def test_engines_admission_and_engine_benchmarks_import_without_vllm() -> None:
    code = BLOCK_VLLM + (
        "import vllm_omni_images.engine.diffusers_runner, vllm_omni_images.engine.batching\n"
        "import vllm_omni_images.engine.client\n"
        "import vllm_omni_images.tiny_model, benchmarks.engine_throughput, benchmarks.lora\n"
        "from vllm_omni_images.engine.selection import create_engine\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_the_blocker_really_blocks() -> None:
    code = BLOCK_VLLM + "import vllm_omni_images.images.serving\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "blocked by the test" in result.stderr
