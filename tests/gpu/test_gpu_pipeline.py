"""The same demo flow on a CUDA GPU: vLLM on the GPU, training with use_gpu, and QLoRA in 4-bit.

Skipped on machines without CUDA (CI has none); run on a GPU machine with
`python -m pytest tests/gpu`.
"""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "backend",
    ["{name: ddp, num_workers: 1, use_gpu: true}", "{name: qlora, use_gpu: true}"],
    ids=["ddp", "qlora"],
)
def test_demo_on_gpu(backend, ray_session, tmp_path):
    from alignlib.pipeline import Pipeline
    from alignlib.spec import load_spec

    overrides = [
        f"output_dir={tmp_path}",
        "rounds.count=1",
        "generate.resources={GPU: 1}",
        "generate.engine_kwargs={max_model_len: 128, gpu_memory_utilization: 0.3}",
        f"train.backend={backend}",
    ]
    if "qlora" in backend:
        overrides.append("train.lora={r: 8, alpha: 16}")
    manifests = Pipeline(load_spec(ROOT / "jobs" / "demo.yaml", overrides)).run()
    s = manifests["eval"]["stats"]
    assert s["trained_mean_reward"] > s["base_mean_reward"] + 0.3, s
