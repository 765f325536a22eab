"""GRPO objective (advantages, clipping, k3 KL, aggregation) and the LoRA learner's mechanics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainer.config import GrpoConfig, LoraConfig, OptimConfig
from trainer.learning.grpo import group_advantages, policy_loss, sequence_weights
from trainer.learning.samples import Sample


def test_group_advantages() -> None:
    assert group_advantages([1.0, 0.0, 0.0, 1.0], "none") == [0.5, -0.5, -0.5, 0.5]
    std = group_advantages([1.0, 0.0, 0.0, 1.0], "std")
    sample_std = math.sqrt(4 * 0.25 / 3)
    assert std == pytest.approx([0.5 / sample_std, -0.5 / sample_std, -0.5 / sample_std, 0.5 / sample_std], rel=1e-5)
    assert group_advantages([0.3, 0.3, 0.3], "std") == [0.0, 0.0, 0.0]


def test_sequence_weights() -> None:
    assert sequence_weights([2, 6], "token_mean", 10) == [1 / 8, 1 / 8]
    assert sequence_weights([2, 6], "seq_mean_token_mean", 10) == [1 / 4, 1 / 12]
    assert sequence_weights([2, 6], "seq_mean_token_sum_norm", 10) == [1 / 20, 1 / 20]


def _loss(lp: list[float], old: list[float], adv: float, **kw: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    logprobs = torch.tensor([lp], requires_grad=True)
    loss, stats = policy_loss(
        logprobs, torch.tensor([old]), torch.tensor([adv]), torch.ones(1, len(lp)), torch.tensor([1.0]),
        clip_eps_low=0.2, clip_eps_high=0.3, **kw,
    )
    loss.backward()
    return loss, logprobs.grad, stats


def test_ratio_one_gives_plain_policy_gradient() -> None:
    loss, grad, stats = _loss([-1.0, -2.0], [-1.0, -2.0], 2.0)
    assert loss.item() == pytest.approx(-4.0)
    assert grad.tolist() == [[-2.0, -2.0]]
    assert stats["clipped"] == 0 and stats["ratio"] == pytest.approx(2.0)


def test_clipping_is_asymmetric_and_one_sided() -> None:
    up, down = math.log(1.5), math.log(0.5)
    # positive advantage: a ratio above 1 + eps_high is clipped (no gradient), below is not
    _, grad, stats = _loss([up, down], [0.0, 0.0], 1.0)
    assert grad[0, 0] == 0.0 and grad[0, 1] == pytest.approx(-0.5)
    assert stats["clipped"] == 1
    # negative advantage: a ratio below 1 - eps_low is clipped, above is not
    _, grad, stats = _loss([up, down], [0.0, 0.0], -1.0)
    assert grad[0, 0] == pytest.approx(1.5) and grad[0, 1] == 0.0
    assert stats["clipped"] == 1
    # inside the asymmetric band (1.25 < 1 + 0.3) nothing is clipped
    _, grad, stats = _loss([math.log(1.25)], [0.0], 1.0)
    assert stats["clipped"] == 0 and grad[0, 0] == pytest.approx(-1.25)


def test_k3_kl() -> None:
    lp, ref = [-1.0, -2.0], [-1.0, -1.5]
    loss, _, stats = _loss(lp, lp, 0.0, ref_logprobs=torch.tensor([ref]), kl_coef=0.5)
    expected = sum(math.exp(r - p) - (r - p) - 1 for p, r in zip(lp, ref))
    assert stats["kl"] == pytest.approx(expected)
    assert loss.item() == pytest.approx(0.5 * expected)
    _, _, stats = _loss(lp, lp, 0.0, ref_logprobs=torch.tensor([lp]), kl_coef=0.5)
    assert stats["kl"] == 0.0


def test_masked_tokens_do_not_count() -> None:
    logprobs = torch.tensor([[-1.0, -5.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    loss, stats = policy_loss(
        logprobs, logprobs.detach(), torch.tensor([1.0]), mask, torch.tensor([0.5]), clip_eps_low=0.2, clip_eps_high=0.2
    )
    loss.backward()
    assert logprobs.grad.tolist() == [[-0.5, 0.0, -0.5]] and stats["tokens"] == 2


# --- learner ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def make_learner(model_dir: Path, **grpo: object):
    from trainer.learning.learner import Learner

    torch.manual_seed(0)
    return Learner(
        model_dir, lora=LoraConfig(rank=4, alpha=8), optim=OptimConfig(lr=1e-2), grpo=GrpoConfig(**grpo),
        max_tokens=8, device="cpu", dtype="float32",
    )


def _samples(learner, lengths: list[tuple[int, int]], seed: int = 0) -> list[Sample]:
    """Samples with prompt/completion lengths given; old logprobs = the learner's own."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, c) in enumerate(lengths):
        ids = torch.randint(10, 200, (p + c,), generator=g).tolist()
        out.append(Sample(ids, [0] * p + [1] * c, [0.0] * (p + c), advantage=(1.0 if i % 2 else -1.0)))
    for s, lp in zip(out, learner.logprobs(out)):
        s.old_logprobs = [0.0] * (len(s.input_ids) - len(lp)) + lp
    return out


def test_logprobs_do_not_depend_on_padding_or_batch(tiny_model: Path) -> None:
    learner = make_learner(tiny_model)
    samples = _samples(learner, [(5, 3), (20, 7), (2, 1)])
    batch = learner._collate(samples, [0.0] * 3)
    together = learner._logprobs(batch)
    for i, s in enumerate(samples):
        alone = learner.logprobs([s])[0]
        got = together[i][batch.mask[i] > 0].tolist()
        assert got == pytest.approx(alone, abs=1e-5)
        assert got == pytest.approx(s.old_logprobs[-len(got):], abs=1e-5)


def test_micro_batching_gives_the_full_batch_gradient(tiny_model: Path) -> None:
    lengths = [(5, 3), (9, 7), (3, 2), (12, 4), (6, 6)]
    params = []
    for mbs in (1, 2, 8):
        learner = make_learner(tiny_model, micro_batch_size=mbs)
        stats = learner.train_step(_samples(learner, lengths))
        assert stats["ratio"] == pytest.approx(1.0, abs=1e-5)  # on-policy: ratio starts at 1
        assert stats["logprob_abs_diff"] < 1e-5 and math.isfinite(stats["loss"])
        params.append(torch.cat([p.detach().flatten() for p in learner.model.parameters() if p.requires_grad]))
    assert torch.allclose(params[0], params[1], atol=1e-6) and torch.allclose(params[0], params[2], atol=1e-6)


def test_update_moves_logprobs_along_the_advantage(tiny_model: Path) -> None:
    learner = make_learner(tiny_model, epochs=3)
    samples = _samples(learner, [(4, 5), (4, 5)])
    before = learner.logprobs(samples)
    stats = learner.train_step(samples)
    after = learner.logprobs(samples)
    assert sum(after[1]) > sum(before[1])  # advantage +1: more likely
    assert sum(after[0]) < sum(before[0])  # advantage -1: less likely
    assert stats["clip_frac"] >= 0 and stats["kl"] == 0.0


def test_reference_pass_only_with_kl(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    learner = make_learner(tiny_model, kl_coef=0.0)
    calls = []
    original = learner.model.disable_adapter
    monkeypatch.setattr(learner.model, "disable_adapter", lambda: calls.append(1) or original())
    learner.train_step(_samples(learner, [(4, 3), (4, 3)]))
    assert calls == []
    learner.grpo = GrpoConfig(kl_coef=0.1, epochs=2)
    stats = learner.train_step(_samples(learner, [(4, 3), (4, 3)]))
    assert calls == [1] and stats["kl"] > 0  # once per step, not per epoch; the adapter has moved


def test_adapter_and_state_round_trip(tiny_model: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from trainer.models import load_model

    learner = make_learner(tiny_model)
    samples = _samples(learner, [(4, 3), (6, 2)])
    learner.train_step(samples)
    learner.save_adapter(tmp_path / "adapter")
    torch.save(learner.state_dict(), tmp_path / "state.pt")
    want = learner.logprobs(samples)

    # standard PEFT reload
    base, _ = load_model(tiny_model)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.tensor([samples[0].input_ids])
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    got = logits.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)[-3:].tolist()
    assert got == pytest.approx(want[0], abs=1e-5)

    # into a fresh learner, optimizer included: the next update is identical
    other = make_learner(tiny_model)
    other.load_adapter_weights(tmp_path / "adapter")
    other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    flat = lambda rows: [x for row in rows for x in row]  # noqa: E731
    assert flat(other.logprobs(samples)) == pytest.approx(flat(want), abs=1e-6)
    learner.train_step(samples)
    other.train_step(samples)
    assert flat(other.logprobs(samples)) == pytest.approx(flat(learner.logprobs(samples)), abs=1e-6)


def _grouped_samples(learner) -> list[Sample]:
    """GRPO-shaped samples: 3 prompts of different lengths, 3-4 completions each (one completion
    repeats another's first tokens), plus a multi-turn sample whose second prompt is masked."""
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(10, 200, (n,), generator=g).tolist()  # noqa: E731
    out = []
    for p_len, n in ((7, 4), (15, 3), (4, 3)):
        prompt = rand(p_len)
        completions = [rand(int(torch.randint(2, 9, (1,), generator=g))) for _ in range(n)]
        completions[1] = completions[0][:2] + completions[1]
        for k, c in enumerate(completions):
            out.append(Sample(prompt + c, [0] * p_len + [1] * len(c), [0.0] * (p_len + len(c)),
                              advantage=float(k) - 1.0))
    turn1, tool, turn2 = rand(3), rand(5), rand(4)
    prompt = out[0].input_ids[:7]
    out.append(Sample(prompt + turn1 + tool + turn2, [0] * 7 + [1] * 3 + [0] * 5 + [1] * 4, [0.0] * 19, advantage=0.5))
    for s, lp in zip(out, learner.logprobs(out)):
        s.old_logprobs = [0.0] * len(s.input_ids)
        k = 0
        for i, m in enumerate(s.loss_mask):
            if m:
                s.old_logprobs[i] = lp[k]
                k += 1
    return out


def test_shared_prefix_is_exact(tiny_model: Path) -> None:
    """Same logprobs and the same gradient as whole sequences, however the runs are packed
    (one run per micro-batch, or every run left-padded into one), with gradient checkpointing or
    without (a checkpointed layer replays against the same prefix cache in the backward pass)."""
    from trainer.learning.prefix import plan_prefix_runs

    grads = []
    for share, mbs, ckpt in ((False, 4, False), (True, 4, False), (True, 16, False), (False, 4, True), (True, 4, True)):
        learner = make_learner(tiny_model, share_prefix=share, micro_batch_size=mbs, gradient_checkpointing=ckpt)
        assert learner.model.is_gradient_checkpointing == ckpt and learner._head_chunks == ckpt
        learner.head_chunk_elements = 5 * learner.model.config.vocab_size  # the head runs over several chunks
        samples = _grouped_samples(learner)
        if share:
            runs = plan_prefix_runs(samples)
            assert sorted(len(m) for m, _ in runs) == [3, 3, 5]  # each prompt's group (+ the multi-turn one)
            assert sorted(shared for _, shared in runs) == [3, 6, 14]  # the prompt minus its last token
        batches = learner._micro_batches(samples, [1.0 / 20] * len(samples))
        assert all((b.prefix_ids is not None) == share for b in batches)
        assert sum(b.input_ids.shape[0] for b in batches) == len(samples)
        learner.model.train()
        _, totals = learner._backward(batches, [None] * len(batches))
        assert totals["abs_logprob_diff"] / totals["tokens"] < 1e-5  # recomputed = recorded logprobs
        grads.append(torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.requires_grad]))
    assert grads[0].abs().max() > 1e-3
    for other in grads[1:]:
        assert torch.allclose(grads[0], other, atol=1e-6)
