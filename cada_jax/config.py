"""Run configuration: nested frozen dataclasses, loaded from YAML plus ``key=value`` overrides.

Every CLI command reads one `Config`. Each section is a frozen dataclass whose fields carry their
default and a one-line doc (``metadata["doc"]``; `describe()` lists them all). A YAML file only
needs the keys it changes; overrides use dotted keys and YAML scalars::

    cfg = load_config("configs/sft.yaml", ["optim.lr=1e-5", "lora.targets=[q_proj,v_proj]"])

Checks happen once, at load time: an unknown key is a one-line error naming the file (or the
override) and the closest valid key; a value of the wrong type names the key and the type it
needs; range checks live in each section's ``__post_init__``. ``dump_yaml`` writes the resolved
config into the run directory (atomically), and loading that file gives back an equal `Config`.

Adding a section (``rl``, ``sampling``, ``judge``, ``mesh``, ``pipeline`` ...): define a frozen
dataclass here whose fields are built with `_f` (`typed_yaml.doc_field`: default + doc), then add
it as a field of `Config` with ``default_factory``. The loader, the overrides, `to_dict` and
`describe` are generic over nested dataclasses (`cada_jax.typed_yaml`), so nothing else changes. Supported field types: bool, int, float, str,
``Literal[...]``, ``X | None``, ``tuple[X, ...]`` and nested sections.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Literal

import yaml

from cada_jax.typed_yaml import (
    ConfigError,
    build,
    dotted_set,
    field_types,
    parse_override,
    read_yaml,
    to_dict,
)
from cada_jax.typed_yaml import all_keys as _all_keys
from cada_jax.typed_yaml import check as _check
from cada_jax.typed_yaml import describe as _describe
from cada_jax.typed_yaml import doc_field as _f

__all__ = [
    "ConfigError",
    "ModelSection",
    "OptimSection",
    "LoRASection",
    "CheckpointSection",
    "MeshSection",
    "SFTSection",
    "RewardSpec",
    "DataSource",
    "RLSection",
    "RunSection",
    "GenerateSection",
    "SpecSection",
    "EvalSection",
    "PipelineSection",
    "Config",
    "LORA_TARGETS",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "to_dict",
    "dump_yaml",
    "describe",
    "describe_text",
    "config_changes",
    "all_keys",
]


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LoRATarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DType = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str = _f("smollm2-135m-instruct", "HF model directory (safetensors + config.json), or 'smollm2-135m-instruct' (bundled GGUF, converted once)")
    dtype: DType = _f("float32", "compute dtype of activations and matmuls (bfloat16 on TPU/GPU)")
    param_dtype: DType = _f("float32", "storage dtype of the base weights")
    remat: Literal["none", "full", "dots"] = _f("none", "rematerialise each layer in the backward pass: none | full | dots")
    attention_impl: Literal["einsum", "dot_product_attention"] = _f("einsum", "attention kernel: einsum | dot_product_attention (cuDNN flash on GPU)")
    max_seq_len: int = _f(2048, "longest sequence (prompt + completion) the run may build, in tokens")

    def __post_init__(self):
        _check(bool(self.path), "model.path", "must name a model directory or 'smollm2-135m-instruct'")
        _check(self.max_seq_len >= 2, "model.max_seq_len", f"must be >= 2, got {self.max_seq_len}")


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = _f(1e-5, "peak learning rate of AdamW")
    warmup_steps: int = _f(0, "optimizer updates of linear warmup from lr/warmup_steps up to lr")
    schedule: Literal["constant", "cosine"] = _f("cosine", "after warmup: constant | cosine decay to min_lr_ratio * lr at the last step")
    min_lr_ratio: float = _f(0.0, "final learning rate of the cosine schedule as a fraction of lr")
    weight_decay: float = _f(0.0, "decoupled AdamW weight decay (not applied to norm scales and biases)")
    b1: float = _f(0.9, "AdamW beta1")
    b2: float = _f(0.999, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "clip gradients to this global norm; 0 disables clipping")
    max_skipped_in_a_row: int = _f(8, "stop with an error after this many consecutive updates skipped for a non-finite loss or gradient; 0 = never")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer update (optax.MultiSteps)")

    def __post_init__(self):
        _check(self.lr >= 0, "optim.lr", f"must be >= 0, got {self.lr}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0.0 <= self.b1 < 1.0, "optim.b1", f"must be in [0, 1), got {self.b1}")
        _check(0.0 <= self.b2 < 1.0, "optim.b2", f"must be in [0, 1), got {self.b2}")
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm", f"must be >= 0 (0 disables), got {self.max_grad_norm}")
        _check(self.grad_accum >= 1, "optim.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.max_skipped_in_a_row >= 0, "optim.max_skipped_in_a_row", f"must be >= 0 (0 = never stop), got {self.max_skipped_in_a_row}")


@dataclasses.dataclass(frozen=True)
class LoRASection:
    enabled: bool = _f(False, "train low-rank adapters instead of the full weights")
    rank: int = _f(16, "adapter rank r")
    alpha: float = _f(32.0, "adapter scale numerator: the update is (alpha / rank) * A @ B")
    targets: tuple[LoRATarget, ...] = _f(("q_proj", "k_proj", "v_proj", "o_proj"), "projections that get adapters (attention and/or MLP)")

    def __post_init__(self):
        _check(self.rank >= 1, "lora.rank", f"must be >= 1, got {self.rank}")
        _check(len(self.targets) > 0, "lora.targets", f"must name at least one of {list(LORA_TARGETS)}")
        dup = sorted({t for t in self.targets if self.targets.count(t) > 1})
        _check(not dup, "lora.targets", f"lists {dup} more than once")


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    dir: str = _f("", "orbax checkpoint directory; empty means <run dir>/checkpoints")
    every_steps: int = _f(100, "save the train state every this many steps (and always at the end / on preemption)")
    keep: int = _f(3, "number of most recent checkpoints kept")
    async_save: bool = _f(True, "write checkpoints in a background thread while training continues")

    def __post_init__(self):
        _check(self.every_steps >= 1, "checkpoint.every_steps", f"must be >= 1, got {self.every_steps}")
        _check(self.keep >= 1, "checkpoint.keep", f"must be >= 1, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = _f(-1, "data-parallel replicas (batch split, weights whole or fsdp-split); -1 = all devices left over")
    fsdp: int = _f(1, "devices that split weights, gradients and optimizer state (ZeRO-3) and the batch")
    tensor: int = _f(1, "devices that split attention heads, MLP width and vocabulary; keep within a host")

    def __post_init__(self):
        for key in ("data", "fsdp", "tensor"):
            v = getattr(self, key)
            _check(v >= 1 or v == -1, f"mesh.{key}", f"must be a positive number of devices or -1 (all left over), got {v}")
        _check([self.data, self.fsdp, self.tensor].count(-1) <= 1, "mesh",
               f"only one of data, fsdp, tensor may be -1, got data={self.data} fsdp={self.fsdp} tensor={self.tensor}")


@dataclasses.dataclass(frozen=True)
class SFTSection:
    data: str = _f("", "JSONL of records {prompt_messages: [...] | prompt: str, completion: str}")
    prompt_field: str = _f("prompt_messages", "record field holding the prompt: a list of chat messages, or a string sent as one user turn")
    completion_field: str = _f("completion", "record field holding the assistant completion (the only text that carries loss)")
    batch_size: int = _f(8, "rows per step, over all processes")
    max_len: int = _f(1024, "longest tokenised example (prompt + completion + end of turn)")
    length_buckets: tuple[int, ...] = _f((), "padded row lengths (ascending, last >= max_len); empty means powers of two from 64 up to max_len")
    packing: bool = _f(False, "pack several examples into each max_len row (attention kept inside each example)")
    steps: int = _f(0, "number of train steps; 0 derives it from epochs")
    epochs: float = _f(1.0, "passes over the data when steps is 0")
    seed: int = _f(0, "seed of the data order (shuffling and packing)")
    drop_long: bool = _f(False, "skip examples longer than max_len instead of stopping with an error")

    def __post_init__(self):
        _check(self.batch_size >= 1, "sft.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.max_len >= 2, "sft.max_len", f"must be >= 2, got {self.max_len}")
        _check(self.steps >= 0, "sft.steps", f"must be >= 0, got {self.steps}")
        _check(self.steps > 0 or self.epochs > 0, "sft.epochs", f"must be > 0 when sft.steps is 0, got {self.epochs}")
        b = list(self.length_buckets)
        _check(b == sorted(set(b)), "sft.length_buckets", f"must be strictly ascending, got {b}")
        _check(all(x >= 1 for x in b), "sft.length_buckets", f"must be positive, got {b}")
        _check(not b or b[-1] >= self.max_len, "sft.length_buckets", f"the last bucket must be >= sft.max_len={self.max_len}, got {b}")


@dataclasses.dataclass(frozen=True)
class RunSection:
    out_dir: str = _f("runs", "parent directory of run directories")
    name: str = _f("default", "run name: the run directory is <out_dir>/<name>")
    seed: int = _f(0, "root seed; every jax.random key of the run is derived from it")
    log_every: int = _f(1, "write metrics every this many steps")
    progress: bool = _f(True, "show a tqdm progress bar")

    def __post_init__(self):
        _check(self.log_every >= 1, "run.log_every", f"must be >= 1, got {self.log_every}")

    @property
    def dir(self) -> str:
        return os.path.join(self.out_dir, self.name) if self.name else self.out_dir


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    name: str = _f("", "a reward registered in cada_jax.rewards.functions (e.g. target_token_share), or 'package.module:function'")
    weight: float = _f(1.0, "weight of this reward in the summed reward")
    judge: str = _f("", "judge giving this reward's verdicts (rule | llm | http | a registered one); '' = rl.judge. Ignored by rewards that need none")

    def __post_init__(self):
        _check(bool(self.name), "rl.rewards[].name", "must name a registered reward or 'module:function'")


@dataclasses.dataclass(frozen=True)
class RLSection:
    data: str = _f("", "JSONL of prompt records {prompt: str | [chat messages], ...}; the other fields reach the reward functions as columns")
    prompt_field: str = _f("prompt", "record field holding the prompt: a string (one user turn) or a list of chat messages")
    steps: int = _f(100, "RL steps (sample -> score -> update)")
    prompts_per_step: int = _f(8, "prompts (groups) per step, over all processes")
    group_size: int = _f(8, "completions sampled per prompt (G >= 2: advantages compare samples of one prompt)")
    max_new_tokens: int = _f(256, "longest completion, in tokens")
    temperature: float = _f(1.0, "sampling temperature (> 0)")
    top_p: float = _f(1.0, "nucleus sampling mass; 1 = off")
    top_k: int = _f(0, "sample among the k most likely tokens; 0 = off")
    stop_strings: tuple[str, ...] = _f((), "stop a completion once its text contains one of these")
    ignore_eos: bool = _f(False, "always sample max_new_tokens, ignoring end-of-turn tokens (benchmarks)")
    mu: int = _f(1, "update epochs over each sampled batch (PPO-style reuse; 1 = on-policy)")
    minibatch_size: int = _f(0, "completions per micro-batch of the update; 0 = the whole batch (prompts_per_step * group_size)")
    beta: float = _f(0.04, "KL coefficient towards the frozen reference; 0 skips all reference work")
    loss: str = _f("grpo", "loss aggregation registered in cada_jax.training.losses: grpo | dr_grpo | dapo | your own")
    ratio_level: Literal["token", "sequence"] = _f("token", "token: per-token ratio (GRPO); sequence: GSPO's length-normalised sequence ratio")
    epsilon_low: float = _f(0.2, "lower clip of the ratio at 1 - epsilon_low")
    epsilon_high: float = _f(0.2, "upper clip of the ratio at 1 + epsilon_high (DAPO clip-higher: 0.28)")
    kl_estimator: Literal["k1", "k2", "k3"] = _f("k3", "per-token KL estimator towards the reference")
    delta: float | None = _f(None, "dual-clip cap on the ratio for negative advantages (> 1 + epsilon_high); null = off")
    advantage: str = _f("grpo", "advantage estimator registered in cada_jax.training.advantages: grpo | rloo | your own")
    normalize_std: bool = _f(True, "grpo advantage: divide by the group's reward std (false = Dr. GRPO)")
    advantage_eps: float = _f(1e-6, "grpo advantage: added to the std before dividing")
    advantage_ddof: int = _f(0, "grpo advantage: 0 = population std, 1 = unbiased std (as TRL)")
    dynamic_sampling: bool = _f(False, "DAPO dynamic sampling: drop groups whose rewards are all equal and refill from more prompts")
    max_extra_rounds: int = _f(3, "dynamic sampling: extra sampling rounds per step at most; still short, the batch is topped up with zero-advantage groups")
    rewards: tuple[RewardSpec, ...] = _f((), "reward functions, weights and (optional) judges, e.g. [{name: cada_safety, weight: 1.0, judge: http}]; empty in the pipeline = cada_safety 1.0, cada_format 0.5, cada_chain 0.5, cada_helpful 0.5")
    judge: str = _f("rule", "judge that scores the judge-based rewards (cada_safety, cada_chain, cada_helpful, ...): rule | llm | http (settings in the judge section); a reward entry's own judge wins")
    reward_module: str = _f("", "module (dotted name or .py file) imported first, so its @register_reward functions can be named in rl.rewards")
    eval_data: str = _f("", "JSONL of held-out prompt records for greedy evaluation; empty = none")
    eval_every: int = _f(0, "evaluate every this many steps (greedy, one sample per prompt); 0 = never")
    seed: int = _f(0, "seed of the prompt order")

    def __post_init__(self):
        _check(self.steps >= 1, "rl.steps", f"must be >= 1, got {self.steps}")
        _check(self.prompts_per_step >= 1, "rl.prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        _check(self.group_size >= 2, "rl.group_size",
               f"must be >= 2 (group-relative advantages compare several samples of one prompt), got {self.group_size}")
        _check(self.max_new_tokens >= 1, "rl.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.temperature > 0, "rl.temperature", f"must be > 0 (RL samples; greedy gives identical groups), got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "rl.top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "rl.top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        _check(self.mu >= 1, "rl.mu", f"must be >= 1, got {self.mu}")
        _check(self.minibatch_size >= 0, "rl.minibatch_size", f"must be >= 0 (0 = whole batch), got {self.minibatch_size}")
        batch = self.prompts_per_step * self.group_size
        _check(self.minibatch_size == 0 or batch % self.minibatch_size == 0, "rl.minibatch_size",
               f"{self.minibatch_size} does not divide the batch rl.prompts_per_step * rl.group_size = {batch}; pick a divisor")
        _check(self.minibatch_size % self.group_size == 0, "rl.minibatch_size",
               f"{self.minibatch_size} is not a multiple of rl.group_size={self.group_size}; micro-batches hold whole groups")
        _check(self.beta >= 0, "rl.beta", f"must be >= 0, got {self.beta}")
        _check(0.0 <= self.epsilon_low < 1.0, "rl.epsilon_low", f"must be in [0, 1), got {self.epsilon_low}")
        _check(self.epsilon_high >= 0.0, "rl.epsilon_high", f"must be >= 0, got {self.epsilon_high}")
        _check(self.delta is None or self.delta > 1.0 + self.epsilon_high, "rl.delta",
               f"must be > 1 + epsilon_high = {1.0 + self.epsilon_high} or null, got {self.delta}")
        _check(self.advantage_eps >= 0, "rl.advantage_eps", f"must be >= 0, got {self.advantage_eps}")
        _check(self.advantage_ddof in (0, 1), "rl.advantage_ddof", f"must be 0 or 1, got {self.advantage_ddof}")
        _check(self.max_extra_rounds >= 0, "rl.max_extra_rounds", f"must be >= 0, got {self.max_extra_rounds}")
        _check(self.eval_every >= 0, "rl.eval_every", f"must be >= 0 (0 = never), got {self.eval_every}")

    @property
    def batch_size(self) -> int:
        """Completions per step: prompts_per_step * group_size."""
        return self.prompts_per_step * self.group_size


@dataclasses.dataclass(frozen=True)
class DataSource:
    name: str = _f("", "builtin (the shipped harmful/benign/look-alike sets) or a benchmark loader: advbench, strongreject, rho_pairs, rho_overrefusal, harmbench, bigbench_general_knowledge, ... (`cada eval --list-suites`)")
    split: str = _f("", "the loader's split (builtin: train | test; strongreject: a source to keep, or !source to drop; rho_pairs: benign | harmful); '' = its default")
    path: str = _f("", "a local file of that benchmark; '' = the copy an installed package ships (or the built-in sets)")
    limit: int = _f(0, "take N records (builtin: N per set, categories in turn; others: after a shuffle seeded by run.seed); 0 = all")

    def __post_init__(self):
        _check(bool(self.name), "sources[].name", "must be 'builtin' or a benchmark loader name, e.g. {name: advbench, limit: 100}")
        _check(self.limit >= 0, "sources[].limit", f"must be >= 0 (0 = all), got {self.limit}")


@dataclasses.dataclass(frozen=True)
class GenerateSection:
    data: str = _f("", "JSONL of training requests {prompt, label: harmful|benign, category}; empty = the built-in train sets")
    limit: int = _f(0, "N requests of each built-in set, taking its categories in turn (or the first N of the file); 0 = all. Not used with generate.sources")
    sources: tuple[DataSource, ...] = _f((), "training requests from several sets, e.g. [{name: builtin, limit: 40}, {name: advbench, limit: 100}]; empty = the built-in train sets (generate.limit each). With pipeline.rl_fresh, RL takes the next `limit` of each source")
    variant: Literal["none", "code", "simple", "cases"] = _f("cases", "what the model sees while it writes its chains: cases = statutes + precedents (CADA)")
    n: int = _f(4, "chains sampled per request; the best passing one is kept")
    k_cases: int = _f(3, "precedent cases retrieved per request (variant cases)")
    max_new_tokens: int = _f(256, "longest chain, in tokens")
    temperature: float = _f(0.8, "sampling temperature of self-generation")
    top_p: float = _f(0.95, "nucleus sampling mass of self-generation")
    judge: Literal["rule", "llm", "http"] = _f("rule", "judge that filters chains: rule | llm | http (settings in the judge section)")
    batch_size: int = _f(32, "requests per sampler call")
    seed: int = _f(0, "sampling seed")
    scaffold: bool = _f(False, "write the <reasoning>/<answer> tags around the model's own text (for small models that do not follow the format)")
    fallback: Literal["none", "precedent"] = _f("none", "precedent: a harmful request with no passing chain gets its nearest refusing precedent's chain (for small models that rarely refuse)")
    cite_precedent: bool = _f(False, "with scaffold and variant cases: open each reasoning with the closest retrieved precedent whose verdict fits the request's label (the model writes the rest)")
    min_chain_score: float = _f(0.0, "keep only chains the judge's chain rubric scores at least this (1-5: does the reasoning identify the risk, cite the codes that apply, agree with the answer); 0 = off, 5 = the authors' earlier pipeline")
    reasoning: Literal["model", "template"] = _f("model", "model: the model writes its own reasoning under the variant (CADA self-generation); template (for models too small to reason over the spec): each reasoning is filled in from a template of what the variant shows (cases: the closest fitting precedent; simple: the statutes; code: the extensive code's category rules; none: the verdict alone), harmful answers are the closest refusing precedent's refusal, benign answers the model's own answer to the bare request (template distillation, not self-generation)")

    def __post_init__(self):
        _check(self.n >= 1, "generate.n", f"must be >= 1, got {self.n}")
        _check(self.limit >= 0, "generate.limit", f"must be >= 0 (0 = all), got {self.limit}")
        _check(self.batch_size >= 1, "generate.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.temperature > 0, "generate.temperature", f"must be > 0 (the chains are sampled), got {self.temperature}")
        _check(self.min_chain_score == 0 or 1 <= self.min_chain_score <= 5, "generate.min_chain_score",
               f"must be 0 (off) or a chain score from 1 to 5, got {self.min_chain_score}")
        _check(self.reasoning == "model" or not (self.scaffold or self.fallback != "none" or self.cite_precedent), "generate.reasoning",
               "template builds every chain from a precedent; scaffold, fallback and cite_precedent shape sampled reasoning "
               "(reasoning=model) and do not apply: remove them")


@dataclasses.dataclass(frozen=True)
class SpecSection:
    dir: str = _f("", "spec directory: statutes.yaml, extensive_code.yaml, precedents.jsonl, categories.yaml; '' = the shipped cada_jax/cada/spec/")
    retrieval: Literal["bm25", "embedding", "hybrid"] = _f("bm25", "how the cases variant ranks precedents: bm25 (words) | embedding (cosine of the embedder's mean-pooled hidden states) | hybrid (reciprocal-rank fusion of both)")
    embedder: str = _f("", "embedding/hybrid: model whose hidden states embed texts; '' = the model of the stage, or a model directory, or 'smollm2-135m-instruct'")
    embed_batch_size: int = _f(16, "embedding/hybrid: texts per embedder forward pass")
    embed_max_len: int = _f(128, "embedding/hybrid: tokens of a text that are embedded (longer texts are cut); padded to 16, 32, ... up to this")

    def __post_init__(self):
        _check(self.embed_batch_size >= 1, "spec.embed_batch_size", f"must be >= 1, got {self.embed_batch_size}")
        _check(self.embed_max_len >= 16, "spec.embed_max_len", f"must be >= 16 tokens, got {self.embed_max_len}")


@dataclasses.dataclass(frozen=True)
class JudgeSection:
    model: str = _f("", "llm: judge model directory ('' = the model being trained/evaluated); http: the served model name")
    url: str = _f("", "http: base URL of an OpenAI-compatible server, e.g. https://api.example.com/v1")
    api_key_env: str = _f("CADA_JUDGE_API_KEY", "http: environment variable holding the API key (never put keys in configs)")
    max_concurrency: int = _f(8, "http: requests in flight at once")
    timeout_s: float = _f(60.0, "http: seconds per request before a retry")
    max_retries: int = _f(5, "http: retries with exponential backoff before a clear error")
    cache_dir: str = _f("", "http: on-disk verdict cache ('' = ~/.cache/cada_jax/judge)")
    max_new_tokens: int = _f(160, "llm: tokens per rubric reply")
    batch_size: int = _f(16, "llm: conversations per sampler call")

    def __post_init__(self):
        _check(self.max_concurrency >= 1, "judge.max_concurrency", f"must be >= 1, got {self.max_concurrency}")
        _check(self.timeout_s > 0, "judge.timeout_s", f"must be > 0 seconds, got {self.timeout_s}")
        _check(self.max_retries >= 0, "judge.max_retries", f"must be >= 0, got {self.max_retries}")
        _check(self.max_new_tokens >= 1, "judge.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.batch_size >= 1, "judge.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(not self.url or self.url.startswith(("http://", "https://")), "judge.url",
               f"must start with http:// or https://, got {self.url!r}")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    suite: str = _f("builtin", "evaluation suite: builtin (held-out harmful/benign/look-alike test sets) or a loader name with eval.data")
    data: str = _f("", "local file for a loader suite (strongreject, xstest, ...)")
    limit: int = _f(0, "first N prompts of each set; 0 = all")
    sets: tuple[DataSource, ...] = _f((), "further held-out sets evaluated with the suite and reported apart, e.g. [{name: strongreject, split: custom, limit: 40}]; a prompt that is also a training request is dropped")
    utility: tuple[DataSource, ...] = _f((), "multiple-choice utility sets scored by the log-likelihood of each option, before and after, e.g. [{name: bigbench_general_knowledge}]")
    attacks: tuple[str, ...] = _f(("none",), "jailbreak transforms applied to harmful prompts (cada_jax.data.attacks)")
    judge: Literal["rule", "llm", "http"] = _f("rule", "judge of the final answers: rule | llm | http (settings in the judge section)")
    max_new_tokens: int = _f(256, "longest completion during evaluation")
    batch_size: int = _f(32, "prompts per sampler call")

    def __post_init__(self):
        _check(self.limit >= 0, "eval.limit", f"must be >= 0 (0 = all), got {self.limit}")
        _check(len(self.attacks) >= 1, "eval.attacks", "needs at least one attack ('none' = the plain prompt)")


@dataclasses.dataclass(frozen=True)
class PipelineSection:
    stages: tuple[str, ...] = _f(("generate", "sft", "rl", "eval"), "stages to run, in order, from: generate, sft, rl, eval")
    eval_before: bool = _f(True, "also evaluate the starting model, for the before/after table")
    rl_data: str = _f("", "JSONL of RL requests {prompt, label}; empty = the same requests as generation")
    rl_lr: float = _f(0.0, "peak learning rate of the RL stage; 0 = optim.lr (which the SFT stage uses)")
    rl_fresh: bool = _f(False, "RL on the next window of requests of each training set (the next generate.limit, or the next `limit` of each generate.sources entry) instead of the ones distilled by SFT (needs a limit; ignored with rl_data)")

    def __post_init__(self):
        allowed = ("generate", "sft", "rl", "eval")
        for st in self.stages:
            _check(st in allowed, "pipeline.stages", f"unknown stage {st!r}; use some of {', '.join(allowed)}")
        order = [allowed.index(st) for st in self.stages]
        _check(order == sorted(order) and len(set(order)) == len(order), "pipeline.stages",
               f"stages must be distinct and in the order {', '.join(allowed)}, got {list(self.stages)}")
        _check(self.rl_lr >= 0, "pipeline.rl_lr", f"must be >= 0 (0 = optim.lr), got {self.rl_lr}")


def _check_rl_fresh(cfg) -> None:
    g = cfg.generate
    limited = any(s.limit > 0 for s in g.sources) if g.sources else g.limit > 0
    _check(not cfg.pipeline.rl_fresh or limited or cfg.pipeline.rl_data, "pipeline.rl_fresh",
           "needs generate.limit > 0 (or a generate.sources entry with a limit): with no limit the generate stage already uses every training request")
    _check(not (g.sources and g.data), "generate.sources", "give generate.data (one JSONL file) or generate.sources, not both")
    _check(not (g.sources and g.limit), "generate.limit", "applies to the built-in sets when generate.sources is empty; "
           "with generate.sources give each source its own limit, e.g. {name: builtin, limit: 25}")


@dataclasses.dataclass(frozen=True)
class Config:
    run: RunSection = _f(RunSection, "where outputs go, seeds, logging")
    model: ModelSection = _f(ModelSection, "which model and its numerics")
    optim: OptimSection = _f(OptimSection, "AdamW, learning-rate schedule, clipping, accumulation")
    lora: LoRASection = _f(LoRASection, "low-rank adapters")
    checkpoint: CheckpointSection = _f(CheckpointSection, "orbax train-state checkpoints")
    mesh: MeshSection = _f(MeshSection, "device mesh of SFT and RL: data / fsdp / tensor parallelism (data*fsdp*tensor = devices)")
    sft: SFTSection = _f(SFTSection, "supervised fine-tuning (context distillation)")
    rl: RLSection = _f(RLSection, "reinforcement learning (GRPO family)")
    generate: GenerateSection = _f(GenerateSection, "CADA stage 1: self-generated reasoning chains, judge-filtered")
    spec: SpecSection = _f(SpecSection, "the spec the method reasons over (statutes, extensive code, precedents, categories) and how precedents are retrieved")
    judge: JudgeSection = _f(JudgeSection, "settings of the llm / http judges named by generate.judge and eval.judge")
    eval: EvalSection = _f(EvalSection, "safety evaluation of the pipeline's models")
    pipeline: PipelineSection = _f(PipelineSection, "which stages `cada pipeline` runs")

    def __post_init__(self):  # checks across sections
        _check_rl_fresh(self)


# ----------------------------------------------------------------------------- loading, overrides, describe
# (the generic machinery is cada_jax.typed_yaml; these bind it to `Config`)


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of `cls` (sections and leaves)."""
    return _all_keys(cls, prefix)


def describe(cls=Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every leaf field: the reference that `cada config
    --describe` (and `--describe` on every command that reads a config) prints."""
    return _describe(cls, prefix)


def config_from_dict(data: dict | None, overrides: Iterable[str] = (), *, source: str = "<dict>") -> Config:
    """A `Config` from a nested dict (as read from YAML) plus ``key=value`` overrides."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (run:, model:, optim: ...), got {type(data).__name__}")
    cfg = build(Config, data, "", source)
    for item in overrides:
        key, value = parse_override(item)
        where = f"override '{item}'"
        tree = to_dict(cfg)
        dotted_set(Config, tree, key, value, where)
        cfg = build(Config, tree, "", where)
    return cfg


def load_config(path: str | None = None, overrides: Iterable[str] = ()) -> Config:
    """The `Config` of YAML file `path` (None: all defaults) with ``key=value`` overrides applied."""
    if path is None:
        return config_from_dict({}, overrides, source="<defaults>")
    return config_from_dict(read_yaml(path), overrides, source=str(path))


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """A copy of `cfg` with ``key=value`` overrides applied (same checks as `load_config`)."""
    return config_from_dict(to_dict(cfg), overrides, source="<config>")


def dump_yaml(cfg: Config, path: str) -> str:
    """Write the resolved config to `path` atomically (temp file + rename); returns the path."""
    from cada_jax.files import atomic_write_text

    path = os.path.abspath(path)
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False))
    return path


def describe_text(sections: Iterable[str] = ()) -> str:
    """Every config key (or those of `sections`) as `key (type) = default  # doc` lines, one
    blank line between sections, each section headed by its own doc."""
    wanted = set(sections)
    unknown = wanted - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; sections: {', '.join(f.name for f in dataclasses.fields(Config))}")
    out: list[str] = []
    for f in dataclasses.fields(Config):
        if wanted and f.name not in wanted:
            continue
        out.append(f"# {f.name}: {f.metadata.get('doc', '')}")
        for key, tp, default, doc in describe(field_types(Config)[f.name], f.name + "."):
            out.append(f"{key} ({tp}) = {json.dumps(default)}  # {doc}")
        out.append("")
    return "\n".join(out).rstrip("\n")


def config_changes(saved: dict, current: dict, may_change: tuple[str, ...] = (), *, defaults: dict | None = None) -> list[str]:
    """`key old -> new` for every leaf that differs between two `to_dict` configs, except keys
    that start with one of `may_change`, and keys only one side has (a key added or removed by a
    newer version of the project keeps its default meaning). With `defaults` (a `to_dict` of the
    defaults), a key the saved config lacks counts as a change when its current value is not the
    default: a folder written before the key existed ran with the default."""

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    old, new = flat(saved), flat(current)
    changes = [f"{key} {old[key]!r} -> {new[key]!r}" for key in sorted(set(old) & set(new))
               if not key.startswith(tuple(may_change)) and old[key] != new[key]]
    if defaults is not None:
        base = flat(defaults)
        changes += [f"{key} (default {base[key]!r}) -> {new[key]!r}" for key in sorted(set(new) - set(old))
                    if key in base and not key.startswith(tuple(may_change)) and new[key] != base[key]]
    return changes

