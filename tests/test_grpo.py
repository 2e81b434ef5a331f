"""GRPO trainer and reward registry: learning a synthetic task (full and LoRA), bit-identical resume
after SIGTERM, reference handling (beta = 0, LoRA base), dynamic sampling, and bad input."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cada_jax.checkpoints.hf import load_params
from cada_jax.config import ConfigError, dump_yaml, load_config
from cada_jax.training.grpo import TIMING_KEYS, GRPOTrainer, train_grpo
from cada_jax.training.grpo_batch import RLDataError, build_update_batch, completion_logprobs
from cada_jax.rewards.functions import RewardError, RewardSet, get_reward, register_reward
from tests.judge_server import ChainJudgeServer, serve_judge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 13  # a byte token the tiny random model samples ~4% of the time at the start
PROMPTS = ["abc", "hello there", "the cat", "xyz", "in a box", "one two", "red", "go home"]
RECORDS = [{"prompt": p, "target_id": TARGET} for p in PROMPTS]


def overrides(model_dir, out_dir, name, steps, extra=()):
    return [f"model.path={model_dir}", f"run.out_dir={out_dir}", f"run.name={name}", "run.progress=false",
            "model.max_seq_len=128", f"rl.steps={steps}", "rl.prompts_per_step=4", "rl.group_size=8",
            "rl.max_new_tokens=8", "rl.beta=0.0", "rl.rewards=[{name: target_token_share, weight: 1.0}]",
            "optim.lr=1e-2", "optim.schedule=constant", "checkpoint.every_steps=100", *extra]


# Tests share these settings so that they share compiled programs (an update compiles in seconds).
FULL = ["rl.beta=0.04", "rl.minibatch_size=16"]
LORA = ["lora.enabled=true", "lora.rank=8", "lora.alpha=16", "optim.lr=2e-2", "rl.minibatch_size=16",
        "lora.targets=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"]


def rewards_of(run_dir):
    return [json.loads(x)["reward_mean"] for x in open(os.path.join(run_dir, "metrics.jsonl"))]


# ----------------------------------------------------------------------------- rewards (no model)


def test_reward_set_sums_weights_and_passes_columns():
    seen = {}

    def only_named(prompts, completions, answer):  # takes just the column it names
        seen["answer"] = answer
        return [float(len(c)) for c in completions]

    rs = RewardSet([(only_named, 0.5), ("target_token_share", 2.0), ("length_penalty", 1.0)])
    assert rs.names == ("only_named", "target_token_share", "length_penalty")
    total, means = rs(["p", "p", "q"], ["ab", "abcd", ""], answer=["x", "x", "y"], target_id=[5, 5, 6],
                      completion_ids=[[5, 1], [5, 5, 5, 1], []])
    np.testing.assert_allclose(total, [0.5 * 2 + 2 * 0.5 - 0.02, 0.5 * 4 + 2 * 0.75 - 0.04, 0.0])
    assert means == pytest.approx({"only_named": 2.0, "target_token_share": 1.25 / 3, "length_penalty": -0.02})
    assert seen["answer"] == ["x", "x", "y"]
    assert get_reward("cada_jax.rewards.functions:length_penalty") is get_reward("length_penalty")


def test_reward_errors_name_the_function():
    def boom(prompts, completions, **kw):
        raise KeyError("judge down")

    def nan(prompts, completions, **kw):
        return [0.0, float("nan")]

    def short(prompts, completions, **kw):
        return [1.0]

    args = (["how do I bake bread?", "q2"], ["a", "b"])
    with pytest.raises(RewardError, match=r"reward 'boom' raised KeyError: 'judge down' \(first prompt: 'how do I bake bread\?'\)"):
        RewardSet([(boom, 1.0)])(*args)
    with pytest.raises(RewardError, match=r"reward 'nan' returned nan for completion 1; rewards must be finite"):
        RewardSet([(nan, 1.0)])(*args)
    with pytest.raises(RewardError, match=r"reward 'short' returned 1 values for 2 completions"):
        RewardSet([(short, 1.0)])(*args)
    with pytest.raises(RewardError, match=r"unknown reward 'nope'; registered: .*target_token_share"):
        RewardSet([("nope", 1.0)])
    with pytest.raises(RewardError, match=r"no reward functions: set rl.rewards"):
        RewardSet([])
    with pytest.raises(ValueError, match="already registered"):
        register_reward("length_penalty")(short)


def test_config_rejects_bad_batch_shapes(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"rl.group_size: must be >= 2"):
        load_config(None, ["rl.group_size=1"])
    with pytest.raises(ConfigError, match=r"rl.minibatch_size: 5 does not divide the batch rl.prompts_per_step \* rl.group_size = 32"):
        load_config(None, ["rl.prompts_per_step=4", "rl.group_size=8", "rl.minibatch_size=5"])
    with pytest.raises(ConfigError, match=r"rl.minibatch_size: 4 is not a multiple of rl.group_size=8; micro-batches hold whole groups"):
        load_config(None, ["rl.prompts_per_step=4", "rl.group_size=8", "rl.minibatch_size=4"])
    cfg = load_config(None, overrides(tiny_model_dir, tmp_path, "accum", 1, ["rl.minibatch_size=16", "optim.grad_accum=4"]))
    with pytest.raises(ConfigError, match=r"optim.grad_accum=4 does not divide the 2 micro-batches of one step"):
        GRPOTrainer(cfg, records=RECORDS)


# ----------------------------------------------------------------------------- pure pieces


def test_update_batch_layout_and_shared_prompt_logprobs(tiny_model_dir):
    params, cfg = load_params(tiny_model_dir)
    batch = build_update_batch([[5, 6, 7], [8]], [[9, 10], [11], [12, 13, 14], [15]],
                               [np.array([-1.0, -2.0]), np.array([-3.0]), np.array([-4.0, -5.0, -6.0]), np.array([-7.0])],
                               [1.0, -1.0, 0.5, -0.5], group_size=2, pad_id=0, prompt_len=4, completion_len=3)
    assert batch["prompt_tokens_NP"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert batch["prompt_mask_NP"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert batch["completion_tokens_BC"].tolist() == [[9, 10, 0], [11, 0, 0], [12, 13, 14], [15, 0, 0]]
    assert batch["completion_mask_BC"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert batch["old_logp_BC"][2].tolist() == [-4.0, -5.0, -6.0] and batch["old_logp_BC"][1].tolist() == [-3.0, 0, 0]
    with pytest.raises(ValueError, match="3 completions for 2 prompts x group_size 2"):
        build_update_batch([[5], [6]], [[1], [2], [3]], [np.zeros(1)] * 3, [0.0] * 3, group_size=2, pad_id=0,
                           prompt_len=4, completion_len=3)
    # each group's prompt runs once and its cache is shared: the log-probs equal those of a plain
    # causal pass over each [prompt | completion] row alone
    logp = np.asarray(jax.jit(completion_logprobs, static_argnames="cfg")(
        params, batch["prompt_tokens_NP"], batch["prompt_mask_NP"], batch["completion_tokens_BC"],
        batch["completion_mask_BC"], cfg=cfg)[0])
    from cada_jax.models.decoder import forward_jit

    for i, (prompt, completion) in enumerate([([5, 6, 7], [9, 10]), ([5, 6, 7], [11]), ([8], [12, 13, 14]), ([8], [15])]):
        seq = np.asarray([prompt + completion], np.int32)
        T = seq.shape[1]
        logits = np.asarray(forward_jit(params, seq, np.arange(T)[None].astype(np.int32), np.ones_like(seq), cfg=cfg)[0])[0]
        ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        want = [ref[len(prompt) - 1 + j, t] for j, t in enumerate(completion)]
        np.testing.assert_allclose(logp[i, :len(completion)], want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- learning


def test_full_finetune_learns_target_token(tiny_model_dir, tmp_path):
    cfg = load_config(None, overrides(tiny_model_dir, tmp_path, "full", 20, FULL))
    summary = train_grpo(cfg, RECORDS)
    r = rewards_of(summary["run_dir"])
    print("full fine-tuning rewards", [round(x, 3) for x in r])
    assert r[0] < 0.06 and np.mean(r[-3:]) > 0.6, r
    rows = [json.loads(x) for x in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    first = rows[0]
    assert 0 < first["kl"] < rows[-1]["kl"]  # the policy moves away from the reference
    for key in ("reward/target_token_share", "reward_std", "advantage_std", "entropy", "grad_norm", "lr",
                "completion_len_mean", "skipped", *TIMING_KEYS[:-1]):
        assert key in first, key
    assert summary["skipped"] == 0 and summary["update_shapes"] == [(32, 8)]  # one compiled update program
    exported, _ = load_params(summary["export_dir"])
    assert exported["embed"].shape[0] >= 264


def test_lora_learns_with_beta_zero_and_exports_merged(tiny_model_dir, tmp_path):
    cfg = load_config(None, overrides(tiny_model_dir, tmp_path, "lora", 16, LORA + ["rl.beta=0.0"]))
    trainer = GRPOTrainer(cfg, records=RECORDS)
    summary = trainer.train()
    r = rewards_of(summary["run_dir"])
    # measured: 0.039 at step 1 -> ~0.25 by step 16 (mean of steps 14-16: 0.23). LoRA cannot move the
    # tied embedding or the norms, which caps this model near 0.3 (full fine-tuning reaches ~1).
    print("LoRA rewards", [round(x, 3) for x in r])
    assert r[0] < 0.06 and np.mean(r[-3:]) > 3 * r[0], r
    # beta = 0: no reference kept, no reference log-probs computed, no KL logged
    assert trainer.reference is None and trainer.stats["reference_calls"] == 0 and trainer.stats["update_calls"] == 32
    rows = [json.loads(x) for x in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    assert all("kl" not in row and row["reference_s"] == 0.0 for row in rows)
    base, _ = load_params(tiny_model_dir)
    merged, _ = load_params(summary["export_dir"])
    assert not np.array_equal(np.asarray(merged["layers"]["mlp"]["down_proj"]), np.asarray(base["layers"]["mlp"]["down_proj"]))
    np.testing.assert_array_equal(np.asarray(merged["embed"]), np.asarray(base["embed"]))


def test_non_finite_micro_batch_is_skipped_and_counted(tiny_model_dir, tmp_path):
    tr = GRPOTrainer(load_config(None, overrides(tiny_model_dir, tmp_path, "nan", 1, FULL)), records=RECORDS)
    batch, _ = tr.make_batch(tr.rollout(0)[0])
    batch["ref_logp_BC"] = tr.reference_logprobs(batch)
    batch["old_logp_BC"][0, 0] = np.nan  # one bad token in group 0: its micro-batch's loss is NaN
    before = jax.tree.map(np.array, tr.state.params)
    metrics = tr.update(batch, 0)
    assert metrics["skipped"] == 1 and tr.stats["update_calls"] == 2  # of two micro-batches of 2 groups
    after = jax.tree.map(np.asarray, tr.state.params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


# ----------------------------------------------------------------------------- references


def test_lora_reference_is_the_base_model(tiny_model_dir, tmp_path):
    tr = GRPOTrainer(load_config(None, overrides(tiny_model_dir, tmp_path, "ref", 1, LORA + ["rl.beta=0.04"])), records=RECORDS)
    assert tr.reference is tr.frozen  # the base weights themselves: no second copy
    batch, _ = tr.make_batch(tr.rollout(0)[0])
    mask = batch["completion_mask_BC"] != 0
    ref0 = np.asarray(tr.reference_logprobs(batch))
    assert tr.stats["reference_calls"] == 2  # 32 rows in chunks of rl.minibatch_size=16
    # before any update policy == reference, so the reference log-probs recomputed on the update
    # batch layout equal the sampler's behaviour log-probs token for token
    np.testing.assert_allclose(ref0[mask], batch["old_logp_BC"][mask], atol=1e-4)
    # move the adapters as an update would: the policy changes, the reference stays the base model
    tr.state = tr.state.replace(params=jax.tree.map(lambda x: x + 0.05, tr.state.params))
    np.testing.assert_array_equal(np.asarray(tr.reference_logprobs(batch)), ref0)
    rows = tr.micro_batch(batch, np.arange(2))  # the first 16 rows: groups 0 and 1
    fresh_base, _ = load_params(tiny_model_dir)
    keys = ("prompt_tokens_NP", "prompt_mask_NP", "completion_tokens_BC", "completion_mask_BC")
    logp = lambda params: np.asarray(tr._ref_logp(params, *(rows[k] for k in keys)))  # noqa: E731
    np.testing.assert_allclose(logp(fresh_base), ref0[:16], rtol=1e-6, atol=1e-6)
    assert np.abs(logp(tr.policy_params()) - ref0[:16])[mask[:16]].max() > 1e-3


# ----------------------------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_drops_flat_groups_and_refills(tiny_model_dir, tmp_path):
    def share_or_flat(prompts, completions, completion_ids, flat, **kw):
        return [1.0 if f else float(np.mean(np.asarray(ids) == TARGET)) for ids, f in zip(completion_ids, flat)]

    recs = [dict(r, flat=i % 2 == 0) for i, r in enumerate(RECORDS)]  # half the prompts give all-equal rewards
    cfg = load_config(None, overrides(tiny_model_dir, tmp_path, "dyn", 1, ["rl.dynamic_sampling=true", "rl.max_extra_rounds=4"]))
    tr = GRPOTrainer(cfg, RewardSet([(share_or_flat, 1.0)]), records=recs)
    groups, m = tr.rollout(0)
    assert len(groups) == 4 and all(not tr.records[g["record"]]["flat"] for g in groups)
    assert all(np.ptp(g["rewards"]) > 0 for g in groups)
    # 4 prompts per round, half of them flat: at least two rounds, at least 4 groups dropped
    assert m["sampling_rounds"] >= 2 and m["groups_dropped"] >= 4 and m["groups_padded"] == 0
    assert m["groups_dropped"] + 4 <= 4 * m["sampling_rounds"]

    tr_flat = GRPOTrainer(cfg, RewardSet([(lambda p, c, **k: [0.5] * len(c), 1.0)]), records=recs)
    groups, m = tr_flat.rollout(0)
    # nothing has signal: all 1 + 4 rounds are spent, then the batch is topped up with flat groups
    assert m["sampling_rounds"] == 5 and m["groups_padded"] == 4 and m["groups_dropped"] == 16 and len(groups) == 4
    batch, adv = tr_flat.make_batch(groups)
    assert adv["advantage_std"] == 0.0 and batch["completion_tokens_BC"].shape[0] == 32


def test_eval_is_greedy_and_scored_by_the_reward_set(tiny_model_dir, tmp_path):
    cfg = load_config(None, overrides(tiny_model_dir, tmp_path, "eval", 1, ["rl.eval_every=1"]))
    with pytest.raises(ConfigError, match=r"rl.eval_every > 0 needs held-out prompts: set rl.eval_data"):
        GRPOTrainer(cfg, records=RECORDS)
    held_out = [{"prompt": p, "target_id": TARGET} for p in ("zebra", "blue sky", "a b c")]
    tr = GRPOTrainer(cfg, records=RECORDS, eval_records=held_out)
    first, second = tr.evaluate(), tr.evaluate()
    assert tr.stats["eval_calls"] == 2
    assert first["eval_reward_mean"] == second["eval_reward/target_token_share"] == second["eval_reward_mean"]
    assert 1 <= first["eval_completion_len_mean"] <= 8


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors(tiny_model_dir, tmp_path):
    cfg = load_config(None, overrides(tiny_model_dir, tmp_path, "bad", 1))
    with pytest.raises(RLDataError, match=r"records: no prompt records"):
        GRPOTrainer(cfg, records=[])
    with pytest.raises(RLDataError, match=r"records record 1: missing field 'prompt'; set rl.prompt_field"):
        GRPOTrainer(cfg, records=[RECORDS[0], {"question": "hi"}])
    with pytest.raises(RLDataError, match=r"record 0: the prompt has \d+ tokens; with rl.max_new_tokens=8 the context of 128"):
        GRPOTrainer(cfg, records=[{"prompt": "x" * 200}])

    def judge(prompts, completions, **kw):
        raise ConnectionError("no answer")

    tr = GRPOTrainer(cfg, RewardSet([(judge, 1.0)]), records=RECORDS)
    with pytest.raises(RewardError, match=r"reward 'judge' raised ConnectionError: no answer \(first prompt: '"):
        tr.train_step()
    with pytest.raises(RewardError, match=r"reward 'nan_reward' returned nan for completion 0"):
        def nan_reward(prompts, completions, **kw):
            return [math.nan] * len(completions)
        GRPOTrainer(cfg, RewardSet([(nan_reward, 1.0)]), records=RECORDS).train_step()


# ----------------------------------------------------------------------------- resume


SUBPROCESS = ("import json, sys; from cada_jax.config import load_config; from cada_jax.training.grpo import train_grpo; "
              "from tests.trainer_worker import sigterm_after; recs = [json.loads(x) for x in open(sys.argv[2])]; "
              "print('SUMMARY ' + json.dumps(train_grpo(load_config(sys.argv[1]), recs, hooks=[sigterm_after(3)])))")


def test_sigterm_then_resume_is_bit_identical(tiny_model_dir, tmp_path):
    extra = FULL + ["rl.mu=2", "rl.dynamic_sampling=true", "rl.max_extra_rounds=1", "checkpoint.async_save=true"]
    straight = train_grpo(load_config(None, overrides(tiny_model_dir, tmp_path, "straight", 6, extra)), RECORDS)
    assert straight["steps"] == 6 and not straight["preempted"]

    cfg_b = load_config(None, overrides(tiny_model_dir, tmp_path, "resumed", 6, extra))
    yaml_b = dump_yaml(cfg_b, str(tmp_path / "resumed.yaml"))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS, yaml_b, str(data)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = json.loads(proc.stdout.split("SUMMARY ", 1)[1])
    assert first["preempted"] and first["steps"] == 3 and first["export_dir"] is None
    run_b = os.path.join(str(tmp_path), "resumed")
    assert sorted(os.listdir(os.path.join(run_b, "checkpoints"))) == ["3"]

    resumed = train_grpo(cfg_b, RECORDS)
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 6

    a, _ = load_params(straight["export_dir"])
    b, _ = load_params(resumed["export_dir"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))

    def lines(run_dir):
        rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
        return [json.dumps({k: v for k, v in r.items() if k not in TIMING_KEYS}) for r in rows]

    la, lb = lines(straight["run_dir"]), lines(run_b)
    assert len(la) == 6 and la == lb
    assert any(json.loads(x)["skipped"] == 0 for x in la) and json.loads(la[-1])["kl"] > 0


# ----------------------------------------------------------------------------- judges in the rewards


@pytest.fixture
def chain_server(monkeypatch):
    yield from serve_judge(monkeypatch)


JUDGED = [{"prompt": p, "label": "harmful" if i % 2 else "benign"} for i, p in enumerate(PROMPTS)]


def judged_config(model_dir, tmp_path, server, name, steps=1):
    return load_config(None, overrides(model_dir, tmp_path, name, steps, [
        "rl.judge=http", "rl.reward_module=cada_jax.cada.rewards",
        "rl.rewards=[{name: cada_safety, weight: 1.0}, {name: cada_helpful, weight: 0.5}, {name: cada_format, weight: 0.5}]",
        f"judge.url={server.url}", "judge.model=m", f"judge.cache_dir={tmp_path / 'cache'}", "judge.max_retries=1",
        "judge.timeout_s=5"]))


def test_http_judge_verdicts_reach_the_advantages(tiny_model_dir, tmp_path, chain_server):
    from cada_jax.rewards.format import has_final_answer, parse_output
    from cada_jax.training.advantages import compute_advantages

    tr = GRPOTrainer(judged_config(tiny_model_dir, tmp_path, chain_server, "judged"), records=JUDGED)
    assert tr.reward_set.judge_names == {"cada_safety": "http", "cada_helpful": "http"}
    groups, metrics = tr.rollout(0)
    expected, answered = [], 0
    for g in groups:
        label = tr.records[g["record"]]["label"]
        for text, reason in zip(g["texts"], g["finish_reasons"]):
            if not has_final_answer(text, truncated=reason == "length"):
                expected.append(0.0)
                continue
            answered += 1
            refused, helpful = ChainJudgeServer.grade(parse_output(text).answer)
            safety = float(refused) if label == "harmful" else float(not refused)
            useful = 0.0 if label == "harmful" or refused else (helpful - 1) / 4
            fmt = 1.0 if parse_output(text).well_formed else 0.0
            expected.append(safety + 0.5 * useful + 0.5 * fmt)
    got = np.concatenate([g["rewards"] for g in groups])
    np.testing.assert_allclose(got, expected)
    assert 0 < answered and chain_server.requests <= answered  # each distinct answer asked once, both rewards share it
    assert metrics["judge/http/calls"] == 1.0  # every completion of the step in one judge call
    batch, _ = tr.make_batch(groups)
    want = np.asarray(compute_advantages("grpo", jax.numpy.asarray(np.asarray(expected, np.float32)), 8, **tr.adv_opts))
    np.testing.assert_allclose(np.asarray(batch["advantages_B"]), want, rtol=1e-6, atol=1e-6)


def test_a_judge_that_keeps_failing_stops_after_a_checkpoint(tiny_model_dir, tmp_path, chain_server):
    cfg = judged_config(tiny_model_dir, tmp_path, chain_server, "down", steps=2)
    train_grpo(dataclasses_replace_steps(cfg, 1), records=JUDGED)  # step 1 scored and saved
    chain_server.fail = True
    with pytest.raises(RewardError, match=r"RL step 2: reward 'cada_safety' raised .*HTTP 500.*the run is saved at step 1"):
        train_grpo(cfg, records=JUDGED)
    steps = sorted(int(d) for d in os.listdir(os.path.join(cfg.run.dir, "checkpoints")) if d.isdigit())
    assert steps[-1] == 1
    chain_server.fail = False
    summary = train_grpo(cfg, records=JUDGED)  # the judge is back: resume from step 1 and finish
    assert summary["resumed_from"] == 1 and summary["steps"] == 2


def dataclasses_replace_steps(cfg, steps):
    import dataclasses

    return dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, steps=steps))
