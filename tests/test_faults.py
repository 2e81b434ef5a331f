"""Fault injection: damaged checkpoints, non-finite states and configs, diverged runs.

Each test breaks one thing the way a crash, a full disk or a careless user would, and checks that
the run either recovers what it can or stops with a one-line error, and never loses healthy work."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cada_jax.config import ConfigError, load_config
from cada_jax.training.checkpointing import Checkpointer, NonFiniteState, SkipStreak
from tests.test_checkpointing import as_np, fresh_state, trained_state


def _files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def _two_checkpoints(directory):
    s1, s2 = trained_state(1), trained_state(2)
    with Checkpointer(directory, every_steps=1, keep=3, async_save=False) as ck:
        ck.save(1, s1)
        ck.save(2, s2)
    return s1, s2


def _flip(path, n=64):
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    d = str(tmp_path / "ck")
    s1, _ = _two_checkpoints(d)
    data_files = [f for f in _files(os.path.join(d, "2", "state")) if os.path.getsize(f) > 0]
    victim = max(data_files, key=os.path.getsize)
    if damage == "flip":
        _flip(victim)
    elif damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    else:
        for f in data_files:
            open(f, "wb").close()
    with Checkpointer(d, every_steps=1, keep=3) as ck:
        got = ck.restore_latest(fresh_state(seed=3))
        assert got is not None and got.step == 1
        jax.tree.map(np.testing.assert_array_equal, as_np(got.state.arrays()), as_np(s1.arrays()))
        assert ck.all_steps() == [1]
        # the next save at step 2 is written again (the damaged one is out of the rotation)
        assert ck.save(2, trained_state(2))
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"{d}/2 is damaged" in warning[0] and "ck.corrupt" in warning[0]
    assert os.path.isdir(str(tmp_path / "ck.corrupt" / "2"))


def test_non_finite_state_is_never_saved_and_healthy_checkpoints_stay(tmp_path):
    d = str(tmp_path / "ck")
    good = trained_state(1)
    bad = good.replace(params={**good.params, "w": good.params["w"].at[0, 0].set(jnp.nan)})
    with Checkpointer(d, every_steps=1, keep=1, async_save=False) as ck:
        ck.save(1, good)
        with pytest.raises(NonFiniteState, match="non-finite values.*params.w.*was not saved"):
            ck.save(2, bad)
        assert ck.all_steps() == [1]


def test_a_nan_written_behind_the_checkpointers_back_is_caught(tmp_path):
    d = str(tmp_path / "ck")
    _two_checkpoints(d)
    import orbax.checkpoint as ocp

    # rewrite step 2's state through orbax itself, with a NaN and no fingerprint update
    with Checkpointer(d, every_steps=1, keep=3) as ck:
        restored = ck.restore(2, fresh_state())
    arrays = restored.state.arrays()
    arrays["params"]["v"] = arrays["params"]["v"].at[0].set(jnp.nan)
    ocp.StandardCheckpointer().save(os.path.join(d, "2", "state"), arrays, force=True)
    ocp.StandardCheckpointer().wait_until_finished()
    with Checkpointer(d, every_steps=1, keep=3) as ck:
        assert ck.restore_latest(fresh_state()).step == 1


def test_a_run_of_skipped_updates_stops_with_a_clear_error():
    streak = SkipStreak(3)
    for step, skipped in enumerate([1, 1, 0, 1, 1], start=1):
        streak.update(step, skipped)
    with pytest.raises(NonFiniteState, match=r"3 updates in a row were skipped .*steps 4-6.*max_skipped_in_a_row"):
        streak.update(6, 1)
    never = SkipStreak(0)
    for step in range(100):
        never.update(step, 1)


@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.lr=nan", "rl.beta=-.inf", "rl.temperature=1e999"])
def test_non_finite_config_numbers_are_refused(override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: must be a finite number"):
        load_config(None, [override])


def test_a_preempted_run_exits_with_the_documented_code(tmp_path, monkeypatch, capsys):
    from cada_jax import cli
    from cada_jax.errors import EXIT_PREEMPTED
    from cada_jax.training import grpo, sft

    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: {out_dir: %s}\n" % tmp_path)
    monkeypatch.setattr(sft, "train_sft", lambda cfg: {"preempted": True, "steps": 3})
    monkeypatch.setattr(grpo, "train_grpo", lambda cfg: {"preempted": True, "steps": 2})
    assert cli.main(["sft", str(cfg)]) == EXIT_PREEMPTED == 75
    assert "preempted at step 3" in capsys.readouterr().out
    assert cli.main(["rl", str(cfg)]) == EXIT_PREEMPTED
    monkeypatch.setattr(sft, "train_sft", lambda cfg: {"preempted": False, "steps": 3})
    assert cli.main(["sft", str(cfg)]) == 0


def test_a_preempted_pipeline_stage_is_not_recorded_as_done(tmp_path, monkeypatch):
    import json

    from cada_jax.cada import pipeline
    from cada_jax.errors import Preempted
    from cada_jax.training import sft

    chains = tmp_path / "chains.jsonl"
    chains.write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    from cada_jax.checkpoints import gguf_import

    monkeypatch.setattr(gguf_import, "resolve_model", lambda path: path)
    monkeypatch.setattr(sft, "train_sft", lambda cfg: {"preempted": True, "steps": 4})
    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.name=p", "pipeline.stages=[sft]", f"sft.data={chains}",
                             f"model.path={tmp_path}"])
    with pytest.raises(Preempted, match="sft stage stopped by a signal at step 4.*rerun the same command"):
        pipeline.run_pipeline(cfg)
    state_file = tmp_path / "p" / "pipeline_state.json"
    assert not state_file.exists() or "sft" not in json.loads(state_file.read_text())["done"]


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_nan_weights_are_refused_at_load(tiny_model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    from cada_jax.checkpoints.hf import load_params
    from cada_jax.checkpoints.safetensors_io import CheckpointError

    d = _copy_model(tiny_model_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    name = next(n for n in sorted(tensors) if n.endswith("mlp.up_proj.weight"))
    tensors[name] = tensors[name].copy()
    tensors[name][0, :3] = [np.nan, np.inf, -np.inf]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{name}.*has 3 NaN or infinite values"):
        load_params(str(d))


@pytest.mark.parametrize("content", ["[1, 2]", '"llama"', "\xff\xfe{"])
def test_a_config_json_that_is_not_an_object_is_one_line(tiny_model_dir, tmp_path, content):
    from cada_jax.models.config import ConfigError as ModelConfigError
    from cada_jax.models.config import load_config as load_model_config

    d = _copy_model(tiny_model_dir, tmp_path / "m")
    (d / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ModelConfigError, match=r"config\.json: (expected a JSON object|invalid JSON|not UTF-8)"):
        load_model_config(str(d))


def test_non_utf8_input_files_name_their_line(tmp_path):
    from cada_jax.data.readers import DataFormatError, load_prompt_file
    from cada_jax.training.grpo_batch import RLDataError, read_prompt_records
    from cada_jax.training.sft import SFTDataError, read_records

    good = json.dumps({"prompt": "hi", "completion": "hello"}).encode() + b"\n"
    bad = b'{"prompt": "caf\xe9", "completion": "x"}\n'
    path = tmp_path / "data.jsonl"
    path.write_bytes(good + good + bad)
    with pytest.raises(SFTDataError, match=rf"{path}:3: not UTF-8 text .*0xe9"):
        read_records(str(path))
    with pytest.raises(RLDataError, match=rf"{path}:3: not UTF-8"):
        read_prompt_records(str(path))
    with pytest.raises(DataFormatError, match=r"data\.jsonl.*3.*not UTF-8"):
        list(load_prompt_file(str(path), label="harmful"))


def test_a_hostile_chat_template_is_a_one_line_error(tiny_model_dir, tmp_path):
    from cada_jax.tokenizer import Tokenizer, TokenizerError

    d = _copy_model(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name in ("chat_template.jinja",):
        if (d / name).exists():
            (d / name).unlink()
    with pytest.raises(TokenizerError, match=r"chat template cannot be rendered \(SecurityError"):
        Tokenizer(str(d)).apply_chat_template([{"role": "user", "content": "hi"}])
    cfg["chat_template"] = "{% for m in messages %}{{ m.content }"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match=r"chat template cannot be rendered \(TemplateSyntaxError"):
        Tokenizer(str(d)).apply_chat_template([{"role": "user", "content": "hi"}])


def test_resume_with_another_config_or_data_is_refused_and_nothing_is_touched(tmp_path):
    from cada_jax.training.checkpointing import CheckpointMismatch
    from cada_jax.training.sft import train_sft
    from tests.test_sft import base_overrides, make_chat_model, random_records

    model_dir = make_chat_model(str(tmp_path / "model"))
    first = train_sft(load_config(None, base_overrides(model_dir, tmp_path, "r", 2)), random_records(8))
    run = tmp_path / "r"
    kept = {p: (run / p).read_bytes() for p in ("config.yaml", "final/model.safetensors", "metrics.jsonl")}
    with pytest.raises(CheckpointMismatch, match=r"r: its checkpoints were written with another config "
                                                 r"\(optim\.lr 0\.01 -> 0\.02\).*another run\.name"):
        train_sft(load_config(None, base_overrides(model_dir, tmp_path, "r", 2, ["optim.lr=2e-2"])), random_records(8))
    with pytest.raises(CheckpointMismatch, match=r"sft\.data: the training records differ"):
        train_sft(load_config(None, base_overrides(model_dir, tmp_path, "r", 2)), random_records(8, seed=1))
    assert {p: (run / p).read_bytes() for p in kept} == kept
    # more steps extend the run from its checkpoint
    more = train_sft(load_config(None, base_overrides(model_dir, tmp_path, "r", 3)), random_records(8))
    assert first["steps"] == 2 and more["resumed_from"] == 2 and more["steps"] == 3


def test_a_second_run_in_a_locked_folder_is_refused(tmp_path):
    from cada_jax.cada.pipeline import run_pipeline
    from cada_jax.files import RunLocked, run_lock
    from cada_jax.training.sft import train_sft

    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.name=busy", "sft.data=x.jsonl"])
    with run_lock(tmp_path / "busy"):
        with pytest.raises(RunLocked, match=r"busy: another run is using this folder; wait for it"):
            train_sft(cfg)
        with pytest.raises(RunLocked, match="another run is using this folder"):
            run_pipeline(cfg)
    with run_lock(tmp_path / "busy"):  # released
        pass


def test_a_pipeline_rerun_with_another_config_is_refused(tmp_path):
    from cada_jax.cada.pipeline import PipelineError, run_pipeline
    from cada_jax.config import dump_yaml

    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.name=p", "generate.limit=4"])
    run = tmp_path / "p"
    run.mkdir()
    dump_yaml(cfg, str(run / "config.yaml"))
    (run / "pipeline_state.json").write_text(json.dumps({"done": {"generate": {"kept": 4}}}))
    saved = (run / "config.yaml").read_text()
    changed = load_config(None, [f"run.out_dir={tmp_path}", "run.name=p", "generate.limit=8", "run.progress=false"])
    with pytest.raises(PipelineError, match=r"stages generate were run with another config \(generate\.limit 4 -> 8\); "
                                            r"rerun with the same config.*another run\.name"):
        run_pipeline(changed)
    assert (run / "config.yaml").read_text() == saved


# ---------------------------------------------------------------------------------------------
# Evaluation and generation keep their finished work
# ---------------------------------------------------------------------------------------------


class _DownJudge:
    name = "down"

    def judge(self, prompts, completions):
        raise RuntimeError("judge server is down")


def _tiny_eval(tiny_model_dir):
    from cada_jax.checkpoints.hf import load_params
    from cada_jax.tokenizer import Tokenizer

    params, cfg = load_params(tiny_model_dir)
    return params, cfg, Tokenizer(tiny_model_dir)


def test_eval_keeps_completions_when_the_judge_fails_and_a_rerun_only_judges(tiny_model_dir, tmp_path):
    from cada_jax.eval.runner import PARTIAL_FILE, evaluate
    from cada_jax.sampling import Sampler, SamplingParams
    from tests.test_eval_runner import BENIGN, HARMFUL

    params, cfg, tok = _tiny_eval(tiny_model_dir)
    sampler = Sampler(cfg, tok, max_seq_len=512)
    sp = SamplingParams(max_new_tokens=8, temperature=0.0)
    out = tmp_path / "eval"
    kw = dict(sampling=sp, sampler=sampler, batch_size=2, out_dir=out, progress=False, model_name="tiny")
    with pytest.raises(RuntimeError, match="judge server is down"):
        evaluate(params, cfg, tok, HARMFUL + BENIGN, judge=_DownJudge(), **kw)
    partial = (out / PARTIAL_FILE).read_text().splitlines()
    assert len(partial) == 1 + 5  # the header and every item's completions
    again = evaluate(params, cfg, tok, HARMFUL + BENIGN, **kw)
    assert again["timings"]["generate_calls"] == 0 and again["resumed_items"] == 5
    assert not (out / PARTIAL_FILE).exists() and (out / "results.jsonl").is_file()
    straight = evaluate(params, cfg, tok, HARMFUL + BENIGN, **{**kw, "out_dir": tmp_path / "straight"})
    assert (out / "results.jsonl").read_text() == (tmp_path / "straight" / "results.jsonl").read_text()
    assert straight["timings"]["generate_calls"] == 3


def test_eval_checks_its_folder_first_and_skips_prompts_that_do_not_fit(tiny_model_dir, tmp_path):
    from cada_jax.data.records import PromptRecord
    from cada_jax.eval.runner import evaluate
    from cada_jax.sampling import Sampler, SamplingParams
    from tests.test_eval_runner import BENIGN

    params, cfg, tok = _tiny_eval(tiny_model_dir)
    sampler = Sampler(cfg, tok, max_seq_len=256)
    sp = SamplingParams(max_new_tokens=8, temperature=0.0)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(ValueError, match=r"file/eval: cannot write results there .*pass a writable --out"):
        evaluate(params, cfg, tok, BENIGN, sampling=sp, sampler=sampler, out_dir=blocked / "eval", progress=False)
    long = PromptRecord(id="h-long", prompt="word " * 100, label="harmful", category="cbrne")
    short = PromptRecord(id="b-hi", prompt="Hi", label="benign", category="benign")
    summary = evaluate(params, cfg, tok, [long, short], sampling=sp, sampler=sampler, out_dir=tmp_path / "e",
                       progress=False)
    assert summary["n_rows"] == 1 and [s["id"] for s in summary["skipped_too_long"]] == ["h-long"]
    assert "the prompt has" in summary["skipped_too_long"][0]["reason"]


def test_generate_resumes_at_the_first_unfinished_batch(tmp_path):
    import types

    from cada_jax.cada.generate import generate_chains
    from cada_jax.cada.spec import default_spec

    calls = []

    class Sampler:
        def __init__(self, fail_at=None):
            self.fail_at = fail_at

        def generate(self, params, prompts, sp, prompt_ids=None):
            calls.append(len(prompts))
            if self.fail_at is not None and len(calls) == self.fail_at:
                raise RuntimeError("preempted")
            texts = [f"Sure: here is how ({p[0]['content'][:10]})." for p in prompts for _ in range(sp.n)]
            return types.SimpleNamespace(texts=texts, completion_ids=[[1, 2, 3]] * len(texts), finish_reasons=["stop"] * len(texts))

    records = [{"prompt": f"How do I bake bread number {i}?", "label": "benign", "category": "benign"} for i in range(6)]
    kw = dict(spec=default_spec(), k=2, reasoning="template", variant="cases", n=1, batch_size=2, progress=False)
    out = tmp_path / "chains.jsonl"
    with pytest.raises(RuntimeError, match="preempted"):
        generate_chains(None, Sampler(fail_at=3), records, out_path=str(out), **kw)
    assert not out.exists() and len((tmp_path / "chains.jsonl.partial").read_text().splitlines()) == 3
    calls.clear()
    resumed = generate_chains(None, Sampler(), records, out_path=str(out), **kw)
    assert calls == [2] and resumed["resumed_batches"] == 2 and resumed["kept"] == 6
    straight = generate_chains(None, Sampler(), records, out_path=str(tmp_path / "s.jsonl"), **kw)
    assert out.read_text() == (tmp_path / "s.jsonl").read_text()
    assert not (tmp_path / "chains.jsonl.partial").exists()
    assert {k: v for k, v in resumed.items() if k not in ("seconds", "records", "path", "resumed_batches")} == \
        {k: v for k, v in straight.items() if k not in ("seconds", "records", "path", "resumed_batches")}


@pytest.mark.parametrize("header", [b'{"w": [1, 2]}', b'[1, 2, 3]', b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}}'])
def test_a_safetensors_header_of_the_wrong_shape_is_one_line(tmp_path, header):
    import struct

    from cada_jax.checkpoints.safetensors_io import CheckpointError, SafetensorsFile

    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file .*re-download or re-export"):
        SafetensorsFile(str(path))
