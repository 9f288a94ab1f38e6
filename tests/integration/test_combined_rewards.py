"""Two function rewards combined with weights, through the real score stage (local Ray) and into pairs."""

import pyarrow as pa
import pytest

from alignlib import schema as S
from alignlib.pipeline import Pipeline
from alignlib.prompts import prompt_id
from alignlib.rewards import length_penalty, numeric_closeness
from alignlib.spec import parse_spec
from alignlib.store import read_table, write_table

pytestmark = pytest.mark.integration

CLOSENESS, LENGTH = "alignlib.rewards:numeric_closeness", "alignlib.rewards:length_penalty"
# (question, gold answer, completions): numeric closeness ties the first two answers of each prompt;
# the length penalty (weight 0.5) prefers the shorter one.
PROMPTS = [
    ("What is 3 + 4?", "7", ["7", "   7   ", "9"]),
    ("What is 10 + 2?", "12", ["12", "12     ", "no idea"]),
    ("What is 1 + 1?", "2", ["2", "  2", "3"]),
]


def completions() -> pa.Table:
    rows = []
    for question, gold, answers in PROMPTS:
        messages = [{"role": "user", "content": question}]
        for i, answer in enumerate(answers):
            rows.append(
                {
                    S.PROMPT_ID: prompt_id(messages),
                    S.PROMPT: question,
                    S.MESSAGES: messages,
                    S.GOLD: gold,
                    S.SOURCE: "hand-built",
                    S.COMPLETION: answer,
                    S.GENERATOR: S.GENERATOR_POLICY,
                    S.SAMPLE_INDEX: i,
                    S.SEED: i,
                    S.FINISH_REASON: "stop",
                    S.NUM_TOKENS: len(answer),
                }
            )
    return pa.Table.from_pylist(rows, schema=S.arrow_schema(S.COMPLETION_COLUMNS))


def test_weighted_sum_of_two_function_rewards(ray_session, tmp_path, capsys):
    spec = parse_spec(
        {
            "name": "combined",
            "output_dir": str(tmp_path / "run"),
            "data": {"path": "unused.jsonl"},
            "policy": {"model": "builtin:tiny-policy"},
            "score": {
                "rewards": [
                    {"type": "function", "function": CLOSENESS},
                    {"type": "function", "function": LENGTH, "weight": 0.5, "name": "brevity"},
                ]
            },
            "pairs": {"strategy": "best_vs_second", "min_margin": 0.0},
        }
    )
    pipeline = Pipeline(spec)
    with pipeline.store.writer("generate") as out:  # the generate stage's output, made by hand
        write_table(completions(), out.table("completions"))
        out.commit(pipeline.fingerprint("generate"), inputs={})

    manifests = pipeline.run(["score", "pairs"])
    # Progress in rows, in alignlib's words (Ray Data's own bars count blocks).
    assert "[alignlib] score: 9/9 rows (100%)" in capsys.readouterr().out

    scored = read_table(pipeline.table_path("score", "scored"))
    assert scored.column_names == S.SCORED_COLUMNS + ["reward_numeric_closeness", "reward_brevity"]
    assert manifests["score"]["tables"] == {"scored": 9}
    rows = scored.to_pylist()
    for r in rows:
        closeness = numeric_closeness(prompt=r[S.PROMPT], completion=r[S.COMPLETION], gold=r[S.GOLD])
        brevity = length_penalty(prompt=r[S.PROMPT], completion=r[S.COMPLETION], gold=r[S.GOLD])
        assert (r["reward_numeric_closeness"], r["reward_brevity"]) == (closeness, brevity)
        assert r[S.REWARD] == pytest.approx(closeness + 0.5 * brevity)
    assert {r[S.REWARD_SOURCE] for r in rows} == {f"1*{CLOSENESS} + 0.5*{LENGTH}"}
    stats = manifests["score"]["stats"]
    assert stats["reward_mean"] == pytest.approx(sum(r[S.REWARD] for r in rows) / 9)
    assert stats["reward_brevity_mean"] == pytest.approx(sum(r["reward_brevity"] for r in rows) / 9)

    # The pairs rank by the combined reward: the padded answer loses to the bare one it ties with on closeness.
    pairs = read_table(pipeline.table_path("pairs", "pairs")).to_pylist()
    assert sorted((p[S.CHOSEN], p[S.REJECTED]) for p in pairs) == [("12", "12     "), ("2", "  2"), ("7", "   7   ")]
    assert all(p[S.MARGIN] == pytest.approx(0.5 * (len(p[S.REJECTED]) - len(p[S.CHOSEN])) / 100) for p in pairs)
    quality = manifests["pairs"]["stats"]["quality"]
    assert sorted(quality["components"]) == ["reward_brevity", "reward_numeric_closeness"]
    assert quality["components"]["reward_brevity"]["length_correlation"]["policy"]["spearman"] == pytest.approx(-1.0)
    assert "reward_brevity (one of the combined rewards)" in (pipeline.store.path("pairs") / "report.html").read_text()
