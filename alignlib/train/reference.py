"""Reference log-probs of every pair, computed once, so DPO/IPO workers hold no reference (run by the stage
`alignlib.stages.ref_logps`).

In: `pairs/pairs`. Out: `ref_logps/pairs`, the same rows plus `ref_chosen_logps` and
`ref_rejected_logps`: summed log-probs of the completion tokens (EOS included) under the starting
policy, tokenized and truncated exactly as training will (`train.data.encode_rows`). Training
divides by its own token counts where the loss wants length-averaged log-probs (IPO).

Runs as a Ray Data actor pool holding the policy in inference mode: one forward per pair in
length-sorted micro-batches, no backward, no optimizer state; the memory a frozen copy would take
on every training worker is spent once, here, before training starts.
"""

from __future__ import annotations

import pyarrow as pa

from alignlib import schema as S
from alignlib.raydata import LIGHT_CPUS, actor_pool, actor_resources

MICRO_BATCH = 16


class ReferenceLogps:
    """Ray Data callable class: pairs -> pairs + summed reference log-probs of chosen and rejected."""

    def __init__(self, spec_json: dict):
        import torch

        from alignlib.models import load_causal_lm, load_tokenizer
        from alignlib.spec import JobSpec, reference_model

        spec = JobSpec.model_validate(spec_json)
        self.train = spec.train
        on_gpu = spec.train.backend.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        policy = spec.policy
        self.tokenizer = load_tokenizer(policy.model, policy.chat_template, policy.trust_remote_code)
        model = reference_model(spec)  # the reference policy: train.reference_model, else the starting policy
        self.model = load_causal_lm(model, policy.dtype, on_gpu, policy.trust_remote_code).to(self.device).eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from alignlib.train.data import collate, encode_rows, example_length
        from alignlib.train.loop import KEEP, logits_keep, model_logps

        examples = encode_rows(
            self.tokenizer, batch.to_pylist(), True, self.train.max_length, self.train.max_prompt_length
        )
        chosen, rejected = [0.0] * len(examples), [0.0] * len(examples)
        # Length-sorted micro-batches: a short pair is not padded to the longest one in the block.
        order = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))
        with torch.inference_mode():
            for start in range(0, len(order), MICRO_BATCH):
                index = order[start : start + MICRO_BATCH]
                tensors = collate([examples[i] for i in index], self.tokenizer.pad_token_id, paired=True)
                keep = logits_keep(tensors["labels"])
                tensors = {k: v.to(self.device) for k, v in tensors.items()} | {KEEP: keep}
                logps = model_logps(self.model, tensors, average=False).tolist()
                for k, i in enumerate(index):
                    chosen[i], rejected[i] = logps[k], logps[len(index) + k]
        batch = batch.append_column(S.REF_CHOSEN_LOGPS, pa.array(chosen, pa.float64()))
        return batch.append_column(S.REF_REJECTED_LOGPS, pa.array(rejected, pa.float64()))


def reference_pool(spec) -> tuple[int, int]:
    """Actors of the ref_logps stage: up to one per training worker (the GPUs training will use next)."""
    return (1, max(1, spec.train.backend.num_workers))


def reference_resources(spec) -> dict[str, float]:
    """What one ref_logps actor asks Ray for: a GPU when training runs on GPUs, else a CPU."""
    return {"GPU": 1.0} if spec.train.backend.use_gpu else {"CPU": 1.0}


def reference_logps(pairs, spec):
    """A Ray Dataset of pairs -> the same pairs with reference log-prob columns (lazy)."""
    resources = actor_resources(reference_resources(spec))
    return pairs.map_batches(
        ReferenceLogps,
        fn_constructor_args=(spec.model_dump(mode="json"),),
        batch_format="pyarrow",
        batch_size=256,
        compute=actor_pool(reference_pool(spec)),
        **resources,
    ).map_batches(S.conform, fn_args=(S.REF_PAIR_COLUMNS,), batch_format="pyarrow", num_cpus=LIGHT_CPUS)
