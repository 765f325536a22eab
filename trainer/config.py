"""The one training/evaluation config: every knob a user looks for, in one pydantic model.

Loaded from a YAML or JSON file, then `--set a.b=c` overrides (values parsed as YAML scalars,
then type-checked by pydantic). Unknown keys are errors naming the key. Relative paths are taken
relative to the working directory, as a shell user would expect. The resolved config is written to
`RUN_DIR/config.yaml` by the trainer, so a run can always be reproduced from its directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EnvEndpoint(_Section):
    """One env server by `url`, or `module`: env servers the trainer starts and stops itself."""

    url: str | None = Field(default=None, description="base URL of a running env server (protocol v1)")
    module: str | None = Field(
        default=None,
        description="MODULE:OBJECT to serve instead of a url, as `openrft env serve MODULE:OBJECT` would: the "
        "trainer starts the processes on free loopback ports and stops them when it ends (trainer/rollouts/local_envs.py)",
    )
    workers: int = Field(default=1, ge=1, description="with module: processes, each its own URL in the pool")
    args: list[str] = Field(
        default_factory=list, description="with module: more `openrft env serve` flags, e.g. [--max-concurrency, '64']"
    )
    env: dict[str, str] = Field(default_factory=dict, description="with module: extra environment variables")
    startup_timeout_s: float = Field(
        default=60.0, gt=0, description="with module: how long each process has to answer GET /health"
    )
    token: str | None = Field(
        default=None,
        description="bearer token the env server expects; with module also served as `--token` (agent targets)",
    )
    wait: Literal["auto", "poll", "logs"] = Field(
        default="auto",
        description="how terminal states are learned: poll = batched long-poll of /status; logs = only the "
        "gateway's /logs push (eval-protocol servers, which serve no /status); auto = poll when /health is "
        "openrft's, else the first /status answer of a rollout decides (a StatusResponse: poll; 404/405: logs)",
    )

    @model_validator(mode="after")
    def _url_or_module(self) -> EnvEndpoint:
        if (self.url is None) == (self.module is None):
            raise ValueError("give either `url` (a running env server) or `module` (MODULE:OBJECT to serve here), "
                             + ("not both" if self.url is not None else "none is set"))
        if self.module is not None and ":" not in self.module:
            raise ValueError(f"module {self.module!r}: expected MODULE:OBJECT, e.g. reference_envs.math.server:app")
        fields = type(self).model_fields
        local_only = [name for name in ("workers", "args", "env", "startup_timeout_s")
                      if getattr(self, name) != fields[name].get_default(call_default_factory=True)]
        if self.url is not None and local_only:
            raise ValueError(f"{', '.join(local_only)} only apply with `module`, not with `url`")
        return self


class SamplingConfig(_Section):
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=256, ge=1, description="max new tokens per model call")


class LoraConfig(_Section):
    rank: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description='module names, or "all-linear"',
    )


class OptimConfig(_Section):
    lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float = Field(default=1.0, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = Field(
        default="constant", description="lr over the run's steps: constant, or decaying (linear, cosine) to "
        "lr * min_lr_ratio at the last step (trainer/learning/schedule.py)")
    warmup_steps: int = Field(default=0, ge=0, description="steps over which lr ramps up linearly from lr / warmup_steps")
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="the decaying schedules' last lr, as a fraction of lr")


class GrpoConfig(_Section):
    clip_eps_low: float = Field(default=0.2, ge=0, description="ratio clipped below at 1 - clip_eps_low")
    clip_eps_high: float = Field(default=0.28, ge=0, description="ratio clipped above at 1 + clip_eps_high")
    kl_coef: float = Field(default=0.0, ge=0, description="weight of the k3 KL to the base model; 0 skips it")
    scale_rewards: Literal["std", "none"] = Field(
        default="std", description='"std": (r - mean) / std (GRPO); "none": r - mean (Dr. GRPO)'
    )
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        default="token_mean",
        description="token_mean: every completion token of the step weighs the same (DAPO); "
        "seq_mean_token_mean: mean over tokens, then over sequences (original GRPO); "
        "seq_mean_token_sum_norm: token sums over a constant (sampling.max_tokens), "
        "then mean over sequences (Dr. GRPO)",
    )
    policy_loss: Literal["ppo_clip", "gspo", "cispo"] = Field(
        default="ppo_clip",
        description="ppo_clip: token-level clipped ratio (PPO/GRPO/DAPO); gspo: one clipped ratio per sequence, "
        "the geometric mean of its tokens' (GSPO); cispo: the clipped ratio as a stop-gradient weight on every "
        "token's log-likelihood, so clipped tokens keep their gradient (CISPO). Formulas: trainer/learning/grpo.py",
    )
    tis_cap: float | None = Field(
        default=2.0, gt=1.0,
        description="truncated importance sampling: the ratio against the sampler's recorded logprobs is capped "
        "at this value (stale samples with async.max_staleness > 0, or vLLM's numerics); null = no cap",
    )
    mask_truncated: bool = Field(
        default=False,
        description="drop completions cut by sampling.max_tokens (finish_reason length) from the loss (DAPO's "
        "overlong filtering): an answer cut mid-way is not punished for its truncation",
    )
    epochs: int = Field(default=1, ge=1, description="optimizer steps over each step's samples")
    micro_batch_size: int = Field(default=8, ge=1, description="sequences per forward/backward pass")
    share_prefix: bool = Field(
        default=True,
        description="compute the prompt a group's rollouts share once per micro-batch (exact; saves most "
        "of the learner's work when prompts are longer than completions)",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="recompute each layer's activations in the backward pass instead of keeping them: "
        "the learner keeps each layer's input instead of all its activations, and the LM head's logits a chunk "
        "at a time, for about one more forward pass of compute",
    )


class LearnerConfig(_Section):
    """The learner's ranks when launched data-parallel (`openrft train --nproc N` or torchrun)."""

    timeout_s: float = Field(
        default=600.0, gt=0,
        description="how long a rank waits for the others in a collective (the step's samples, the gradient "
        "sum) before the run stops with an error: a dead or hung rank ends the run, never hangs it. It covers "
        "rank 0's rollouts of a step, so keep it above the longest step",
    )
    fsdp: bool = Field(
        default=False,
        description="under torchrun, shard the model over the learner ranks (FSDP2 `fully_shard` on each decoder "
        "layer and the root): each rank holds 1/N of the frozen base weights and of the LoRA weights and "
        "optimizer state. Needs `backend: vllm` (a sharded model cannot generate in-process); prefix sharing "
        "is off under it (docs/scale.md). No effect in a single process",
    )


class RolloutConfig(_Section):
    deadline_s: float = Field(default=300.0, gt=0, description="per rollout; cancelled after it")
    max_retries: int = Field(default=2, ge=0, description="re-tries of a rollout after a retryable error")
    min_group_size: int = Field(default=2, ge=1, description="groups with fewer finished rollouts are dropped")
    max_in_flight: int = Field(default=256, ge=1, description="rollouts running at once, over all envs")
    routing: Literal["least_loaded", "round_robin"] = "least_loaded"
    poll_s: float = Field(default=2.0, gt=0, description="long-poll window of one batched /status call")
    max_consecutive_failures: int = Field(
        default=20, ge=0,
        description="circuit breaker: stop the run after this many rollouts in a row failed, after their retries, "
        "for an infrastructure reason (env unreachable, 5xx, at capacity, off-spec answers, auth); 0 = never",
    )
    dynamic_sampling: bool = Field(
        default=False,
        description="keep drawing tasks until the step has tasks_per_step groups whose rewards differ (DAPO's "
        "dynamic sampling): groups that all tie are drawn, counted and not trained; see max_draws",
    )
    max_draws: int | None = Field(
        default=None, ge=1,
        description="with dynamic_sampling: at most this many groups drawn for one step (then it trains what it "
        "has); default 4 x tasks_per_step",
    )
    max_untrained_steps: int = Field(
        default=10, ge=0,
        description="stop the run (exit 1) after this many steps in a row trained no sample (every rollout "
        "failed, or every group's rewards tied), with the failures counted by kind; a run in which no step "
        "trained stops at its end the same way, without writing an adapter; 0 = only that end-of-run check",
    )


class AsyncConfig(_Section):
    """`async:` pipelined steps (trainer/commands/pipeline.py)."""

    max_staleness: int = Field(
        default=0, ge=0,
        description="rollouts of the next steps run while the learner trains the current one, sampled by a policy "
        "at most this many versions behind the one trained (the loss's ratio is against their recorded sampling "
        "logprobs, capped by grpo.tis_cap); 0 = the synchronous loop (generate, then learn)",
    )


class GatewayConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="0 = any free port")
    public_url: str | None = Field(
        default=None, description="URL the envs reach the gateway at, if not http://host:port"
    )


class GenerationConfig(_Section):
    max_batch_size: int = Field(default=64, ge=1, description="concurrent requests generated together")
    collect_window_s: float = Field(default=0.01, ge=0)


class VLLMConfig(_Section):
    """`backend: vllm`: generation on vLLM servers over HTTP (trainer/generation/vllm_backend.py, docs/vllm.md)."""

    urls: list[str] = Field(default_factory=list, description="running vLLM servers; empty = start num_servers here")
    num_servers: int = Field(default=1, ge=1, description="servers to start when urls is empty")
    python: str | None = Field(default=None, description="python of the vLLM venv; default .venv-vllm/bin/python")
    max_model_len: int | None = Field(default=None, ge=2, description="--max-model-len of started servers")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="dtype of started servers; auto = the learner's (so logprobs match)"
    )
    extra_args: list[str] = Field(default_factory=list, description="more `vllm serve` flags for started servers")
    api_key: str | None = None
    startup_timeout_s: float = Field(default=600.0, gt=0)
    load_timeout_s: float = Field(default=120.0, gt=0, description="adapter load into all servers, per step")
    request_timeout_s: float = Field(default=600.0, gt=0)


class EvalConfig(_Section):
    """`openrft eval`: which model, which dataset, how many samples per task."""

    dataset: str | None = Field(default=None, description="defaults to the training dataset")
    adapter: str | None = Field(default=None, description="a PEFT adapter dir applied to `model`")
    url: str | None = Field(default=None, description="any OpenAI-compatible base URL instead of `model`")
    api_key: str | None = None
    model_name: str = Field(default="policy", description="`model` sent in completion_params")
    samples: int = Field(default=4, ge=1, description="rollouts per task (n of pass@k)")
    k: list[int] = Field(default_factory=lambda: [1])
    limit: int | None = Field(default=None, ge=1, description="evaluate only the first N tasks")
    out: str | None = Field(default=None, description="JSON result path; default RUN_DIR/eval.json")


class TrackersConfig(_Section):
    """Where `report_to` sends the metrics (trainer/commands/trackers.py); no network by default."""

    project: str = Field(default="openrft", description="wandb project / mlflow experiment")
    run_name: str | None = Field(default=None, description="default: the run directory's name")
    wandb_mode: Literal["offline", "online"] = "offline"
    mlflow_uri: str | None = Field(default=None, description="default: a file store in RUN_DIR/mlruns")


class TraceConfig(_Section):
    """OpenTelemetry traces from env step to trained token (trainer/traces.py; the `otel` extra)."""

    enabled: bool = Field(default=False, description="spans to RUN_DIR/traces.jsonl (the dashboard's timeline)")
    otlp_endpoint: str | None = Field(default=None, description="also export over OTLP/HTTP, e.g. http://host:4318/v1/traces")


class TrainConfig(_Section):
    model: str = Field(description="local transformers model directory")
    init_adapter: str | None = Field(None, description="PEFT adapter to start from (openrft sft's); KL ref: base model")
    dataset: str = Field(description="JSONL, one task a line")
    envs: list[EnvEndpoint] = Field(min_length=1)
    evaluator: str | None = Field(
        default=None, description="trainer-side `module:function`; else the env's reported reward"
    )
    steps: int = Field(default=100, ge=1)
    tasks_per_step: int = Field(default=8, ge=1)
    group_size: int = Field(default=4, ge=1, description="rollouts per task")
    shuffle: bool = True
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    async_: AsyncConfig = Field(default_factory=AsyncConfig, alias="async")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    backend: Literal["transformers", "vllm"] = "transformers"
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    checkpoint_every: int = Field(default=10, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="auto = bfloat16 on a CUDA card that has it, else float32. On a CPU with "
        "avx512_bf16/AMX, bfloat16 matmuls are ~2x faster (the pipelined demo: x1.2-1.5 steps/min; sampling vs "
        "training logprobs differ ~2e-2); elsewhere it is emulated, slower, and the run warns",
    )
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        default="auto", description="auto = eager for bfloat16 on CPU (measured faster there), else the model's default",
    )
    threads: int | None = Field(
        default=None, ge=1,
        description="torch CPU threads. Default on CPU: one less than the CPUs (at least 1), leaving a core to "
        "the gateway, the envs and the generation thread's loop; measured on 2 cores, 2 threads made the first "
        "step's generation 10-30x slower than 1 (threads wait on each other at every op when oversubscribed)",
    )
    run_dir: str = "runs/latest"
    progress: bool = True
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="trackers that also get each step's metrics (the `trackers` extra)")
    trackers: TrackersConfig = Field(default_factory=TrackersConfig)
    trace: TraceConfig = Field(default_factory=TraceConfig)

    @model_validator(mode="after")
    def _groups_fit(self) -> TrainConfig:
        if self.rollout.min_group_size > self.group_size:
            raise ValueError(
                f"rollout.min_group_size ({self.rollout.min_group_size}) exceeds group_size ({self.group_size})"
            )
        if self.async_.max_staleness and self.backend == "vllm":
            raise ValueError("async.max_staleness > 0 needs backend: transformers (the vLLM backend runs "
                             "synchronous steps only)")
        if self.learner.fsdp and self.backend != "vllm":
            raise ValueError(
                "learner.fsdp needs backend: vllm (each rank holds only a shard of the model, so the in-process "
                f"`{self.backend}` backend cannot generate from it; set backend: vllm, or learner.fsdp: false)"
            )
        return self


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown config key {key!r}")
        elif err["type"] == "missing":
            lines.append(f"{source}: missing required config key {key!r}")
        else:
            lines.append(f"{source}: {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _known_keys(model: type[BaseModel], path: list[str]) -> None:
    """Raise ConfigError if the dotted `path` names no field (only checks through sections)."""
    current: Any = model
    for depth, part in enumerate(path):
        fields = current.model_fields if isinstance(current, type) and issubclass(current, BaseModel) else None
        if fields is None:
            return  # inside a list / dict value: pydantic checks the rest
        fields = {f.alias or name: f for name, f in fields.items()}  # `async` is the field async_
        if part not in fields:
            raise ConfigError(f"--set: unknown config key {'.'.join(path[: depth + 1])!r}")
        current = fields[part].annotation


def apply_override(data: dict[str, Any], assignment: str, schema: type[BaseModel] = TrainConfig) -> None:
    """Apply one `a.b=c` override in place; `c` is parsed as a YAML scalar / flow value."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    path = key.strip().split(".")
    _known_keys(schema, path)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                defaults: dict[str, Any] | None = None, schema: type[BaseModel] = TrainConfig) -> Any:
    """Read a YAML/JSON config file (or start empty if `path` is None) and apply `--set` overrides.
    `defaults` fill top-level keys the file and overrides leave out; `schema`: TrainConfig or SftConfig."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        try:
            loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded or {}
    for assignment in overrides:
        apply_override(data, assignment, schema)
        source = f"{source} (with --set)" if "--set" not in source else source
    for key, value in (defaults or {}).items():
        data.setdefault(key, value)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def save_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False))
