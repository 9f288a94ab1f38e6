"""Prompts that do not fit the context of a model that generates from them, found in the prompts stage.

vLLM refuses a prompt too long for its `max_model_len` only when the request reaches an engine, which
can be hours into a large generate run. Here the check costs one tokenizer and one model config per
generating model (the policy, and the weak model if set), loaded on the driver: a prompt fits when its
tokens, rendered exactly as generation renders them (`models.encode_prompt`), plus
`generate.max_new_tokens` stay within the model's context.

    fits = ContextCheck(spec)
    problems = fits([row["messages"] for row in rows])   # None, or (reason, message) per chat
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignlib.spec import JobSpec


@dataclass
class _Model:
    role: str  # "policy" | "weak"
    source: str
    tokenizer: Any
    limit: int | None
    limit_from: str


class ContextCheck:
    """Callable: chats -> per chat None (fits every generating model) or (reason, message)."""

    def __init__(self, spec: JobSpec):
        from alignlib.models import context_length, load_tokenizer

        g = spec.generate
        self.max_new_tokens = g.max_new_tokens
        max_model_len = g.engine_kwargs.get("max_model_len") if g.engine == "vllm" else None
        self.models = []
        for role, model in (("policy", spec.policy), ("weak", g.weak_model)):
            if model is None:
                continue
            tokenizer = load_tokenizer(model.model, model.chat_template, model.trust_remote_code)
            limit: int | None
            if max_model_len is not None:
                limit, limit_from = int(max_model_len), "generate.engine_kwargs.max_model_len"
            else:
                limit, limit_from = context_length(model.model, model.trust_remote_code), "its config"
            self.models.append(_Model(role, model.model, tokenizer, limit, limit_from))

    def __call__(self, chats: list[list[dict[str, str]]]) -> list[tuple[str, str] | None]:
        from alignlib.models import prompt_lengths

        out: list[tuple[str, str] | None] = [None] * len(chats)
        for m in self.models:
            for i, n in enumerate(prompt_lengths(m.tokenizer, chats)):
                if out[i] is not None:
                    continue  # one reason per prompt: the first model it does not fit
                if n is None:
                    out[i] = (
                        "no_chat_template",
                        f"the {m.role} model {m.source} has no chat template, so a "
                        f"{len(chats[i])}-turn prompt cannot be rendered; set its chat_template",
                    )
                elif m.limit is not None and n + self.max_new_tokens > m.limit:
                    out[i] = (
                        "prompt_too_long",
                        f"prompt is {n} tokens; with generate.max_new_tokens {self.max_new_tokens} that is more than "
                        f"the {m.limit}-token context of the {m.role} model {m.source} ({m.limit_from})",
                    )
        return out
