"""Call records -> training sequences: masks, logprob alignment, multi-turn merge rules."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from trainer.learning.samples import build_sequences, rollout_samples


@dataclass
class Call:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]


def test_single_call() -> None:
    [s] = build_sequences([Call([1, 2, 3], [7, 8], [-0.5, -0.25])])
    assert s.input_ids == [1, 2, 3, 7, 8]
    assert s.loss_mask == [0, 0, 0, 1, 1]
    assert s.old_logprobs == [0.0, 0.0, 0.0, -0.5, -0.25]
    assert s.num_loss_tokens == 2


def test_extending_calls_merge_and_mask_the_tool_result() -> None:
    first = Call([1, 2], [10, 11], [-1.0, -2.0])
    # the env appended a tool result (ids 50, 51) and the template's glue (52) after the completion
    second = Call([1, 2, 10, 11, 50, 51, 52], [12], [-3.0])
    third = Call([1, 2, 10, 11, 50, 51, 52, 12, 60], [13, 14], [-4.0, -5.0])
    [s] = build_sequences([first, second, third])
    assert s.input_ids == [1, 2, 10, 11, 50, 51, 52, 12, 60, 13, 14]
    assert s.loss_mask == [0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 1]
    assert s.old_logprobs == [0, 0, -1.0, -2.0, 0, 0, 0, -3.0, 0, -4.0, -5.0]


def test_rewritten_history_starts_a_new_sequence_with_the_same_advantage() -> None:
    first = Call([1, 2], [10, 11], [-1.0, -2.0])
    rewritten = Call([1, 2, 99, 50], [12], [-3.0])  # does not extend [1, 2, 10, 11]
    samples = rollout_samples([first, rewritten], advantage=0.7, rollout_id="r1")
    assert [s.input_ids for s in samples] == [[1, 2, 10, 11], [1, 2, 99, 50, 12]]
    assert [s.loss_mask for s in samples] == [[0, 0, 1, 1], [0, 0, 0, 0, 1]]
    assert all(s.advantage == 0.7 and s.rollout_id == "r1" for s in samples)


def test_empty_completion_and_bad_record() -> None:
    assert build_sequences([Call([1, 2], [], [])]) == []
    with pytest.raises(ValueError, match="2 completion tokens but 1 logprobs"):
        build_sequences([Call([1], [2, 3], [-1.0])])


def test_real_chat_template_tool_turn_merges(tmp_path) -> None:
    """With the tiny model's ChatML template, a tool result appended after a sampled tool call
    extends the previous prompt + completion: one sequence, the tool response masked."""
    from transformers import AutoTokenizer

    from trainer.models import build_tiny_model

    tok = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m"))
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    p1 = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
    call_text = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>'
    c1 = tok.encode(call_text, add_special_tokens=False)
    assistant = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]}
    msgs2 = msgs + [assistant, {"role": "tool", "tool_call_id": "c1", "content": "5"}]
    p2 = tok.apply_chat_template(msgs2, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
    c2 = tok.encode("The answer is 5.<|im_end|>", add_special_tokens=False)
    samples = build_sequences([Call(p1, c1, [-1.0] * len(c1)), Call(p2, c2, [-1.0] * len(c2))])
    assert len(samples) == 1, "the template re-renders the tool call differently from the sampled tokens"
    s = samples[0]
    sampled = tok.decode([t for t, m in zip(s.input_ids, s.loss_mask) if m])
    masked_tail = tok.decode(s.input_ids[len(p1) + len(c1): len(p2)])
    assert "<tool_response>\n5\n</tool_response>" in masked_tail
    assert "tool_response" not in sampled and sampled.count("The answer is 5.") == 1
