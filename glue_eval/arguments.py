"""glue-eval's arguments: ``TrainingArguments`` (the names users know: ``--learning_rate``,
``--per_device_train_batch_size``, ``--fp16`` ...) with a few defaults changed for grids, plus
:class:`GlueArguments` for what Trainer has no name for, and ``--precision`` onto Trainer's flags."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from distill.common.errors import UsageError
from distill.objective import terms
from distill.objective.settings import task_settings_class
from distill.settings.config import DistillConfig

# the recipe's settings that the task stage shares (declared once, with task=True): --temperature, --layer_map
TaskSettings = task_settings_class(DistillConfig)


@dataclass
class GlueArguments(TaskSettings):
    """What the run needs beyond Trainer's own arguments; the objective settings the task stage shares with
    distill-train (``--temperature``, ``--layer_map``) are inherited from their one declaration."""

    model: str | None = field(default=None, metadata={"help": "Model folder or hub id to fine-tune."})
    task: str | None = field(default=None, metadata={
        "help": "CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI, 'all', a comma list, or a task spec .json."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Local GLUE folder (original TSV download or hub-layout parquet/CSV). Default: the hub, nyu-mll/glue."})
    grid: str | None = field(default=None, metadata={
        "help": "Grid spec JSON (tasks x learning rates x batch sizes x seeds), or 'default' for the seed report's."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder or id, if the model has none."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated (tokens)."})
    predict_test: bool = field(default=False, metadata={
        "help": "Also write test-set predictions in GLUE's submission format (<TASK>.tsv)."})
    save_model: bool = field(default=False, metadata={
        "help": "Save the fine-tuned model and tokenizer in <cell>/model (e.g. a teacher for --teacher)."})
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "Drop TSV rows with the wrong column count (counted on stderr) instead of stopping."})
    teacher: str | None = field(default=None, metadata={
        "help": "A fine-tuned teacher folder: adds distillation terms while fine-tuning (TinyBERT's 2nd stage)."})
    distill_weights: str = field(default=json.dumps(terms.TASK_WEIGHTS), metadata={
        "help": f"JSON weights of the --teacher terms: {terms.term_list(terms.level_terms(sequence_level=True))}."})
    student_layers: str | None = field(default=None, metadata={
        "help": "Teacher layers the student was built from, e.g. 1,5,8,12: the layer map of "
                f"{'/'.join(terms.select(layers='map', sequence_level=True))}."})
    precision: str = field(default="auto", metadata={
        "choices": ["auto", "fp32", "bf16", "fp16"],
        "help": "auto (default): bf16 on a CPU with avx512_bf16/amx_bf16 or a GPU with native bf16, fp16 on an older "
                "GPU, fp32 on other CPUs (where bf16 is emulated and slow); or fp32, bf16, fp16. Sets Trainer's "
                "bf16/fp16 flags; an explicit --bf16 or --fp16 stands."})
    stages: str | None = field(default=None, metadata={
        "help": "--teacher stages run in order (TinyBERT: intermediate terms, then prediction terms), JSON or a .json "
                "file: '[{\"weights\": {\"hid_mse\": 1, \"att_mse\": 1}, \"epochs\": 10}, "
                "{\"weights\": {\"kl\": 1}, \"epochs\": 3}]'; replaces --distill_weights."})
    augment: int = field(default=0, metadata={
        "help": "--teacher: N variants of every training example with words replaced (TinyBERT), labelled by the "
                "teacher; hard_ce counts on the original examples only."})
    augment_model: str | None = field(default=None, metadata={
        "help": "Masked-LM folder giving --augment's candidate words (default: the teacher's own MLM head if it "
                "has one, else nearest neighbours in the teacher's input embeddings)."})
    augment_probability: float = field(default=0.4, metadata={"help": "Chance that --augment replaces a word."})
    augment_candidates: int = field(default=15, metadata={"help": "Candidates per word for --augment (top K)."})
    unlabelled_file: str | None = field(default=None, metadata={
        "help": "--teacher: extra in-domain text the teacher labels (.txt one example per line, a tab between the "
                "texts of a pair; or a table with the task's text columns); only soft terms count on it."})
    teacher_weights: str | None = field(default=None, metadata={
        "help": "Several teachers (--teacher A --teacher B): their weights, e.g. 0.7,0.3 (normalised; default equal), or "
                "entropy (per example, softmax over the teachers of minus their entropy: the surer weighs more); "
                "the student learns from the weighted mixture of their soft targets, and a representation term is "
                "the weighted sum of each teacher's own through its own layer map (glue_eval.teachers)."})
    other_teachers: str | None = field(default=None, metadata={
        "help": "The second and later teachers, comma-separated (what repeating --teacher sets)."})
    teacher_gate: str = field(default="none", metadata={
        "choices": ["none", "softmax", "top1"],
        "help": "Several teachers: weigh them per example (per window for extractive QA) with a gating network "
                "trained on the mixture's task loss plus --gate_balance x the load-balancing loss (softmax; top1: "
                "one teacher per example) "
                "instead of fixed --teacher_weights (glue_eval.gate)."})
    gate_layers: str = field(default="1", metadata={"help": "Layers of the first teacher that the gate's encoder keeps."})
    gate_balance: float = field(default=0.1, metadata={
        "help": "Weight of the gate's load-balancing loss (CV^2 of the teachers' importance; 0: none)."})
    gate_epochs: float = field(default=3, metadata={"help": "Epochs of gate training, before the student's."})
    gate_learning_rate: float = field(default=1e-3, metadata={"help": "The gate's AdamW learning rate."})
    teacher_cache: bool = field(default=True, metadata={
        "help": "Compute the teacher's outputs once per training example (logits always; representations within "
                "--teacher_cache_mb)."})
    teacher_cache_mb: float = field(default=2048, metadata={
        "help": "Largest float32 size (MiB) of cached teacher representations; over it they are recomputed."})
    # extractive QA (--task squad, squad_v2 or an extractive_qa spec; glue_eval.qa)
    doc_stride: int = field(default=128, metadata={
        "help": "QA: tokens shared by consecutive windows of a long context (transformers' run_qa: 128 of 384)."})
    max_answer_length: int = field(default=30, metadata={"help": "QA: longest answer span decoded, in tokens."})
    n_best_size: int = field(default=20, metadata={
        "help": "QA: the highest start and end logits of each window that pair into candidate spans."})
    null_score_diff_threshold: float = field(default=0.0, metadata={
        "help": "QA, SQuAD v2: answer nothing when the null score beats the best span's by more than this."})
    eval_files: list[str] | None = field(default=None, metadata={
        "help": "QA: out-of-domain SQuAD-format files also evaluated, one dev entry per file (named by its stem)."})


@dataclass
class GlueTrainingArguments(TrainingArguments):
    """TrainingArguments with grid-friendly defaults; every Trainer flag still works."""

    # A grid of 162 runs must not leave 162 sets of checkpoints behind; --save_model keeps the final one.
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy (no, steps, epoch, best)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Batch size per device for evaluation."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N update steps."})
    length_groups: int = field(default=1, metadata={
        "help": "Run each training batch as up to N groups of rows of similar length, each trimmed to its own "
                "longest row, so the models compute on less padding (student and teacher; the loss is the "
                "batch's, up to float rounding). 1: one forward per batch. See docs/speed.md."})

    def __post_init__(self):
        if self.length_groups < 1:
            raise UsageError(f"--length_groups {self.length_groups}: give 1 (one forward per batch) or more")
        super().__post_init__()


def apply_precision(glue: GlueArguments, args: TrainingArguments) -> tuple[TrainingArguments, str | None]:
    """``--precision`` onto Trainer's ``bf16``/``fp16`` flags; returns the arguments and the line to print.

    ``auto`` asks :func:`distill.common.hardware.resolve_auto_precision` (the one decision the
    distillation engine uses too) about the device the Trainer will use. Trainer's own
    ``--bf16``/``--fp16`` stand when given; with an explicit ``--precision`` they must agree.
    """
    import dataclasses

    from distill.common.hardware import choose_precision

    given = "bf16" if args.bf16 else "fp16" if args.fp16 else None
    if given:
        if glue.precision not in ("auto", given):
            raise UsageError(f"--precision {glue.precision} disagrees with Trainer's --{given}: give one of them")
        return args, None
    device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    chosen, _, line = choose_precision(glue.precision, "O2", device)
    if chosen not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"--precision {glue.precision!r}: choose auto, fp32, bf16 or fp16")
    if chosen == "fp32":
        return args, line
    # replace() re-runs TrainingArguments' own checks and derives its mixed-precision setting from the flag;
    # on a CPU those checks want use_cpu with bf16, which is where the run goes anyway.
    changes = {"bf16": chosen == "bf16", "fp16": chosen == "fp16", **({"use_cpu": True} if device == "cpu" else {})}
    try:
        return dataclasses.replace(args, **changes), line
    except ValueError as err:
        raise UsageError(f"--precision {glue.precision} -> {chosen}: {str(err).splitlines()[0]}") from None


def precision_check(args: TrainingArguments) -> None:
    """fp16 is a CUDA mode: on a CPU it crawls or fails deep inside torch, so say so up front."""
    if args.fp16 and not torch.cuda.is_available():
        raise UsageError("--fp16 needs a CUDA GPU and none is visible: drop it, or on a CPU use --bf16 --use_cpu")


