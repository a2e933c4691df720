"""The configuration schema: environment (defaults.yaml) + experiment recipe, one validated tree.

Every section forbids unknown keys, so a typo is an error rather than a silently ignored setting.
Field names of the original project's verifiable recipe (`stage2.value_loss`,
`stage2.value_weighting`) are kept with their meaning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ----------------------------------------------------------------------------- environment


class PathsConfig(Section):
    """Where things live. Relative paths are resolved against the working directory."""

    storage: Path = Path("storage")
    models: Path = Path("storage/models")
    datasets: Path = Path("storage/datasets")
    runs: Path = Path("storage/runs")
    raw_data: Path = Field(
        Path("../shared/data"),
        description="Offline copies of the raw benchmark files (mbpp/, humaneval/, codecontests/).",
    )
    rollouts: Path = Field(
        Path("storage/rollouts"), description="Labelled model samples (`wmtp rollout`): the rollouts dataset's raw files."
    )


class TrackingConfig(Section):
    enabled: bool = True
    uri: str = Field("sqlite:///storage/mlruns/mlflow.db", description="MLflow tracking URI.")
    experiment: str = "weighted-mtp"
    register_model: bool = Field(True, description="Register the final model when the store supports it.")


class S3Config(Section):
    """Checkpoints and artifacts are mirrored to s3://bucket/prefix when a bucket is set."""

    bucket: str | None = None
    prefix: str = "weighted-mtp"
    endpoint_url: str | None = None
    region: str | None = None


class DistributedConfig(Section):
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    reshard_after_forward: bool = True
    param_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    checkpoint_format: Literal["full", "sharded"] = "full"
    timeout_s: int = Field(600, gt=0, description="Collective timeout: a dead rank ends the job after this.")


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    every_n_steps: int = Field(10, gt=0)
    progress_bar: Literal["auto", "always", "never"] = "auto"


# ----------------------------------------------------------------------------- recipe


class ExperimentConfig(Section):
    name: str = "baseline"
    pipeline: Literal["baseline", "critic", "verifiable", "rho1", "ref_tuning", "grad_norm"] = "baseline"
    description: str = ""


class ValueHeadConfig(Section):
    type: str = Field("mlp", description="A value head type: linear, mlp.")
    hidden_size: int | None = Field(None, gt=0, description="MLP width; default the model width.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m",
        description="A named model (smollm2-135m, micro) or a path: Meta MTP dir, HF dir, .gguf file, native checkpoint.",
    )
    n_future_tokens: int = Field(4, ge=1, le=16)
    extra_heads_init: Literal["copy", "random"] = "copy"
    activation_checkpointing: bool = False
    compile: bool = Field(
        False,
        description="torch.compile each transformer block for training (faster steps; the first step "
        "and each new batch shape compile first).",
    )
    value_head: ValueHeadConfig | None = None
    tokenizer: str | None = Field(None, description="Tokenizer path when it is not beside the weights.")


class DataConfig(Section):
    dataset: str = "mbpp"
    split: str = "train"
    val_split: str | None = "validation"
    max_length: int = Field(512, ge=8)
    prompt_template: Literal["alpaca", "chat", "mbpp_fewshot"] = "alpaca"
    sampler: Literal["all", "correct_only", "difficulty_weighted", "pairs", "length_balanced_pairs"] = (
        "correct_only"
    )
    n_samples: int | None = Field(None, gt=0, description="Solutions drawn per epoch; all when unset.")
    max_pairs_per_problem: int = Field(4, gt=0)
    difficulty_bins: list[int] = Field(default_factory=lambda: [0, 3, 7, 11])
    difficulty_weights: list[float] = Field(default_factory=lambda: [0.25, 0.35, 0.25, 0.15])
    length_bin_size: int = Field(32, gt=0)
    pack: bool = False
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _bins_match_weights(self) -> DataConfig:
        if len(self.difficulty_bins) != len(self.difficulty_weights):
            raise ValueError(
                f"data.difficulty_bins has {len(self.difficulty_bins)} entries but "
                f"data.difficulty_weights has {len(self.difficulty_weights)}"
            )
        return self


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])


TrainMode = Literal["train", "lora", "frozen"]


class FreezeConfig(Section):
    """How each part is trained: fully, through LoRA adapters, or not at all."""

    trunk: TrainMode = "train"
    heads: TrainMode = "train"
    value_head: TrainMode = "train"
    unembedding: Literal["as_heads", "frozen"] = Field(
        "as_heads",
        description="frozen: the final norm and the unembedding (a tied embedding with it, unless the trunk trains) "
        "take no gradient whatever `heads` says, so heads trained on a frozen trunk (Medusa-1's self-distillation) "
        "leave the model's own next-token path to its head blocks.",
    )
    trunk_steps: int | None = Field(
        None, ge=1,
        description="Keep the trunk frozen for the first N optimizer steps, then train it as `trunk` says: new heads "
        "learn first (Medusa-1's recipe) instead of pulling the shared trunk towards their early errors.",
    )


class EarlyStoppingConfig(Section):
    metric: str | None = Field(None, description="A logged validation metric, e.g. val/loss.")
    mode: Literal["min", "max"] = "min"
    patience: int = Field(3, gt=0)


class TrainingConfig(Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    max_steps: int | None = Field(None, gt=0)
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(4, gt=0, description="Micro-batch per rank.")
    grad_accum_steps: int = Field(1, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    loss_chunk_size: int = Field(1024, gt=0, description="Positions per cross-entropy chunk.")
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, gt=0)
    max_nonfinite_in_a_row: int = Field(5, gt=0)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)


class WeightingConfig(Section):
    """Token weighting: `uniform` (baseline), `critic` (TD/GAE advantages), `rho1` (excess loss),
    `grad_norm` (the norm of each token's loss gradient)."""

    scheme: Literal["uniform", "critic", "rho1", "grad_norm"] = "uniform"
    head_discount: float = Field(
        1.0, gt=0, le=1, description="Weight of head k is head_discount**(k-1), as MTP papers weight far heads less."
    )


class Stage1Config(Section):
    """Critic pre-training: the value head learns to predict whether a solution passes."""

    enabled: bool = False
    steps: int | None = Field(None, gt=0, description="The critic run's training.max_steps, when set.")
    lr: float | None = Field(None, gt=0, description="The critic run's training.lr, when set.")
    loss: Literal["mse", "bce", "pairwise"] = Field(
        "mse",
        description="mse or bce against each solution's reward, or pairwise: Bradley-Terry on same-problem "
        "pairs (data.sampler: pairs) only.",
    )
    pairwise_coefficient: float = Field(
        0.0, ge=0, description="With mse or bce: add this times the pairwise loss (needs data.sampler: pairs)."
    )
    reward_on: Literal["last_token", "every_token"] = "every_token"
    targets: Literal["reward", "lambda_return"] = Field(
        "reward",
        description="reward: every step regresses onto R; lambda_return: onto the lambda-return of the head's own "
        "values (stage2.value_weighting.gae_gamma / gae_lambda).",
    )


class ValueLossConfig(Section):
    enabled: bool = True
    coefficient: float = Field(0.5, ge=0)
    clip_range: float | None = Field(0.2, gt=0, description="PPO-style value clipping around the old values.")
    old_values_refresh_every: int | None = Field(
        None,
        ge=1,
        description="Copy the value head into the frozen old-value snapshot every N optimizer steps; "
        "null: never (the loaded critic stays the reference).",
    )


class ValueWeightingConfig(Section):
    scorer: Literal["gae", "critic_delta"] = Field(
        "gae", description="gae: GAE advantages; critic_delta: V(s_{t+1}) - V(s_t), the value change a token causes."
    )
    gae_gamma: float = Field(1.0, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    td_error_normalization: Literal["zscore", "none", "ema"] = Field(
        "zscore",
        description="zscore: over the micro-batch's steps; ema: with running statistics (ema_momentum), "
        "the batch's own for the first ema_warmup training micro-batches; none.",
    )
    statistics: Literal["step", "micro_batch"] = Field(
        "step",
        description="step: z-score and mean-1 over the whole optimizer step (every micro-batch and rank; one "
        "extra forward of the trunk per micro-batch); micro_batch: over each micro-batch alone.",
    )
    ema_momentum: float = Field(0.99, ge=0, lt=1)
    ema_warmup: int = Field(10, ge=0, description="Training micro-batches z-scored by their own statistics first.")
    transform: Literal["exp", "softmax"] = Field(
        "exp", description="exp: exp(s / beta); softmax: L * softmax(s / beta) over each sequence's L tokens."
    )
    weight_temperature: float = Field(1.0, gt=0, description="beta in exp(A / beta).")
    weight_clip_min: float = Field(0.1, ge=0)
    weight_clip_max: float = Field(3.0, gt=0)
    weight_normalization: Literal["mean1", "none"] = Field(
        "mean1", description="mean1: after clipping, rescale the batch's weights to mean 1 (the loss keeps its scale)."
    )

    @model_validator(mode="after")
    def _clip_order(self) -> ValueWeightingConfig:
        if self.weight_clip_min > self.weight_clip_max:
            raise ValueError(
                f"stage2.value_weighting.weight_clip_min ({self.weight_clip_min}) is above "
                f"weight_clip_max ({self.weight_clip_max})"
            )
        return self


class Stage2Config(Section):
    """Weighted MTP training with a critic, and continual value learning."""

    critic_checkpoint: str | None = None
    value_loss: ValueLossConfig = Field(default_factory=ValueLossConfig)
    value_weighting: ValueWeightingConfig = Field(default_factory=ValueWeightingConfig)


class Rho1Config(Section):
    """Rho-1 selection (Lin et al. 2024): train on tokens whose loss exceeds the reference model's."""

    reference_model: str | None = Field(None, description="Path or named model; the ref_tuning output by default.")
    selection: Literal["top_k", "soft"] = "top_k"
    top_k_ratio: float = Field(0.6, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    per_head: bool = Field(True, description="Select per head rather than by head-1 excess loss.")
    statistics: Literal["step", "micro_batch"] = Field(
        "step",
        description="step: select over every micro-batch and rank of the optimizer step (the reference runs once "
        "per micro-batch, before the backward passes); micro_batch: over each micro-batch alone.",
    )


class GradNormConfig(Section):
    """grad_norm weighting: a token's score is the norm of its cross-entropy's gradient at the
    unembedding's input; scores are normalised and transformed over each micro-batch, head by head."""

    normalization: Literal["zscore", "none"] = Field("zscore", description="zscore: over the head's targets in the micro-batch.")
    transform: Literal["exp", "softmax"] = Field(
        "exp", description="exp: exp(s / temperature); softmax: L * softmax(s / temperature) over each row's L targets."
    )
    temperature: float = Field(1.0, gt=0)
    clip_min: float = Field(0.1, ge=0)
    clip_max: float = Field(3.0, gt=0)
    weight_normalization: Literal["mean1", "none"] = Field(
        "mean1", description="mean1: after clipping, rescale each head's weights to mean 1 over its targets."
    )

    @model_validator(mode="after")
    def _clip_order(self) -> GradNormConfig:
        if self.clip_min > self.clip_max:
            raise ValueError(f"grad_norm.clip_min ({self.clip_min}) is above clip_max ({self.clip_max})")
        return self


class RolloutConfig(Section):
    """Verifiable rollouts: sample solutions, execute them, label them by their tests."""

    n_samples: int = Field(8, gt=0)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(256, gt=0)
    timeout_s: float = Field(5.0, gt=0)


class EvaluationConfig(Section):
    benchmark: str = "mbpp"
    split: str = "test"
    n_samples: int = Field(1, gt=0)
    k: list[int] = Field(default_factory=lambda: [1])
    temperature: float = Field(0.2, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(256, gt=0)
    limit: int | None = Field(None, gt=0, description="Evaluate the first N problems only.")
    timeout_s: float = Field(10.0, gt=0)
    workers: int | None = Field(None, gt=0, description="Sandbox workers; default the number of cores.")
    speculative: bool = False


SCHEME_OF_PIPELINE = {"baseline": "uniform", "ref_tuning": "uniform", "critic": "uniform", "verifiable": "critic",
                      "rho1": "rho1", "grad_norm": "grad_norm"}


class Config(Section):
    """The resolved configuration of one run."""

    # environment (configs/defaults.yaml)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # sampling in `wmtp eval` and `wmtp rollout`; auto: bf16 where the device computes it natively
    generation_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 42
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    s3: S3Config = Field(default_factory=S3Config)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    # recipe (configs/recipe.*.yaml)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    rho1: Rho1Config = Field(default_factory=Rho1Config)
    grad_norm: GradNormConfig = Field(default_factory=GradNormConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _stage1_is_the_critic_run(self) -> Config:
        """The critic pipeline is stage 1: stage1.steps / stage1.lr, when set, are its max_steps / lr."""
        if self.experiment.pipeline == "critic":
            if self.stage1.steps is not None:
                self.training.max_steps = self.stage1.steps
            if self.stage1.lr is not None:
                self.training.lr = self.stage1.lr
        return self

    @model_validator(mode="after")
    def _weighting_scheme_fits_the_pipeline(self) -> Config:
        """Each pipeline weighs tokens one way; a scheme it would ignore is a mistake, not a setting."""
        expected = SCHEME_OF_PIPELINE[self.experiment.pipeline]
        if self.weighting.scheme != expected:
            raise ValueError(
                f"weighting.scheme is {self.weighting.scheme!r} but experiment.pipeline "
                f"{self.experiment.pipeline!r} weighs tokens by {expected!r}; set weighting.scheme={expected}"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return self.paths.runs / self.experiment.name
