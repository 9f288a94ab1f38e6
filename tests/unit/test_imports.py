"""`import alignlib` stays light: vLLM and DeepSpeed load only inside the stages that use them."""

import subprocess
import sys

HEAVY = ["vllm", "deepspeed", "bitsandbytes", "peft", "ray.data.llm"]


def test_import_alignlib_loads_neither_vllm_nor_deepspeed():
    code = (
        "import sys, alignlib, alignlib.cli, alignlib.spec, alignlib.pipeline, alignlib.losses, alignlib.pairs, "
        "alignlib.generate, alignlib.score, alignlib.train.loop, alignlib.train.backends, alignlib.export; "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
