"""SFT trainer: loss masking against hand-built ids, packing vs unpacked forward, memorisation,
LoRA + packing end to end, and a SIGTERM-interrupted run that resumes bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cada_jax.checkpoints.hf import load_params
from cada_jax.config import load_config
from cada_jax.models.decoder import forward_jit
from cada_jax.training.sft import (
    SFTDataError,
    collate,
    encode_records,
    pack_examples,
    read_records,
    segment_forward,
    sft_loss,
    train_sft,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = SPECIAL + ["user", "assistant", "system"] + [f"w{i}" for i in range(40)]
ID = {w: i for i, w in enumerate(WORDS)}  # w_i has id 7 + i
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_chat_model(root, seed=0):
    """A word-level tokenizer with a ChatML template, and a tiny random Llama exported next to it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from cada_jax.checkpoints.hf import export_hf
    from cada_jax.models.config import config_from_hf
    from cada_jax.models.decoder import param_shapes

    tok = Tokenizer(models.WordLevel(dict(ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    tokdir = os.path.join(root, "tok")
    os.makedirs(tokdir, exist_ok=True)
    tok.save(os.path.join(tokdir, "tokenizer.json"))
    with open(os.path.join(tokdir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<pad>",
                   "unk_token": "<unk>", "chat_template": TEMPLATE}, f)
    hf = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=True, rope_theta=10000.0, eos_token_id=3, pad_token_id=0)
    cfg = config_from_hf(hf)
    # numpy draws instead of init_params: no random-number programs to compile
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: np.ones(s.shape, np.float32) if getattr(path[-1], "key", "") == "scale"
        else (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
        param_shapes(cfg))
    return export_hf(params, cfg, os.path.join(root, "model"), tokenizer_dir=tokdir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_chat_model(str(tmp_path_factory.mktemp("sft_model")))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from cada_jax.tokenizer import Tokenizer

    return Tokenizer(model_dir)


def random_records(n, seed=0, prompt_words=4, completion_words=5):
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(40)}" for _ in range(k))  # noqa: E731
    return [{"prompt": words(prompt_words), "completion": words(completion_words)} for _ in range(n)]


def w(*nums):
    return [7 + i for i in nums]


# ----------------------------------------------------------------------------- masking


def test_prompt_tokens_carry_no_loss(tokenizer):
    recs = [
        {"prompt": "w1 w2", "completion": "w3 w4"},
        {"prompt_messages": [{"role": "system", "content": "w0"}, {"role": "user", "content": "w5"}], "completion": "w6"},
    ]
    (a, b), dropped = encode_records(recs, tokenizer, max_len=64)
    assert dropped == 0
    S, E, U, A, SYS = ID["<|im_start|>"], ID["<|im_end|>"], ID["user"], ID["assistant"], ID["system"]
    # <|im_start|>user w1 w2<|im_end|> <|im_start|>assistant | w3 w4<|im_end|>   (the "\n" after it is cut)
    assert a.ids.tolist() == [S, U, *w(1, 2), E, S, A, *w(3, 4), E] and a.n_prompt == 7
    assert b.ids.tolist() == [S, SYS, *w(0), E, S, U, *w(5), E, S, A, *w(6), E] and b.n_prompt == 10
    batch = collate([a, b], [[0], [1]], 16)
    # weights sit on the positions whose *target* is a completion token or the end of turn
    assert batch["weights_BT"][0].tolist() == [0] * 6 + [1, 1, 1] + [0] * 7
    assert batch["weights_BT"][1].tolist() == [0] * 9 + [1, 1] + [0] * 5
    assert batch["targets_BT"][0, 6:9].tolist() == [*w(3, 4), E]
    assert batch["tokens_BT"][0, :9].tolist() == a.ids[:-1].tolist()
    assert batch["segment_ids_BT"][0].tolist() == [1] * 9 + [0] * 7


class _NoEosTemplate:
    """A tokenizer whose template ends the assistant turn without any end-of-turn token."""

    model_dir = "stub"
    eos_ids = frozenset({ID["<|im_end|>"]})

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = " ".join(f"{m['role']} {m['content']}" for m in messages)
        return text + (" assistant" if add_generation_prompt else "")

    def encode_batch(self, texts):
        return [[ID[t] for t in s.split()] for s in texts]


def test_missing_end_of_turn_is_appended():
    (ex,), _ = encode_records([{"prompt": "w1", "completion": "w2 w3"}], _NoEosTemplate(), max_len=16)
    assert ex.ids.tolist() == [ID["user"], *w(1), ID["assistant"], *w(2, 3), ID["<|im_end|>"]] and ex.n_prompt == 3


def test_bad_records_are_named(tokenizer, tmp_path):
    ok = {"prompt": "w1", "completion": "w2"}
    with pytest.raises(SFTDataError, match=r"records record 1: field 'completion' must be a non-empty string"):
        encode_records([ok, {"prompt": "w1"}], tokenizer)
    with pytest.raises(SFTDataError, match=r"record 0: missing field 'prompt_messages' \(or 'prompt'\)"):
        encode_records([{"question": "w1", "completion": "w2"}], tokenizer)
    with pytest.raises(SFTDataError, match=r"prompt_messages\[0\] must be an object with string 'role' and 'content'"):
        encode_records([{"prompt_messages": [{"role": "user"}], "completion": "w2"}], tokenizer)
    long = {"prompt": " ".join(["w1"] * 20), "completion": "w2"}
    with pytest.raises(SFTDataError, match=r"d.jsonl record 1: 27 tokens exceed sft.max_len=16; raise sft.max_len or set sft.drop_long=true"):
        encode_records([ok, long], tokenizer, max_len=16, source="d.jsonl")
    kept, dropped = encode_records([ok, long], tokenizer, max_len=16, drop_long=True)
    assert len(kept) == 1 and dropped == 1
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ok) + "\n{oops\n")
    with pytest.raises(SFTDataError, match=rf"{p}:2: invalid JSON"):
        read_records(str(p))


# ----------------------------------------------------------------------------- packing


def test_packed_rows_equal_examples_run_alone(model_dir, tokenizer):
    params, cfg = load_params(model_dir)
    recs = random_records(5, seed=3, prompt_words=3, completion_words=2) + random_records(2, seed=4, prompt_words=6, completion_words=7)
    examples, _ = encode_records(recs, tokenizer, max_len=32)
    rows = pack_examples(examples, 32, seed=0)
    assert sorted(sum(rows, [])) == list(range(len(examples)))  # every example exactly once
    assert all(sum(len(examples[i].ids) - 1 for i in r) <= 32 for r in rows)
    assert len(rows) < len(examples) and max(len(r) for r in rows) >= 2
    assert pack_examples(examples, 32, seed=0) == rows  # deterministic

    packed = collate(examples, rows, 32)
    logits = np.asarray(jax.jit(segment_forward, static_argnames="cfg")(
        params, packed["tokens_BT"], packed["positions_BT"], packed["segment_ids_BT"], cfg=cfg))
    # independent reference: each example alone through the standard padded forward
    T = 32
    nll, count = 0.0, 0
    for b, row in enumerate(rows):
        t = 0
        for idx in row:
            ex = examples[idx]
            n = len(ex.ids) - 1
            tokens = np.zeros((1, T), np.int32)
            tokens[0, :n] = ex.ids[:-1]
            mask = np.zeros((1, T), np.int32)
            mask[0, :n] = 1
            alone = np.asarray(forward_jit(params, tokens, np.arange(T)[None].astype(np.int32), mask, cfg=cfg)[0])[0, :n]
            assert np.abs(logits[b, t:t + n] - alone).max() < 1e-5
            logp = alone - np.log(np.exp(alone - alone.max(-1, keepdims=True)).sum(-1, keepdims=True)) - alone.max(-1, keepdims=True)
            for j in range(ex.n_prompt - 1, n):  # targets ids[j + 1] from the first completion token on
                nll -= logp[j, ex.ids[j + 1]]
                count += 1
            t += n
    loss, aux = jax.jit(sft_loss, static_argnames="cfg")(params, packed, cfg=cfg)
    assert float(aux["tokens"]) == count == sum(len(e.ids) - e.n_prompt for e in examples)
    assert abs(float(loss) - nll / count) < 1e-5


# ----------------------------------------------------------------------------- training


def base_overrides(model_dir, out_dir, name, steps, extra=()):
    return [f"model.path={model_dir}", f"run.out_dir={out_dir}", f"run.name={name}", "run.progress=false",
            "sft.batch_size=4", "sft.max_len=64", "sft.length_buckets=[16, 32, 64]", f"sft.steps={steps}",
            "optim.lr=1e-2", "optim.warmup_steps=2", "optim.schedule=constant",
            "checkpoint.every_steps=100", *extra]


def test_sft_memorises_a_tiny_dataset(model_dir, tmp_path):
    cfg = load_config(None, base_overrides(model_dir, tmp_path, "mem", 30))
    summary = train_sft(cfg, random_records(8, seed=0))
    # measured: loss 4.05 at step 1 -> 0.083 at step 30 (-98%; 8 examples, batch 4, AdamW lr 1e-2)
    assert summary["last_loss"] < 0.5 * summary["first_loss"], summary
    assert summary["steps"] == 30 and summary["skipped"] == 0 and not summary["preempted"]
    assert summary["padded_lengths"] == [16]  # 15-token examples: one bucket, one compiled program
    run_dir = summary["run_dir"]
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[-1]["accuracy"] > 0.8
    assert load_config(os.path.join(run_dir, "config.yaml")) == cfg
    # the exported HF dir loads
    params, mcfg = load_params(summary["export_dir"])
    assert mcfg.num_layers == 2 and params["embed"].shape == (64, 32)
    assert os.path.isfile(os.path.join(summary["export_dir"], "tokenizer.json"))
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["30"]


def test_lora_with_packing_trains_and_exports_merged(model_dir, tmp_path):
    from cada_jax.training.checkpointing import Checkpointer
    from cada_jax.training.lora import init_lora, merge_lora
    from cada_jax.training.optim import TrainState, make_optimizer

    cfg = load_config(None, base_overrides(model_dir, tmp_path, "lora", 8, [
        "lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.targets=[q_proj, v_proj, down_proj]",
        "sft.packing=true", "sft.max_len=32", "sft.length_buckets=[]", "optim.lr=2e-2"]))
    summary = train_sft(cfg, random_records(12, seed=1))
    assert summary["rows"] < summary["examples"] and summary["padded_lengths"] == [32]
    assert summary["last_loss"] < summary["first_loss"]
    base, mcfg = load_params(model_dir)
    template = TrainState.create(init_lora(base, mcfg, cfg.lora, jax.random.PRNGKey(0)), make_optimizer(cfg.optim, 8),
                                 jax.random.PRNGKey(0))
    with Checkpointer(os.path.join(summary["run_dir"], "checkpoints")) as ck:
        lora = ck.restore_latest(template).state.params
    merged = merge_lora(base, lora, cfg.lora)
    exported, _ = load_params(summary["export_dir"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, exported), jax.tree.map(np.asarray, merged))
    assert not np.array_equal(np.asarray(exported["layers"]["attn"]["q_proj"]), np.asarray(base["layers"]["attn"]["q_proj"]))
    np.testing.assert_array_equal(np.asarray(exported["layers"]["attn"]["k_proj"]), np.asarray(base["layers"]["attn"]["k_proj"]))


SUBPROCESS = "import json, sys; from cada_jax.config import load_config; from cada_jax.training.sft import train_sft; " \
             "from tests.trainer_worker import pause_after; " \
             "print('SUMMARY ' + json.dumps(train_sft(load_config(sys.argv[1]), hooks=[pause_after(3)])))"


def test_sigterm_then_resume_is_bit_identical(model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in random_records(10, seed=2)))
    extra = [f"sft.data={data}", "checkpoint.async_save=true"]
    straight = train_sft(load_config(None, base_overrides(model_dir, tmp_path, "straight", 6, extra)))
    assert straight["steps"] == 6

    from cada_jax.config import dump_yaml

    cfg_b = load_config(None, base_overrides(model_dir, tmp_path, "resumed", 6, extra))
    yaml_b = dump_yaml(cfg_b, str(tmp_path / "resumed.yaml"))
    run_b = os.path.join(str(tmp_path), "resumed")
    marker = os.path.join(run_b, ".paused_at_step_3")
    proc = subprocess.Popen([sys.executable, "-c", SUBPROCESS, yaml_b], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(marker):  # the trainer is parked at the boundary after step 3
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "trainer never reached step 3"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    first = json.loads(out.split("SUMMARY ", 1)[1])
    assert first["preempted"] and first["steps"] == 3 and first["export_dir"] is None
    assert sorted(os.listdir(os.path.join(run_b, "checkpoints"))) == ["3"]

    resumed = train_sft(cfg_b)
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 6 and not resumed["preempted"]

    a, _ = load_params(straight["export_dir"])
    b, _ = load_params(resumed["export_dir"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))
    lines_a = open(os.path.join(straight["run_dir"], "metrics.jsonl")).read().splitlines()
    lines_b = open(os.path.join(run_b, "metrics.jsonl")).read().splitlines()
    assert len(lines_a) == 6 and lines_a == lines_b
