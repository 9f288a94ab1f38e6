"""Training: one loop (`loop.py`) for every loss, in Ray Train `TorchTrainer` workers or, for a one-worker
job, in one Ray actor (`single.py`); `launch.run_training` picks the launcher and gives a `TrainResult`.

In: a Ray Dataset of pairs (ORPO, DPO, IPO) or SFT rows. Out: checkpoints under
`<output_dir>/train-ray/<run>/` in one layout for both launchers (`checkpoints.py`), the last one named in the
result, and per-step metrics beside them. The backend (`backends.py`: ddp | deepspeed | qlora) owns model
wrapping, backward, step and checkpointing; the loss is a pure function from `losses.py`.
"""
