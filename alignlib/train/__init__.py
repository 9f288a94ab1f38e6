"""Stage `train`: Ray Train `TorchTrainer` workers run one loop (`loop.py`) for every loss.

In: `pairs/pairs` (ORPO, DPO, IPO) or `pairs/sft` (SFT). Out: checkpoints reported to Ray Train
under `<output_dir>/train/ray/`, the final one named in the stage manifest, and per-step metrics in
`train/metrics`. The backend (`backends.py`: ddp | deepspeed | qlora) owns model wrapping,
backward, step and checkpointing; the loss is a pure function from `losses.py`.
"""
