"""Is the run still learning? Non-finite losses and bad optimizer steps, checked without stalling the device.

Losses stay on the device; once per optimizer step, before DeepSpeed applies it, one ``all_reduce`` tells every rank
whether any micro-batch of that step had a NaN/inf loss, so all ranks stop together (none waits forever in a
collective) and the bad gradient never reaches the weights. Steps DeepSpeed skipped (fp16 overflow: non-finite
gradients) and non-finite gradient norms are counted; too many of them stop the run too, because a run whose
updates are thrown away learns nothing, however finite its loss looks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

STREAK = 10  # this many bad optimizer steps in a row stop the run
GRACE = 20  # a quarter of max(steps, GRACE) may be bad: fp16's loss-scale search skips a few steps at the start


class Diverged(RuntimeError):
    """Training stops instead of learning from garbage; nothing from the diverged state is saved."""


class NonFiniteLoss(Diverged):
    """The loss became NaN/inf."""


class BadSteps(Diverged):
    """Too many optimizer steps were skipped (non-finite gradients) or had a non-finite gradient norm."""


def advice(train) -> str:
    return (f"The run diverged: lower --learning_rate (now {train.learning_rate:g}); under fp16, activations may "
            f"overflow: try bf16 in {train.deepspeed_config}.")


class Health:
    """The divergence checks of one training segment (its counters continue across ``--resume``)."""

    def __init__(self, engine, train, state: dict | None = None):
        self.engine, self.train = engine, train
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.accumulation = train.gradient_accumulation_steps
        self.losses = torch.zeros(self.accumulation, device=engine.device)  # this step's micro-batch losses
        self.lines: list[list[int]] = []  # the file lines of those micro-batches' records
        self.norm_flag: torch.Tensor | None = None  # an applied step's grad norm, still on the device, was bad
        state = state or {}
        self.bad, self.streak, self.bad_norms = state.get("bad", 0), state.get("streak", 0), state.get("bad_norms", 0)
        self.skipped_before = engine.skipped_steps

    def state(self) -> dict:
        """What ``--resume`` needs to continue the counts (kept in the checkpoint's client state)."""
        return {"bad": self.bad, "streak": self.streak, "bad_norms": self.bad_norms}

    def summary(self) -> dict:
        return {"skipped_steps": self.engine.skipped_steps, "nonfinite_grad_norm_steps": self.bad_norms}

    def record(self, loss: torch.Tensor, lines: list[int]) -> None:
        """Keep one micro-batch's loss on the device (no host sync) and its records' file lines."""
        self.losses[len(self.lines) % self.accumulation] = loss.detach().float()
        self.lines.append(lines)

    def check_losses(self, step: int, where: str) -> None:
        """Before the boundary micro-batch's ``engine.step()``: one collective and one host read per optimizer step.
        Every rank raises ``NonFiniteLoss`` if any rank saw a non-finite loss in this step."""
        flags = torch.zeros(self.world, self.accumulation + 1, device=self.losses.device)
        flags[self.rank, :self.accumulation] = (~torch.isfinite(self.losses)).float()
        if self.norm_flag is not None:  # the previous step's device-side grad norm, read with this sync
            flags[self.rank, self.accumulation] = self.norm_flag
        dist.all_reduce(flags)
        table = flags.tolist()
        lines, self.lines = self.lines, []
        norm_bad, self.norm_flag = any(row[-1] for row in table), None
        if norm_bad:  # the previous step was applied with it: the cause of whatever this step's losses are
            self._applied_bad_norm(step - 1)
        ranks = [r for r, row in enumerate(table) if any(row[:-1])]
        if ranks:
            losses = self.losses.tolist()[:len(lines)]  # the error path: a host read costs nothing here
            mine = [i for i, loss in enumerate(losses) if not math.isfinite(loss)] or range(len(lines))
            raise NonFiniteLoss(
                f"loss is {[losses[i] for i in mine]} on rank {self.rank} (non-finite on rank(s) {ranks}) at step "
                f"{step} ({where}, this rank's records on lines {[n for i in mine for n in lines[i]]} of "
                f"{self.train.train_path}). {advice(self.train)} Nothing was saved from this step.")

    def stepped(self, step: int) -> None:
        """After an optimizer step: count it as bad if DeepSpeed skipped it or its gradient norm is non-finite;
        stop once bad steps are too many (``STREAK`` in a row, or a quarter of ``max(step, GRACE)``)."""
        skipped = self.engine.skipped_steps > self.skipped_before
        self.skipped_before = self.engine.skipped_steps
        norm = self.engine.get_global_grad_norm()
        norm_bad = False
        if torch.is_tensor(norm):  # only read at the next sync; an inf norm of a skipped step is a Python float
            self.norm_flag = (~torch.isfinite(norm) | (norm < 0)).float().reshape(())
        elif norm is not None:  # ZeRO reports an invalid norm as inf (or -1)
            norm_bad = not math.isfinite(norm) or norm < 0
            if norm_bad and not skipped:
                self._applied_bad_norm(step)
        self.bad_norms += norm_bad
        bad = skipped or norm_bad
        self.bad += bad
        self.streak = self.streak + 1 if bad else 0
        if self.streak >= STREAK or 4 * self.bad > max(step, GRACE):
            raise BadSteps(f"{self.bad} of {step} optimizer steps had non-finite gradients (DeepSpeed skipped "
                           f"{self.engine.skipped_steps}, the last {self.streak} in a row; {self.bad_norms} had a "
                           f"non-finite gradient norm), so the weights have stopped learning. {advice(self.train)} "
                           "Nothing was saved from the diverged state.")

    def settle(self, step: int) -> None:
        """Before saving: read a device-side grad-norm flag still pending (bf16 without overflow checks applies such
        a step), so a diverged state is never written."""
        if self.norm_flag is not None:
            flag = self.norm_flag.reshape(1).to(self.losses.device, copy=True)  # offload: the norm may be on the CPU
            dist.all_reduce(flag)  # the norm is global, but every rank must take the same branch
            self.norm_flag = None
            if flag.tolist()[0]:
                self._applied_bad_norm(step)

    def _applied_bad_norm(self, step: int) -> None:
        raise BadSteps(f"optimizer step {step} was applied with a non-finite gradient norm: the weights are no longer "
                       f"finite. {advice(self.train)} Nothing was saved from the diverged state.")
