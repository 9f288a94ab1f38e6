"""alignlib: rejection sampling and preference optimisation (ORPO, DPO, IPO, SFT) on Ray."""
