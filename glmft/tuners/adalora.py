"""AdaLoRA through PEFT: LoRA in SVD form whose rank budget moves to the matrices that matter while training.

Each adapted matrix W gets ``P diag(E) Q`` (PEFT: ``lora_B``, ``lora_E``, ``lora_A``) with ``init_r`` triplets,
scaled by ``lora_alpha / init_r``; the targets are the model family's LoRA targets (query_key_value on ChatGLM v1).
PEFT's ``update_and_allocate(step)`` scores every triplet from ``|parameter x gradient|`` (smoothed by ``beta1``,
its uncertainty by ``beta2``) and zeroes the singular values of the least important ones until ``target_r`` per
matrix are left on average (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").
The schedule spans the run: ``--adalora_tinit`` of its steps at the full rank, a cubic budget decrease with a
reallocation every ``--adalora_delta_t`` steps, then ``--adalora_tfinal`` of them at the final budget. The orthogonality
penalty on P and Q (``orth_reg_weight``) is added to the loss by PEFT's forward whenever labels give one.

The training loop calls :func:`on_step` after each step's last backward and before DeepSpeed's step (which zeroes
the gradients); glmft.optim hands it the whole gradients and writes the masked singular values into the optimizer's
master copy under ZeRO-1/2. The optimizer step that follows moves a masked value by about one learning rate; the next
step masks it again, and checkpoints keep only the allocated triplets (PEFT cuts its state by ``rank_pattern``, which
:func:`load_weights` reads back to cut the fresh model the same way).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import AdaLoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from chatglm.quantization import is_quantized
from glmft import families, optim
from glmft.args import opt
from glmft.tuners import peft_adapter
from glmft.tuners.base import freeze_all

NAME = "adalora"
# The AdaLoRA paper's rates are 5e-4 to 1.2e-3 (DeBERTaV3 on GLUE, BART on summarisation); above LoRA's 2e-4, as the
# singular values start at zero and the budget decisions need the triplets to have learnt something by tinit.
DEFAULT_LR = 5e-4
ADAPTER = "default"  # PEFT's adapter name
# total_step for a model built outside a training run (dry run, estimate, predict of an old checkpoint): AdaLoraConfig
# needs one; it changes no parameter and no count.
PLACEHOLDER_STEPS = 1000

log = logging.getLogger("glmft")


@dataclass
class Args:
    init_r: int = opt(12, "rank each adapted matrix starts with (triplets of singular vectors and value)")
    target_r: int = opt(8, "average rank per adapted matrix once the budget is final")
    lora_alpha: int = opt(32, "scaling numerator: the update is scaled by lora_alpha / init_r")
    lora_dropout: float = opt(0.1, "dropout on the adapter's input")
    lora_target: str = opt("", "comma-separated modules to adapt (empty: the model family's LoRA targets, "
                           "query_key_value on ChatGLM v1)")
    # The paper's GLUE runs warm up for about a tenth of training and spend a third or more at the final budget; the
    # warm-up also lets the importance averages (beta 0.85: about 7 steps of memory) settle before anything is cut.
    adalora_tinit: float = opt(0.1, "share of the run's steps trained at the full rank before any triplet is pruned")
    adalora_tfinal: float = opt(0.3, "share of the run's steps trained at the final budget once pruning has ended")
    adalora_delta_t: int = opt(10, "optimizer steps between budget reallocations")
    beta1: float = opt(0.85, "smoothing of the importance scores (exponential moving average factor)")
    beta2: float = opt(0.85, "smoothing of their uncertainty")
    orth_reg_weight: float = opt(0.5, "weight of the orthogonality penalty on the singular vectors, added to the loss")
    total_step: int = opt(0, "optimizer steps the schedule spans (0: the training run's own count, filled in and "
                          "recorded in meta.json)")

    def __post_init__(self) -> None:
        if not 1 <= self.target_r < self.init_r:
            raise ValueError(f"--target_r must be at least 1 and below --init_r ({self.init_r}), got {self.target_r}: "
                             "AdaLoRA prunes from init_r down to target_r")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target.strip() and not self.targets():
            raise ValueError("--lora_target names no module")
        if min(self.adalora_tinit, self.adalora_tfinal) < 0 or self.adalora_tinit + self.adalora_tfinal >= 1:
            raise ValueError(f"--adalora_tinit ({self.adalora_tinit}) and --adalora_tfinal ({self.adalora_tfinal}) "
                             "are shares of the run: each at least 0, together below 1 (the rest is the pruning)")
        if self.adalora_delta_t < 1:
            raise ValueError(f"--adalora_delta_t must be at least 1, got {self.adalora_delta_t}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"--beta1 and --beta2 must be in (0, 1), got {self.beta1} and {self.beta2}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"--orth_reg_weight must be at least 0, got {self.orth_reg_weight}")
        if self.total_step < 0:
            raise ValueError(f"--total_step must be at least 0 (0: the run's step count), got {self.total_step}")

    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_target.split(",") if t.strip()]

    def schedule(self) -> tuple[int, int, int]:
        """(total, tinit, tfinal) in optimizer steps; floors keep ``tinit < total - tfinal`` (PEFT's condition)."""
        total = self.total_step or PLACEHOLDER_STEPS
        return total, int(self.adalora_tinit * total), int(self.adalora_tfinal * total)


def describe(args: Args) -> str:
    where = args.lora_target or "the family's LoRA targets"
    steps = f"{args.total_step} steps" if args.total_step else "the run's steps"
    return (f"adalora (rank {args.init_r} -> {args.target_r}, alpha={args.lora_alpha}, dropout={args.lora_dropout}, "
            f"on {where}; {args.adalora_tinit:g} / {args.adalora_tfinal:g} of {steps} at full / final rank, "
            f"reallocated every {args.adalora_delta_t})")


def for_run(args: Args, total_steps: int) -> Args:
    """The schedule spans the run's ``total_steps`` unless --total_step was given (0 steps: left to the placeholder)."""
    if args.total_step and total_steps and args.total_step != total_steps:
        log.warning("adalora: --total_step %d while the run takes %d steps: the budget follows --total_step",
                    args.total_step, total_steps)
    return args if args.total_step or not total_steps else dataclasses.replace(args, total_step=total_steps)


def apply(model: nn.Module, args: Args) -> nn.Module:
    if is_quantized(model):
        # Verified with peft 0.21: AdaLoRA's layer factory takes torch.nn.Linear, Conv1D, Conv2d, bitsandbytes and
        # GPTQ layers only and, unlike LoRA's, ignores registered custom modules.
        raise ValueError("adalora does not support an INT4/INT8 base: PEFT's AdaLoRA cannot wrap our quantized "
                         "layers (LoRA can); use a float base model, or lora")
    freeze_all(model)
    total, tinit, tfinal = args.schedule()
    config = AdaLoraConfig(
        task_type=TaskType.CAUSAL_LM, init_r=args.init_r, target_r=args.target_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, target_modules=args.targets() or families.of_model(model).lora_targets(model),
        tinit=tinit, tfinal=tfinal, deltaT=args.adalora_delta_t, beta1=args.beta1, beta2=args.beta2,
        orth_reg_weight=args.orth_reg_weight, total_step=total,
    )
    model = get_peft_model(model, config)
    # Each module's rank count (``ranknum``, the divisor of the scaling) must stay fixed, and PEFT does not save it; on
    # an fp16/bf16 base, peft 0.21 re-registers it trainable when it casts the adapter to the base's dtype and back.
    for name, p in model.named_parameters():
        if ".ranknum." in name:
            p.requires_grad_(False)
    return model


def on_step(model: PeftModel, step: int) -> None:
    """PEFT's budget update for optimizer step ``step`` (1-based), from this step's gradients; a step whose
    gradients overflowed (fp16: DeepSpeed skips it) leaves the scores alone."""
    _check_allocator(model, step)
    adapters = [p for n, p in model.named_parameters() if ".lora_" in n]
    values = [p for n, p in model.named_parameters() if ".lora_E." in n]  # the only tensors PEFT changes
    before = [p.detach().clone() for p in values]
    with optim.full_grads(adapters) as usable:
        if not usable:
            return
        model.base_model.update_and_allocate(step)
    optim.write_master(values, before)


ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # PEFT's RankAllocator: importance scores and their averages


def state(model: PeftModel) -> dict:
    """The allocator's smoothed importance scores and the budget once allocated: with them a resumed run allocates
    as the uninterrupted one does (they live outside the parameters, so DeepSpeed's checkpoint lacks them)."""
    allocator = model.base_model.rankallocator
    scores = {k: {n: t.detach().cpu() for n, t in getattr(allocator, k).items()} for k in ALLOCATOR_STATE}
    return {"allocator": scores, "rank_pattern": model.peft_config[ADAPTER].rank_pattern}


def load_state(model: PeftModel, saved: dict) -> None:
    if not saved:  # a checkpoint written before the state was saved: _check_allocator says what that allows
        return
    allocator = model.base_model.rankallocator
    device = next(p.device for n, p in model.named_parameters() if ".lora_A." in n)
    for key in ALLOCATOR_STATE:
        setattr(allocator, key, {n: t.to(device) for n, t in saved["allocator"][key].items()})
    model.peft_config[ADAPTER].rank_pattern = saved["rank_pattern"]


def _check_allocator(model: PeftModel, step: int) -> None:
    """From the final allocation on, PEFT needs the scores gathered before it (or the budget they gave): a run resumed
    there from a checkpoint without the allocator's state (:func:`state`) has neither."""
    config, allocator = model.peft_config[ADAPTER], model.base_model.rankallocator
    final = config.total_step - config.tfinal
    if step >= final and config.rank_pattern is None and not allocator.exp_avg_ipt:
        raise ValueError(f"adalora: step {step} is in the final phase (from step {final}) but no rank budget has been "
                         f"allocated in this process; a run resumed there cannot continue: resume from a checkpoint "
                         f"before step {max(1, final - 1)} or train again")


def rank_counts(model: PeftModel) -> dict[str, int]:
    """Nonzero singular values per adapted module: the ranks the budget leaves each one."""
    return {n.removesuffix(f".lora_E.{ADAPTER}"): int(torch.count_nonzero(p))
            for n, p in model.named_parameters() if ".lora_E." in n}


def save_weights(model: PeftModel, directory: Path, state: dict[str, torch.Tensor]) -> None:
    """The PEFT adapter format, from the gathered trainable state; once a budget is allocated PEFT keeps only the
    allocated triplets of each module and records which in adapter_config.json's ``rank_pattern``."""
    peft_adapter.save(model, directory, state)


def load_weights(model: PeftModel, directory: Path) -> None:
    """Load an adapter saved by save_weights into a model built by apply(): its modules are first cut to the saved
    ``rank_pattern`` (PEFT does that when the model's config has one), so a pruned checkpoint gives the same logits."""
    config = json.loads((Path(directory) / peft_adapter.CONFIG_FILE).read_text())
    model.peft_config[ADAPTER].rank_pattern = config.get("rank_pattern")
    peft_adapter.load(model, directory, ("init_r", "target_r", "lora_alpha", "target_modules"), "lora_")
