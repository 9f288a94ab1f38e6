"""The `transformers` engine: a batched sampler over an HF causal LM, one model per Ray actor.

HF `generate` draws all rows of a batch from one random stream; here each row samples from its
own `torch.Generator` seeded with the row's `seed`, so its random draws do not depend on which batch
it landed in (its logits can, in the last bits: see `raydata.ordered_data`). Prompts are
left-padded and decoded with a KV cache.
"""

from __future__ import annotations

import pyarrow as pa

from alignlib import schema as S
from alignlib.raydata import actor_pool, actor_resources, one_batch_per_block


def sample_tokens(
    model,
    prompts: list[list[int]],
    seeds: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int,
    pad_id: int,
) -> list[list[int]]:
    """Sample completions; returns each row's new tokens up to and including EOS."""
    import torch

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    past, step_ids = None, input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            result = model(
                input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True
            )
            past = result.past_key_values
            logits = result.logits[:, -1, :].float().cpu()
            next_ids = []
            for i in range(len(prompts)):
                if done[i]:
                    next_ids.append(pad_id)
                    continue
                token = _draw(logits[i], temperature, top_p, generators[i])
                out[i].append(token)
                done[i] = token == eos_id
                next_ids.append(token)
            if bool(done.all()):
                break
            step_ids = torch.tensor(next_ids, device=device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=mask.dtype, device=device)], dim=1)
    return out


def _draw(logits, temperature: float, top_p: float, generator) -> int:
    import torch

    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        # Keep the smallest set of tokens whose probability reaches top_p (nucleus sampling).
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class HFGenerator:
    def __init__(
        self,
        model: str,
        dtype: str,
        chat_template: str | None,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        trust_remote_code: bool = False,
    ):
        import torch

        from alignlib.generate.sampling import Sampling
        from alignlib.models import load_causal_lm, load_tokenizer

        on_gpu = torch.cuda.is_available()
        self.tokenizer = load_tokenizer(model, chat_template, trust_remote_code)
        self.model = load_causal_lm(model, dtype, on_gpu, trust_remote_code).eval().to("cuda" if on_gpu else "cpu")
        self.default = Sampling(max_new_tokens, temperature, top_p)
        self.name = f"transformers engine ({model})"

    def __call__(self, batch: pa.Table) -> pa.Table:
        from alignlib.raydata import counted_batch

        with counted_batch(batch, self.name):
            return self._generate(batch)

    def _generate(self, batch: pa.Table) -> pa.Table:
        from alignlib.generate.sampling import Sampling, row_sampling

        groups: dict[Sampling, list[int]] = {}
        for i, sampling in enumerate(row_sampling(batch, self.default)):
            groups.setdefault(sampling, []).append(i)
        if len(groups) > 1:  # rows sampled two ways (`sample_parts`): each way on its own, back in row order
            parts = [self._generate(batch.take(pa.array(rows))) for rows in groups.values()]
            order = [i for rows in groups.values() for i in rows]
            joined = pa.concat_tables(parts)
            return joined.take(pa.array(sorted(range(len(order)), key=order.__getitem__)))
        (sampling,) = groups or [self.default]
        prompts = batch["prompt_token_ids"].to_pylist()
        tokens = sample_tokens(
            self.model,
            prompts,
            batch[S.SEED].to_pylist(),
            eos_id=self.tokenizer.eos_token_id,
            pad_id=self.tokenizer.pad_token_id,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
        )
        eos = self.tokenizer.eos_token_id
        # A cut can end inside a multi-byte character; like vLLM's detokenizer, leave the partial bytes out
        # rather than decode them as U+FFFD, so both engines write the same text.
        texts = [t.rstrip("\ufffd") for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        finish = ["stop" if t and t[-1] == eos else "length" for t in tokens]
        return (
            batch.append_column(S.COMPLETION, pa.array(texts, pa.string()))
            .append_column(S.FINISH_REASON, pa.array(finish, pa.string()))
            .append_column(S.NUM_TOKENS, pa.array([len(t) for t in tokens], pa.int32()))
        )


def hf_generate(requests, model, sampling, settings):
    from alignlib.raydata import count_batch_starts

    count_batch_starts()
    return one_batch_per_block(requests, settings.batch_size).map_batches(
        HFGenerator,
        fn_constructor_kwargs=dict(
            model=model.model,
            dtype=model.dtype,
            chat_template=model.chat_template,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            trust_remote_code=model.trust_remote_code,
        ),
        batch_size=settings.batch_size,
        batch_format="pyarrow",
        compute=actor_pool(settings.concurrency),
        **actor_resources(settings.resources),
    )
