"""Metric and run-record keys, defined once and used by the module, loggers, sweeps and reports."""

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_TOKENS_PER_S = "train/tokens_per_s"  # real (non-padding) tokens per second of training
TRAIN_TOKENS = "train/tokens"  # real tokens seen in training
TRAIN_SUPERVISED_TOKENS = "train/supervised_tokens"
TRAIN_TIME_S = "train/time_s"
TRAIN_LOOP_S = "time/train_loop_s"  # first training step start -> last step end, per-step overhead included
FIRST_STEP_S = "time/first_step_s"  # process start (imports, data, weights) -> end of the first training step

# compute accounting of the training steps run (lora_exp.training.callbacks.Throughput), all ranks together
COMPUTE_TOKENS_REAL = "compute/tokens_real"  # non-padding tokens of the training micro-batches
COMPUTE_TOKENS_SUPERVISED = "compute/tokens_supervised"  # positions whose next token the loss scores
COMPUTE_TRAIN_FLOPS = "compute/train_flops"  # analytic matmul FLOPs, forward + backward (lora_exp.planning.flops)
COMPUTE_WALL_S = "compute/wall_s"  # training loop wall time (first step start -> last step end, resumes summed)
COMPUTE_DEVICE_HOURS = "compute/device_hours"  # compute/wall_s x devices (processes) / 3600
COMPUTE_PEAK_MEM_MB = "compute/peak_mem_mb"  # CUDA allocator peak on GPU, peak resident set size on CPU (MiB)
COMPUTE_MFU = "compute/mfu"  # train FLOPs / (step time x the GPU's peak FLOP/s); GPU runs only

VAL_LOSS = "val/loss"  # mean cross-entropy over supervised held-out tokens
VAL_PPL = "val/ppl"
VAL_EXACT_MATCH = "val/exact_match"  # fraction of held-out responses reproduced token for token
VAL_TOKEN_ACC = "val/token_acc"

VAL_METRICS = (VAL_LOSS, VAL_PPL, VAL_EXACT_MATCH, VAL_TOKEN_ACC)
VAL_PREFIX = "val/"  # data.eval_sets.<name> is recorded as val/<name>/loss, ... (eval_set())

BASE_PREFIX = "base/"  # the same validation metrics, measured on the base model before training

TRAINABLE_PARAMS = "trainable_params"
TOTAL_PARAMS = "total_params"
LORA_SCALING = "lora/scaling"
STEPS = "trainer/global_step"
WORLD_SIZE = "trainer/world_size"  # processes that trained together (DDP/FSDP ranks)
STATUS = "status"
ERROR = "error"

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_INTERRUPTED = "interrupted"
CHECKPOINT_SELECT = "checkpoint/select"  # last or best: which step adapter/ holds (training/selection.py)
SELECTED_STEP = "checkpoint/selected_step"  # the optimizer step of the weights in adapter/
FINAL_STEP = "checkpoint/final_step"  # the last optimizer step trained
LAST_PREFIX = "last/"  # with checkpoint.select=best: the last step's metrics, when another step was selected
STOP_REASON = "stop_reason"  # why a run ended early, when it did
STOP_NON_FINITE_LOSS = "non_finite_loss"

# the data set a run trained on (lora_exp.data.datamodule: InstructionDataModule.stats)
DATA_FORMAT = "data/format"  # chat, alpaca, prompt_response or text (what data.format=auto detected)
DATA_TRAIN_EXAMPLES = "data/train_examples"
DATA_VAL_EXAMPLES = "data/val_examples"
DATA_TRAIN_TOKENS = "data/train_tokens"  # tokens in the training set after truncation
DATA_TRUNCATED = "data/truncated"  # examples cut at data.max_seq_len (train + held-out)
DATA_DROPPED = "data/dropped"  # examples left with no supervised token, not used
DATA_PACKING = "data/packing"
DATA_BATCHING = "data/batching"  # packed (token budget), padding_free (batch_size examples, one row) or padded
DATA_PADDING_FRACTION = "data/padding_fraction"  # padding share of the first epoch's training batches
DATA_FINGERPRINT = "data/fingerprint"  # sha256 of examples + chat template + tokenizer + settings

BEST_PREFIX = "best/"  # the best value a metric reached during the run (see GOALS for the direction)

# which way is better, for "best" summaries, Optuna objectives and bold table cells
GOALS = {
    TRAIN_LOSS: "min",
    VAL_LOSS: "min",
    VAL_PPL: "min",
    VAL_EXACT_MATCH: "max",
    VAL_TOKEN_ACC: "max",
    TRAIN_TOKENS_PER_S: "max",
}

# where the run's W&B run lives (metrics.json), so a report can find it again
WANDB_RUN_ID = "wandb/run_id"
WANDB_GROUP = "wandb/group"
WANDB_PROJECT = "wandb/project"
WANDB_MODE = "wandb/mode"

# the numeric run-record keys a sweep report aggregates over seeds (those a run has)
REPORT_METRICS = (
    *VAL_METRICS,
    *(BEST_PREFIX + k for k in VAL_METRICS),
    *(BASE_PREFIX + k for k in VAL_METRICS),
    TRAIN_LOSS,
    TRAIN_TOKENS_PER_S,
    TRAIN_TIME_S,
    TRAINABLE_PARAMS,
    TOTAL_PARAMS,
    LORA_SCALING,
    STEPS,
)


def base(key: str) -> str:
    """The key under which a validation metric of the untrained base model is recorded."""
    return BASE_PREFIX + key


def best(key: str) -> str:
    """The key under which the best value of a metric during the run is recorded."""
    return BEST_PREFIX + key


def goal(key: str) -> str | None:
    """Which way is better for ``key`` (``"min"`` or ``"max"``, ``best/`` values included); None if neither."""
    return GOALS.get(eval_set_metric(key.removeprefix(BEST_PREFIX)))


def eval_set(name: str, key: str) -> str:
    """The key of validation metric ``key`` (``val/loss``, ...) measured on the named set ``data.eval_sets.<name>``.

    ``eval_set("probe", VAL_PPL) == "val/probe/ppl"``; the base model's is ``base(eval_set(...))``.
    """
    return f"{VAL_PREFIX}{name}/{key.removeprefix(VAL_PREFIX)}"


def eval_set_metric(key: str) -> str:
    """The held-out metric an eval-set key measures (``val/probe/ppl`` -> ``val/ppl``); other keys unchanged."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] + "/" == VAL_PREFIX and f"{VAL_PREFIX}{parts[2]}" in VAL_METRICS:
        return f"{VAL_PREFIX}{parts[2]}"
    return key
