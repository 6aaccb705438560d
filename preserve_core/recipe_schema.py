"""The recipe schema: one strict pydantic model per YAML section.

Every model forbids unknown keys, so a typo is an error, never a silently ignored setting.
Method options live with their method (``preserve_core/methods/<name>.py``); the ``method``
section is the union of those, discriminated by ``method.name``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

NAME_MAX = 100  # characters of a name that becomes a folder name (a bench cell joins three of them)
PATH_PART_MAX = 255  # bytes of one path component (the usual file-system limit)


def check_name(value: str) -> str:
    """A name that becomes one folder name: no separators, no ``..``, no NUL, not too long."""
    if not value.strip():
        raise ValueError("must not be empty")
    if len(value) > NAME_MAX:
        raise ValueError(f"is {len(value)} characters long; at most {NAME_MAX}")
    bad = sorted({c for c in value if c in "/\\:" or ord(c) < 32})
    if bad or ".." in value or value.startswith("."):
        shown = ", ".join(repr(c) for c in bad) or "'..' or a leading '.'"
        raise ValueError(
            f"must be a plain folder name (it names a folder inside its parent), but contains {shown}; "
            "use letters, digits, '-', '_' and single dots"
        )
    return value


def check_path_text(value: str) -> str:
    """A path or hub name the file system can take: no NUL, no component over 255 bytes."""
    if "\0" in value:
        raise ValueError("contains a NUL character")
    longest = max((len(part.encode()) for part in value.split("/")), default=0)
    if longest > PATH_PART_MAX:
        raise ValueError(f"has a path component of {longest} bytes; file systems allow at most {PATH_PART_MAX}")
    return value


def _list_to_tuple(value):
    return tuple(value) if isinstance(value, list) else value


Name = Annotated[str, AfterValidator(check_name)]
PathText = Annotated[str, AfterValidator(check_path_text)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="Random seed, 0 .. 2**32 - 1.")]
Beta = Annotated[float, Field(ge=0, lt=1)]


class StrictModel(BaseModel):
    """No unknown keys, no coercion (``true`` is not 1, ``"3"`` is not 3), no inf or nan."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), strict=True, allow_inf_nan=False
    )


class ModelConfig(StrictModel):
    """Which causal LM to fine-tune and how to load it."""

    name_or_path: PathText = Field("lab:tiny", description="Hub name, local directory, or lab:tiny / lab:small / lab:micro.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("float32", description="Weight dtype at load time.")
    attn_implementation: str | None = Field(None, description="eager, sdpa, flash_attention_2 ... (None: transformers' default).")
    gradient_checkpointing: bool = False
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you turn it on.")
    target_modules: list[str] | None = Field(
        None,
        description="Module-name patterns to adapt: a plain name matches a suffix (q_proj), 're:<regex>' a full name. "
        "None: attention and MLP linears of the architecture.",
    )
    train_embeddings: bool = Field(False, description="Also train the token embeddings and LM head (full method only).")


class DataConfig(StrictModel):
    """The new task's training data."""

    train: PathText = Field(..., description="JSONL/JSON/CSV/Parquet path, a hub data set name, or lab:<skill>.")
    eval: PathText | None = Field(None, description="Held-out data for the periodic eval loss (same formats).")
    split: str = Field("train", description="Split to read from a hub data set.")
    eval_split: str = Field("validation", description="Split of data.eval to read when it is a hub data set.")
    subset: str | None = Field(None, description="Hub data set configuration name (e.g. main for openai/gsm8k).")
    format: Literal["auto", "prompt_completion", "text", "messages"] = Field(
        "auto", description="auto: prompt/completion, else messages, else text columns."
    )
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    text_column: str = "text"
    messages_column: str = "messages"
    max_length: int = Field(512, gt=0, description="Tokens per example, special tokens included.")
    truncation: Literal["error", "left", "right"] = Field(
        "error", description="What to do with longer examples: error, or cut (left keeps the end). Always reported."
    )
    max_examples: int | None = Field(None, gt=0, description="Use only the first N examples.")
    append_eos: bool = Field(True, description="Append the EOS token so the model learns to stop.")
    packing: bool = Field(
        False,
        description="Lay each micro-batch's examples end to end in rows no longer than its longest example, "
        "instead of padding every row to it: position ids restart per example and no token attends across "
        "examples (same examples, same loss; fewer rows, less padding).",
    )


class DistributedConfig(StrictModel):
    """How several processes share the work (one process: ignored)."""

    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="ddp: every process holds the whole model; fsdp: parameters, gradients and optimizer state "
        "sharded over processes (FSDP2); auto: fsdp under `accelerate launch` with an FSDP config, else ddp.",
    )
    reshard_after_forward: bool = Field(
        True, description="fsdp: free gathered layer weights after each forward (less memory, one more all-gather)."
    )
    timeout_s: int | None = Field(
        None,
        gt=0,
        description="Seconds a collective (a barrier, an all-reduce) waits for the other processes before the run "
        "fails; None: torch's default (30 minutes; 10 under NCCL). Raise it when one rank works alone for long, e.g. "
        "sampling a large calibration or writing checkpoints to slow storage.",
    )


class TrainingConfig(StrictModel):
    """Optimisation. Steps count optimizer updates (after gradient accumulation)."""

    lr: float = Field(1e-4, gt=0)
    max_steps: int = Field(100, gt=0)
    batch_size: int = Field(8, gt=0, description="Examples per device per micro-batch.")
    grad_accum: int = Field(1, gt=0)
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW's decoupled weight decay: each step moves p by -lr_t * weight_decay * p."
    )
    weight_decay_timescale: float | None = Field(
        None,
        gt=0,
        description="Decay's reach as a fraction of the run, in place of weight_decay: decay = 1 / (lr * "
        "weight_decay_timescale * max_steps), so tau = 1 / (lr * decay), the steps AdamW's weights average the "
        "updates over (Wang & Aitchison, ICML 2025), is this fraction of max_steps at the peak rate. Follows lr "
        "(a bench sweep) and max_steps. None: weight_decay as given.",
    )
    adam_betas: Annotated[tuple[Beta, Beta], BeforeValidator(_list_to_tuple)] = Field(
        (0.9, 0.999), description="Adam (beta1, beta2), each in [0, 1)."
    )
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm (None: no clipping).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast on GPU.")
    seed: Seed = 0
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0, description="Eval loss on data.eval every N steps (0: off).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_last: int = Field(2, gt=0, description="Checkpoints to keep.")
    tensorboard: bool = False
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads torch uses in this process (intra- and inter-op; ppft train/eval/calibrate/bench, "
        "or --threads). None: torch's default (OMP_NUM_THREADS, else one per core). ppft bench --jobs N gives each "
        "worker this many (default: the cores) // N.",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="DDP or FSDP across processes (see training.distributed)."
    )

    @model_validator(mode="after")
    def _one_decay(self) -> TrainingConfig:
        if self.weight_decay_timescale is not None and self.weight_decay > 0:
            raise ValueError(
                f"weight_decay ({self.weight_decay}) and weight_decay_timescale ({self.weight_decay_timescale}) are "
                "both set: keep one (set weight_decay: 0 where a recipe it extends sets it)"
            )
        return self

    @property
    def decay(self) -> float:
        """The weight decay the optimizer applies: ``weight_decay``, or ``1 / (lr * timescale * max_steps)``."""
        if self.weight_decay_timescale is None:
            return self.weight_decay
        return 1.0 / (self.lr * self.weight_decay_timescale * self.max_steps)


class CalibrationConfig(StrictModel):
    """Pretraining-proxy data and activation statistics (``ppft calibrate``)."""

    preserve_source: Literal["sample", "dataset"] = Field(
        "sample", description="sample: draw from the pretrained model; dataset: label-free text in preserve_data."
    )
    preserve_data: PathText | None = Field(
        None, description="Text data (column 'text') when preserve_source is dataset; num_samples rows drawn at random (seed)."
    )
    num_samples: int = Field(256, gt=0)
    batch_size: int = Field(32, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    start: Literal["bos", "prompts", "uniform"] = Field("bos", description="How a sample starts.")
    seed_prompts: list[str] = Field(default_factory=list, description="Start texts when start is prompts.")
    seed: Seed = 0
    min_new_tokens: int = Field(4, ge=0, description="Drop samples shorter than this (degenerate filter).")
    max_repeat_fraction: float = Field(
        0.5, gt=0, le=1, description="Drop samples whose most frequent token exceeds this fraction (degenerate filter)."
    )
    task_positions: Literal["loss", "all", "balanced"] = Field(
        "loss",
        description="Task statistics (C_t, FoLoRA) over the loss positions, all positions, or balanced (ours): "
        "(C_loss + C_all) / 2, so a short answer and its prompt each count half.",
    )
    max_task_examples: int | None = Field(512, gt=0)
    stats_batch_size: int = Field(16, gt=0)
    stats_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Most GB (1e9 bytes) the statistics' running sums may hold on the device at once; when all "
        "layer inputs' sums need more, the inputs are split into groups, one pass over the calibration data per "
        "group (each stopping after its group's last layer). None: 3/4 of the free GPU memory on CUDA, no limit "
        "elsewhere. Same statistics whatever the value (not part of the calibration identity). Also bounds the "
        "float32 task gradients of method init: gradient (one forward and backward of its rows per group).",
    )
    fisher_samples: int = Field(256, gt=0, description="Preserve sequences for the EWC Fisher.")
    kl_topk: int = Field(32, gt=0, description="Top-k base log-probs cached for the kl method.")
    dir: PathText | None = Field(None, description="Where calibration output lives (default <output.dir>/calibration).")

    @model_validator(mode="after")
    def _source_needs_data(self) -> CalibrationConfig:
        if self.preserve_source == "dataset" and not self.preserve_data:
            raise ValueError("preserve_source is 'dataset' but preserve_data is not set: give a text file")
        if self.start == "prompts" and not self.seed_prompts:
            raise ValueError("start is 'prompts' but seed_prompts is empty: list some start texts")
        return self


class EvalTask(StrictModel):
    """One evaluation task."""

    name: str = Field(..., min_length=1, description="Row name in the report (unique across target and preserve).")
    kind: Literal["exact_match", "multiple_choice", "perplexity", "kl_to_base", "lm_eval"]
    data: PathText | None = Field(None, description="Path or lab:<skill> (its eval split). Not used by lm_eval.")
    limit: int | None = Field(None, gt=0, description="Evaluate the first N examples.")
    max_new_tokens: int = Field(32, gt=0, description="exact_match: generation budget.")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="exact_match: cut the generation at these.")
    normalize: list[Literal["strip", "lower", "collapse_whitespace", "strip_punctuation"]] = Field(
        default_factory=lambda: ["strip"]
    )
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm_eval: task names.")
    lm_eval_include_path: PathText | None = Field(None, description="lm_eval: folder of local task YAMLs.")


class EvalConfig(StrictModel):
    """Target and preserve suites for ``ppft eval``."""

    target: list[EvalTask] = Field(default_factory=list)
    preserve: list[EvalTask] = Field(default_factory=list)
    batch_size: int = Field(64, gt=0)
    every_n_steps: int = Field(0, ge=0, description="Run the preserve suite during training every N steps.")
    fail_on_regression: float | None = Field(
        None, ge=0, description="Fail (exit 3) if a preserved task drops by more than this many points."
    )


class BenchTask(StrictModel):
    """A new task for the comparison: train on ``train``, score exact match on ``eval``."""

    name: Name
    train: PathText = Field(..., description="Training data (path or lab:<skill>).")
    eval: PathText = Field(..., description="Exact-match eval data (path, or lab:<skill> for its eval split).")
    max_new_tokens: int = Field(16, gt=0)
    limit: int | None = Field(None, gt=0, description="Score the first N eval examples.")
    held_out: bool = Field(
        False, description="Not used to pick each method's learning rate; reported apart ('tuned on' vs 'held out')."
    )


class _RowTrainingBase(StrictModel):
    @model_validator(mode="before")
    @classmethod
    def _not_swept(cls, data):
        swept = sorted({"lr", "seed"} & set(data)) if isinstance(data, dict) else []
        if swept:
            raise ValueError(f"{', '.join(swept)} cannot be set here: the row's lrs and bench.seeds set them")
        return data

    def settings(self) -> dict:
        """The keys the row sets, as plain JSON values."""
        return self.model_dump(mode="json", exclude_unset=True)


def _as_override(field) -> tuple:
    """A ``TrainingConfig`` field as an optional override with the same bounds."""
    annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return (annotation | None, Field(None, description=field.description))


# TrainingConfig's fields but lr and seed, each optional: what a bench row may set for its own cells
RowTraining = create_model(
    "RowTraining",
    __base__=_RowTrainingBase,
    **{name: _as_override(f) for name, f in TrainingConfig.model_fields.items() if name not in ("lr", "seed")},
)


class BenchMethod(StrictModel):
    """One method of the comparison and its learning-rate sweep."""

    label: Name | None = Field(None, description="Row label (default: method.name).")
    method: dict = Field(..., description="A method section, e.g. {name: fora, rank: 8}.")
    lrs: list[Annotated[float, Field(gt=0)]] = Field(..., min_length=1, description="Learning rates to sweep.")
    training: RowTraining = Field(
        default_factory=RowTraining,
        description="Training settings for this row only, over the recipe's (e.g. {weight_decay: 1.0}); "
        "not lr or seed, which come from lrs and bench.seeds.",
    )


class BenchConfig(StrictModel):
    """``ppft bench``: every method x learning rate x task x seed, trained and evaluated the same way."""

    methods: list[BenchMethod] = Field(default_factory=list)
    tasks: list[BenchTask] = Field(default_factory=list)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    kl_data: PathText | None = Field(None, description="Prompts for the KL-to-base column (path or lab:<skill>).")
    kl_limit: int = Field(64, gt=0)
    out_dir: PathText = Field("bench", description="Results folder (results.json, results.md, pareto.png, cells/).")


class OutputConfig(StrictModel):
    """Where a run writes and what it exports."""

    dir: PathText | None = Field(None, description="Run directory (default ./runs/<recipe name>).")
    merge: bool = Field(False, description="Also save merged full weights for adapter methods.")
    overwrite: bool = Field(False, description="Allow writing into a run directory that holds a finished run.")
