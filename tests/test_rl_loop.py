"""GRPO loop on the tiny Llama with a scripted Generator: known completions -> known rewards -> known
advantages -> a loss checked against a float64 re-implementation written here."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from alignkit.generation.base import Completion
from alignkit.rl import loop as loop_mod
from alignkit.rl.loop import GRPOConfig, GRPOLoop, check_batch_sizes
from alignkit.rl.rewards import r1_zero_reward

PROMPTS = ["User: 1 + 1\nAssistant: <think>", "User: 2 + 3\nAssistant: <think>"]
ANSWERS = ["2", "5"]
# per prompt, the group's completions (the loop re-appends "</answer>" to those that stopped)
SCRIPT = {
    PROMPTS[0]: [("one plus one </think> <answer>2", "stop"), ("no idea", "length")],
    PROMPTS[1]: [("two and three </think> <answer>5", "stop"), ("it is </think> <answer>6", "stop")],
}
REWARDS = {PROMPTS[0]: [1.0, 0.0], PROMPTS[1]: [1.0, 0.0]}


class ScriptedGenerator:
    """Returns SCRIPT's completions in order for each repeated prompt; counts weight syncs."""

    name = "scripted"

    def __init__(self, tokenizer, script=SCRIPT):
        self.tokenizer, self.script, self.synced, self.calls = tokenizer, script, 0, []

    def generate(self, prompts, params):
        self.calls.append((list(prompts), params))
        seen: dict[str, int] = {}
        out = []
        for p in prompts:
            k = seen.get(p, 0)
            seen[p] = k + 1
            text, reason = self.script[p][k % len(self.script[p])]
            out.append(Completion(text=text, token_ids=self.tokenizer(text)["input_ids"], finish_reason=reason))
        return out

    def chat(self, conversations, params):
        raise NotImplementedError

    def update_weights(self, model):
        self.synced += 1


def _settings(tmp_path=None, **kw) -> GRPOConfig:
    base = {"n_grpo_steps": 1, "rollout_batch_size": 4, "group_size": 2, "train_batch_size": 4,
                "gradient_accumulation_steps": 2, "loss_type": "reinforce_with_baseline", "max_new_tokens": 16,
                "min_new_tokens": 0, "stop": ["</answer>"], "append_stop": True, "max_grad_norm": None,
                "rollout_table_every": 1, "output_dir": str(tmp_path) if tmp_path else None}
    base.update(kw)
    return GRPOConfig(**base)


def _loop(model, tok, settings, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = ScriptedGenerator(tok)
    return GRPOLoop(model, tok, gen, r1_zero_reward, PROMPTS, ANSWERS, opt, settings, **kw), gen


def _expected_loss_f64(model, tok, loss_type: str, length_normalization="mean", constant=16.0) -> float:
    """Hand-rolled float64 loss: advantages from REWARDS, per-token -A*logp (ratio 1 for grpo_clip)."""
    m = copy.deepcopy(model).double().eval()
    per_seq = []
    for prompt, group in SCRIPT.items():
        r = REWARDS[prompt]
        mean = sum(r) / len(r)
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
        for (text, reason), reward in zip(group, r):
            resp = text + "</answer>" if reason == "stop" else text
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            o_ids = tok(resp, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p_ids + o_ids])
            with torch.no_grad():
                logp = torch.log_softmax(m(ids).logits[0, :-1].double(), -1)  # (L-1, V)
            tok_logp = logp[torch.arange(len(p_ids) - 1, ids.shape[1] - 1), torch.tensor(o_ids)]  # (|o|,)
            adv = (reward - mean) / (std + 1e-6)
            weight = {"no_baseline": reward, "reinforce_with_baseline": adv, "grpo_clip": adv}[loss_type]
            terms = -weight * (tok_logp if loss_type != "grpo_clip" else torch.ones_like(tok_logp))
            per_seq.append(terms.sum() / (len(o_ids) if length_normalization == "mean" else constant))
    return float(sum(per_seq) / len(per_seq))


@pytest.mark.parametrize("loss_type", ["no_baseline", "reinforce_with_baseline", "grpo_clip"])
def test_one_step_loss_matches_float64_hand_computation(tiny_model, gpt2_tokenizer, tmp_path, loss_type):
    model = copy.deepcopy(tiny_model)
    loop, gen = _loop(model, gpt2_tokenizer, _settings(tmp_path, loss_type=loss_type))
    before = [p.detach().clone() for p in model.parameters()]
    metrics = loop.train_step()
    expected = _expected_loss_f64(tiny_model, gpt2_tokenizer, loss_type)
    assert metrics["loss"] == pytest.approx(expected, abs=1e-5)
    # rewards: 2 of 4 well-formed and correct; the unfinished one is not formatted
    assert metrics["reward"] == 0.5 and metrics["format_reward"] == 0.75 and metrics["answer_reward"] == 0.5
    assert gen.synced == 1 and gen.calls[0][1].stop == ["</answer>"]
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed, "one optimizer step must change the weights"
    if loss_type == "grpo_clip":
        assert metrics["clip_fraction"] == 0.0  # ratio == 1 on the first, on-policy step


def test_dr_grpo_constant_normalisation(tiny_model, gpt2_tokenizer):
    model = copy.deepcopy(tiny_model)
    s = _settings(loss_type="no_baseline", length_normalization="constant", normalize_constant=16.0)
    loop, _ = _loop(model, gpt2_tokenizer, s)
    expected = _expected_loss_f64(tiny_model, gpt2_tokenizer, "no_baseline", "constant", 16.0)
    assert loop.train_step()["loss"] == pytest.approx(expected, abs=1e-5)


def test_off_policy_old_log_probs_computed_once_never_differentiated(tiny_model, gpt2_tokenizer, monkeypatch):
    model = copy.deepcopy(tiny_model)
    seen = []
    real = loop_mod.grpo_microbatch_train_step

    def spy(policy_log_probs, response_mask, gradient_accumulation_steps, loss_type, **kw):
        old = kw["old_log_probs"]
        seen.append((id(old), old.requires_grad, old.grad_fn, policy_log_probs.requires_grad))
        return real(policy_log_probs, response_mask, gradient_accumulation_steps, loss_type, **kw)

    monkeypatch.setattr(loop_mod, "grpo_microbatch_train_step", spy)
    s = _settings(epochs_per_rollout_batch=3, train_batch_size=2, gradient_accumulation_steps=1, loss_type="grpo_clip")
    loop, _ = _loop(model, gpt2_tokenizer, s)
    metrics = loop.train_step()
    n_micro = 4 // 2
    assert loop.n_old_log_prob_passes == n_micro  # once per micro-batch, not per epoch
    assert len(seen) == 3 * n_micro
    ids_per_epoch = [[s[0] for s in seen[e * n_micro:(e + 1) * n_micro]] for e in range(3)]
    assert ids_per_epoch[0] == ids_per_epoch[1] == ids_per_epoch[2]  # the same tensor objects reused
    assert all(not req and fn is None and pol for _, req, fn, pol in seen)
    # weights moved after the first optimizer step, so later steps are off-policy: some ratio != 1
    assert metrics["grad_norm"] > 0


def test_on_policy_clip_takes_old_log_probs_from_the_training_forward(tiny_model, gpt2_tokenizer, monkeypatch):
    """grpo_clip on-policy (one epoch, train batch = rollout batch): no no-grad old-log-prob pass, and the
    loss and the updated weights equal those of the path with the separate pass (the policy has not moved
    since it generated, so both old log-probs are the same numbers). Off-policy still runs the pass."""
    s = _settings(loss_type="grpo_clip")

    def one_step(force_old_pass: bool):
        model = copy.deepcopy(tiny_model)
        loop, _ = _loop(model, gpt2_tokenizer, s)
        if force_old_pass:
            monkeypatch.setattr(loop, "_needs_old_and_ref", lambda: (True, False))
        metrics = loop.train_step()
        return loop, metrics, [p.detach().clone() for p in model.parameters()]

    shared = []
    real = loop_mod.shared_prompt_log_probs
    monkeypatch.setattr(loop_mod, "shared_prompt_log_probs", lambda *a, **k: shared.append(real(*a, **k)) or shared[-1])
    fast, m_fast, w_fast = one_step(False)
    assert len(shared) == 2 and all(out is not None for out in shared)  # on-policy: each group's prompt once
    ref, m_ref, w_ref = one_step(True)
    assert fast.n_old_log_prob_passes == 0 and ref.n_old_log_prob_passes == 2  # 4 rollouts / micro-batch 2
    assert m_fast["loss"] == pytest.approx(m_ref["loss"], abs=1e-6)
    assert m_fast["clip_fraction"] == m_ref["clip_fraction"] == 0.0
    assert m_fast["loss"] == pytest.approx(_expected_loss_f64(tiny_model, gpt2_tokenizer, "grpo_clip"), abs=1e-5)
    for a, b in zip(w_fast, w_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # two optimizer steps per rollout batch: the second is off-policy, so the pass runs
    off, _ = _loop(copy.deepcopy(tiny_model), gpt2_tokenizer,
                   _settings(loss_type="grpo_clip", train_batch_size=2, gradient_accumulation_steps=1))
    off.train_step()
    assert off.n_old_log_prob_passes == 2


def test_kl_penalty_uses_reference_model(tiny_model, gpt2_tokenizer):
    model = copy.deepcopy(tiny_model)
    s = _settings(beta=0.1, epochs_per_rollout_batch=2)
    loop, _ = _loop(model, gpt2_tokenizer, s, ref_model=tiny_model)
    m1 = loop.train_step()
    # first epoch: policy == reference, k3 == 0 exactly; second epoch after a step: > 0
    assert m1["kl"] > 0 and m1["kl"] < 1
    with pytest.raises(ValueError, match="ref_model"):
        _loop(model, gpt2_tokenizer, _settings(beta=0.1))


@pytest.mark.parametrize("kw, fragment", [
    ({"rollout_batch_size": 6, "group_size": 4, "train_batch_size": 6, "gradient_accumulation_steps": 1},
     "rollout_batch_size (6) must be divisible by group_size (4)"),
    ({"train_batch_size": 4, "gradient_accumulation_steps": 3}, "change gradient_accumulation_steps"),
    ({"rollout_batch_size": 8, "train_batch_size": 6, "gradient_accumulation_steps": 1}, "change train_batch_size"),
    ({"train_batch_size": 1, "gradient_accumulation_steps": 1}, "must be >= group_size"),
    ({"loss_type": "ppo"}, "loss_type='ppo'"),
    ({"length_normalization": "sum"}, "length_normalization='sum'"),
])
def test_batch_size_checks_name_the_setting(kw, fragment):
    with pytest.raises(ValueError, match="GRPO settings") as err:
        check_batch_sizes(_settings(**kw))
    assert fragment in str(err.value)


def test_batch_size_checks_per_process():
    assert check_batch_sizes(_settings(rollout_batch_size=8, train_batch_size=8, gradient_accumulation_steps=2), 2) == 2
    with pytest.raises(ValueError, match="split evenly over 3 processes"):
        check_batch_sizes(_settings(), 3)


def test_train_writes_metrics_checkpoint_and_resumes(tiny_model, gpt2_tokenizer, tmp_path):
    model = copy.deepcopy(tiny_model)
    s = _settings(tmp_path, n_grpo_steps=2, save_every=1)
    loop, _ = _loop(model, gpt2_tokenizer, s, val_prompts=PROMPTS, val_answers=ANSWERS)
    history = loop.train()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [0, 1, 2, 2]
    assert history["val_before"]["val_reward"] == 1.0  # the scripted first completions are both right
    assert (tmp_path / "checkpoints" / "step-2" / "trainable.pt").exists()
    rows = [json.loads(x) for x in (tmp_path / "rollouts.rank0.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {1, 2} and all("advantage" in r for r in rows)
    # resume into a fresh model: weights restored, no step re-run, metrics not duplicated
    fresh = copy.deepcopy(tiny_model)
    loop2, gen2 = _loop(fresh, gpt2_tokenizer, _settings(tmp_path, n_grpo_steps=2, resume=True),
                        val_prompts=PROMPTS, val_answers=ANSWERS)
    loop2.train()
    assert loop2.step == 2 and not any(len(c[0]) == 4 for c in gen2.calls)  # no rollout generated
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


WORKER = '''
import json, sys, torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer
from alignkit.generation.base import Completion
from alignkit.rl.loop import GRPOLoop, GRPOConfig

model_dir, out = sys.argv[1], sys.argv[2]
acc = Accelerator(cpu=True)  # on a CPU-only box: MULTI_CPU (gloo) across the launched processes
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
if acc.process_index == 1:  # start rank 1 elsewhere: the loop must broadcast rank 0's weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)

class Gen:
    name = "scripted"
    def __init__(self):
        self.prompts = []
    def generate(self, prompts, params):
        if params.temperature > 0:  # rollouts only (validation is greedy)
            self.prompts.append(sorted(set(prompts)))
        # rank-dependent completions: different rewards per rank, different local gradients
        texts = [f"{i} </think> <answer>{len(p) % 7 + acc.process_index + i % 2}" for i, p in enumerate(prompts)]
        return [Completion(text=t, token_ids=tok(t)["input_ids"], finish_reason="stop") for t in texts]
    def chat(self, conversations, params):
        raise NotImplementedError
    def update_weights(self, model):
        pass

prompts = [f"User: {a} + {b}\\nAssistant: <think>" for a in range(4) for b in range(4)]
answers = [str(a + b) for a in range(4) for b in range(4)]
s = GRPOConfig(n_grpo_steps=2, rollout_batch_size=8, group_size=2, train_batch_size=8,
                 gradient_accumulation_steps=2, max_new_tokens=8, min_new_tokens=0, stop=["</answer>"],
                 append_stop=True, rollout_table_every=0, output_dir=out)
gen = Gen()
loop = GRPOLoop(model, tok, gen, __import__("alignkit.rl.rewards", fromlist=["x"]).r1_zero_reward, prompts,
                answers, torch.optim.SGD(model.parameters(), lr=0.1), s, val_prompts=prompts[:5],
                val_answers=answers[:5], accelerator=acc)  # 5: uneven shares
loop.train()
torch.save({n: p.detach() for n, p in model.named_parameters()}, f"{out}/rank{acc.process_index}.pt")
json.dump(gen.prompts, open(f"{out}/prompts{acc.process_index}.json", "w"))
'''


@pytest.mark.slow
def test_two_process_accelerate_ranks_end_equal(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "29517", str(script), str(tiny_model_dir), str(tmp_path)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "ranks diverged"
    from transformers import AutoModelForCausalLM

    init = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert any(not torch.equal(w0[k], init[k].detach()) for k in w0), "no update happened"
    p0, p1 = (json.loads((tmp_path / f"prompts{r}.json").read_text()) for r in (0, 1))
    assert len(p0) == len(p1) == 2  # one rollout call per step on each rank
    for step0, step1 in zip(p0, p1):  # each rank its own share of the step's prompts (whole groups)
        assert len(step0) == len(step1) == 2 and not set(step0) & set(step1)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [0, 1, 2, 2]  # rank 0 writes once per step


class _Clock:
    """Stands in for the loop module's ``time``: perf_counter advances by a fixed tick per call."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


@pytest.mark.parametrize("tick", [1e-6, 1.0], ids=["fast-process", "slow-process"])
def test_collective_calls_do_not_depend_on_timings(tiny_model, gpt2_tokenizer, monkeypatch, tick):
    """Regression (a 2-process run hung): a gather made only when a local duration passed a threshold
    left the processes in different collectives. The number of gathers per step must not depend on time."""
    loop, _ = _loop(copy.deepcopy(tiny_model), gpt2_tokenizer, _settings())
    calls = []
    real = loop._gather
    monkeypatch.setattr(loop, "_gather", lambda values: calls.append(len(values)) or real(values))
    monkeypatch.setattr(loop_mod, "time", _Clock(tick))
    metrics = loop.train_step()
    # rewards, format, answer, lengths (4 values each) + generated tokens + trained tokens (1 each)
    assert calls == [4, 4, 4, 4, 1, 1]
    assert (metrics["log_prob_tokens_per_s"] is None) == (tick < 1e-3)


def _adam_loop(model, tok, settings, **kw):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return GRPOLoop(model, tok, ScriptedGenerator(tok), r1_zero_reward, PROMPTS, ANSWERS, opt, settings, **kw)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tiny_model, gpt2_tokenizer, tmp_path):
    """Stop after step 2 of 4 (the kill), leave a half-written checkpoint behind, resume in a fresh model and
    optimizer: weights equal the uninterrupted run's (Adam state and RNG restored), every step logged once."""
    kw = {"n_grpo_steps": 4, "save_every": 1, "loss_type": "grpo_clip", "epochs_per_rollout_batch": 2}
    full = copy.deepcopy(tiny_model)
    _adam_loop(full, gpt2_tokenizer, _settings(tmp_path / "full", **kw)).train()
    # the interrupted run: 2 steps, then a torn save of step 3 and a metrics line of step 3 (killed)
    run = tmp_path / "run"
    part = copy.deepcopy(tiny_model)
    _adam_loop(part, gpt2_tokenizer, _settings(run, **{**kw, "n_grpo_steps": 2})).train()
    torn = run / "checkpoints" / ".step-3.tmp"
    torn.mkdir()
    (torn / "trainable.pt").write_bytes(b"torn")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0}\n{"step": 3, "lo')
    torch.manual_seed(123)  # a different global RNG state: the checkpoint's must be restored
    resumed = copy.deepcopy(tiny_model)
    loop = _adam_loop(resumed, gpt2_tokenizer, _settings(run, **{**kw, "resume": True}))
    loop.train()
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=0)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")) == [
        f"step-{i}" for i in range(1, 5)]


def test_resume_refuses_changed_settings_and_fresh_runs_keep_old_checkpoints_aside(tiny_model, gpt2_tokenizer,
                                                                                  tmp_path):
    _adam_loop(copy.deepcopy(tiny_model), gpt2_tokenizer, _settings(tmp_path, save_every=1)).train()
    with pytest.raises(ValueError, match=r"settings changed since this checkpoint \(cliprange: 0.2 -> 0.3\)"):
        _adam_loop(copy.deepcopy(tiny_model), gpt2_tokenizer,
                   _settings(tmp_path, resume=True, cliprange=0.3)).train()
    # n_grpo_steps may grow: the run continues from step 1 to 2
    more = _adam_loop(copy.deepcopy(tiny_model), gpt2_tokenizer, _settings(tmp_path, resume=True, n_grpo_steps=2))
    more.train()
    assert more.step == 2
    fresh = _adam_loop(copy.deepcopy(tiny_model), gpt2_tokenizer, _settings(tmp_path))
    fresh.train()
    assert (tmp_path / "checkpoints.prev" / "step-2" / "state.json").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]


def test_sampled_validation_reports_pass_at_k_equal_to_math_comb(tiny_model, gpt2_tokenizer):
    n, counts = 5, [0, 1, 3, 5]  # val prompt i: its first counts[i] of n samples have answer_reward 1
    prompts = [f"User: question {i}\nAssistant:" for i in range(len(counts))]
    script = {p: [(f"right {j}" if j < c else f"wrong {j}", "stop") for j in range(n)] for p, c in zip(prompts, counts)}

    def reward(response, truth):  # the reward itself also pays a format bonus: pass@k must read answer_reward
        answer = 1.0 if response.startswith("right") else 0.0
        return {"reward": answer + 0.5, "format_reward": 1.0, "answer_reward": answer}

    model = copy.deepcopy(tiny_model)
    loop = GRPOLoop(model, gpt2_tokenizer, ScriptedGenerator(gpt2_tokenizer, script), reward, PROMPTS, ANSWERS,
                    torch.optim.SGD(model.parameters(), lr=1e-2), _settings(val_samples=n, append_stop=False),
                    val_prompts=prompts, val_answers=["x"] * len(prompts))
    metrics = loop.evaluate()
    ks = sorted(int(key.split("@")[1]) for key in metrics if key.startswith("val_sampled_pass@"))
    assert ks == [1, 2, 4, 5]
    for k in ks:
        expected = sum(1 - math.comb(n - c, k) / math.comb(n, k) for c in counts) / len(counts)
        assert metrics[f"val_sampled_pass@{k}"] == pytest.approx(expected, abs=1e-12)
    assert metrics["val_sampled_answer_reward"] == pytest.approx(sum(counts) / (n * len(counts)))
