"""Stage `train`: one loop (`loop.py`) for every loss, in Ray Train `TorchTrainer` workers or, for a one-worker
job, in one Ray actor (`single.py`).

In: `pairs/pairs` (ORPO, DPO, IPO) or `pairs/sft` (SFT). Out: checkpoints under
`<output_dir>/train-ray/<run>/`, the final one named in the stage manifest, and per-step metrics in
`train/metrics`. The backend (`backends.py`: ddp | deepspeed | qlora) owns model wrapping,
backward, step and checkpointing; the loss is a pure function from `losses.py`.
"""
