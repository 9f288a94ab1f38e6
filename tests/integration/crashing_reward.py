"""A reward function for test_faults that kills the process it runs in on some prompts, as a crash in native
code (a segfault, an abort) would: a batch holding such a prompt dies every time it is tried."""

import os
import signal


def dies_on_plus_one(prompt: str, completion: str, gold: str | None) -> float:
    if " + 1" in prompt:
        os.kill(os.getpid(), signal.SIGKILL)
    return 0.0


dies_on_plus_one.needs_gold = False
