"""AdaLoRA: what trains, that the per-step hook prunes the ranks to the budget (plainly and under ZeRO-1/2, where the
gradients and the optimizer's master copy live in DeepSpeed), and that pruned checkpoints load to the same logits."""

from __future__ import annotations

import json

import deepspeed
import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import load_file
from test_scripts import SMALL, deepspeed_launcher, four_records, free_port, run_now

from glmft import checkpoint, optim
from glmft.data import SupervisedDataset, collate
from glmft.model import build_model, count_parameters, load_tokenizer
from glmft.tuners import TUNERS, adalora

H, L, R0, RT = 64, 2, 12, 8  # tiny ChatGLM: hidden, layers; AdaLoRA's default initial and target ranks
STEPS = 20  # tinit 2 (0.1), final allocation at step 14 (0.3 final), reallocation every 5 steps in between
MODULES = [f"base_model.model.transformer.layers.{i}.attention.query_key_value" for i in range(L)]


@pytest.fixture(scope="module")
def batch():
    tokenizer = load_tokenizer("tiny")
    data = SupervisedDataset("data/sample_train.jsonl", tokenizer, max_len=96, max_src_len=60)
    return collate([data[i] for i in range(4)], tokenizer.pad_token_id)


def applied(seed: int = 0, **options):
    torch.manual_seed(seed)
    args = adalora.Args(**{"total_step": STEPS, "adalora_delta_t": 5, **options})
    return adalora.apply(build_model("tiny", torch.float32, {}), args), args


def pruned(model) -> dict[str, int]:
    """The allocated ranks per module (PEFT's rank_pattern), named as adalora.rank_counts names them."""
    pattern = model.peft_config["default"].rank_pattern
    return {"base_model.model." + n.removesuffix(".default").removesuffix(".lora_E"): sum(v)
            for n, v in pattern.items()}


def train(batch, hook: bool = True):
    """The training loop's order: backward, the hook, the optimizer step; returns the model and its ranks after each
    step's hook."""
    model, _ = applied()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ranks = []
    for step in range(1, STEPS + 1):
        model(**batch, logits_to_keep=1).loss.backward()
        if hook:
            adalora.on_step(model, step)
        ranks.append(adalora.rank_counts(model))
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), ranks


@pytest.fixture(scope="module")
def trained(batch):
    return train(batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_trainable_names_and_count(dtype):
    torch.manual_seed(0)
    model = adalora.apply(build_model("tiny", dtype, {}), adalora.Args())  # fp16: PEFT's rank count stays frozen
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"{m}.lora_{x}.default" for m in MODULES for x in "ABE"}
    # per module: A [init_r, in], B [out, init_r], E [init_r, 1]; query_key_value is 64 -> 192
    assert count_parameters(model)[0] == L * (R0 * (H + 3 * H) + R0) == 6168
    assert model.get_nb_trainable_parameters()[0] == 6168  # PEFT's own count
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_only_adapters_get_gradients_and_the_orthogonality_penalty_is_in_the_loss(batch):
    model, _ = applied()
    model.eval()  # no dropout: the two losses differ by the penalty alone
    out = model(**batch, logits_to_keep=1)  # the ChatGLM family's LOSS_KWARGS pass through PEFT's wrapper
    assert out.logits.shape[1] == 1
    out.loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    model.peft_config["default"].orth_reg_weight = 0.0
    with torch.no_grad():
        plain = model(**batch).loss
    assert out.loss > plain + 0.1  # P and Q start far from orthogonal (N(0, 0.02) entries)


def test_the_hook_prunes_to_the_budget_and_without_it_nothing_is_pruned(trained, batch):
    model, ranks = trained
    assert all(r == R0 for r in ranks[1].values())  # warm-up (tinit = 2): full rank
    assert R0 * L > sum(ranks[4].values()) > RT * L  # step 5: a reallocation on the way down
    final = sum(ranks[13].values())  # step 14: the final allocation
    assert final == RT * L == sum(pruned(model).values()) and all(sum(r.values()) == final for r in ranks[13:])
    assert pruned(model) == ranks[-1]
    _, broken = train(batch, hook=False)
    assert all(r == R0 for r in broken[-1].values())


def test_pruned_checkpoint_loads_to_the_same_logits(trained, batch, tmp_path):
    """The checkpoint holds the allocated triplets only: the trained model as the budget masks it (the optimizer step
    after the last hook moved the masked singular values by about a learning rate; the next hook would mask them)."""
    model, _ = trained
    model.base_model.rankallocator.mask_using_rank_pattern(model.base_model.model, model.peft_config["default"].
                                                           rank_pattern)
    checkpoint.save(model, tmp_path / "ckpt", {"method": "adalora"}, adalora)
    saved = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    assert sum(t.shape[0] for n, t in saved.items() if ".lora_E" in n) == RT * L
    fresh, _ = applied(seed=1)
    checkpoint.load_weights(fresh, tmp_path / "ckpt", adalora)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**batch).logits, model(**batch).logits)


def test_checkpoint_before_any_pruning_loads_whole(batch, tmp_path):
    model, _ = applied()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    checkpoint.save(model, tmp_path / "ckpt", {"method": "adalora"}, adalora)
    assert json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())["rank_pattern"] is None
    fresh, _ = applied(seed=1)
    checkpoint.load_weights(fresh, tmp_path / "ckpt", adalora)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**batch).logits, model(**batch).logits)


def test_a_resumed_allocator_decides_as_the_uninterrupted_one(batch, tmp_path):
    """state() goes with every checkpoint's engine state: a run resumed just before the final allocation (step 14)
    allocates the same budget as the run that never stopped; without it the resumed run refuses to allocate."""
    model, _ = applied()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 14):
        model(**batch, logits_to_keep=1).loss.backward()
        adalora.on_step(model, step)
        optimizer.step()
        optimizer.zero_grad()
    torch.save(adalora.state(model), tmp_path / "state.pt")

    def resumed(with_state: bool):
        fresh, _ = applied(seed=1)
        with torch.no_grad():
            for (_, p), (_, q) in zip(fresh.named_parameters(), model.named_parameters(), strict=True):
                p.copy_(q)
        if with_state:
            adalora.load_state(fresh, torch.load(tmp_path / "state.pt", weights_only=False))
        return fresh.train()

    again, unbroken = resumed(True), model
    for m in (again, unbroken):
        torch.manual_seed(3)  # the same dropout masks
        m(**batch, logits_to_keep=1).loss.backward()
        adalora.on_step(m, 14)
    assert again.peft_config["default"].rank_pattern == unbroken.peft_config["default"].rank_pattern is not None
    assert adalora.rank_counts(again) == adalora.rank_counts(unbroken)
    without = resumed(False)
    without(**batch, logits_to_keep=1).loss.backward()
    with pytest.raises(ValueError, match="no rank budget has been allocated"):
        adalora.on_step(without, 14)


def test_options_are_checked_and_the_run_fills_total_step():
    for bad in ({"target_r": 12}, {"adalora_tinit": 0.5, "adalora_tfinal": 0.5}, {"beta1": 1.0}, {"lora_target": ","}):
        with pytest.raises(ValueError):
            adalora.Args(**bad)
    assert TUNERS["adalora"].for_run(adalora.Args(), 50).total_step == 50
    assert adalora.for_run(adalora.Args(total_step=70), 50).total_step == 70  # given: kept
    assert adalora.Args(total_step=50).schedule() == (50, 5, 15)
    assert TUNERS["lora"].for_run(TUNERS["lora"].Args(), 50) == TUNERS["lora"].Args()  # base's default


def test_int4_base_is_refused():
    with pytest.raises(ValueError, match="does not support an INT4/INT8 base"):
        adalora.apply(build_model("tiny", torch.float32, {"quantization_bit": 4}), adalora.Args())


# ----------------------------------------------------------------------- DeepSpeed: one rank in this process


ENGINE_STEPS = 8  # total_step 10, reallocation every 2 steps: tinit 1, final allocation at step 7


def engine_run(stage: int, batch, write_back: bool = True, monkeypatch=None):
    model, _ = applied(lora_dropout=0.0, total_step=10, adalora_delta_t=2)  # no dropout: the same gradients
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    if not write_back:
        monkeypatch.setattr(optim, "write_master", lambda params, before: None)
    masters = []
    for step in range(1, ENGINE_STEPS + 1):
        engine.backward(engine(**batch, logits_to_keep=1).loss)
        adapters = [p for n, p in engine.module.named_parameters() if ".lora_" in n]
        assert all((p.grad is None) == (stage > 0) for p in adapters)  # ZeRO keeps the gradients in its buffers
        adalora.on_step(engine.module, step)
        masters.append({n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()
                        if ".lora_E." in n})
        engine.step()
    return engine.module, masters


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_prune_as_plain_training_does_and_the_optimizer_sees_the_masks(group, batch, stage,
                                                                                   monkeypatch):
    plain, _ = engine_run(0, batch)
    zero, masters = engine_run(stage, batch)
    assert pruned(zero) == pruned(plain) and sum(pruned(zero).values()) == RT * L
    for module, kept in pruned(zero).items():
        assert torch.count_nonzero(masters[6][f"{module}.lora_E.default"]) == kept  # the masks reached the optimizer
    _, unmasked = engine_run(stage, batch, write_back=False, monkeypatch=monkeypatch)
    assert all(torch.count_nonzero(m) == R0 for m in unmasked[6].values())  # broken: the step undoes the masks


# ------------------------------------------------------------------------ the entry script under ZeRO-2


@pytest.mark.slow
def test_zero2_run_through_finetune_py_saves_a_pruned_adapter(tmp_path):
    data = four_records(tmp_path)
    out = tmp_path / "adalora"
    done = run_now([*deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()), "finetune.py",
                    "--method", "adalora", *SMALL, "--train_path", str(data), "--train_batch_size", "1",
                    "--max_steps", "20", "--deepspeed_config", "ds_zero2.json", "--learning_rate", "1e-2",
                    "--adalora_delta_t", "2", "--output_dir", str(out)], tmp_path, "adalora_zero2")
    assert done.rc == 0, done.tail()
    ckpt = out / "checkpoint-20"
    meta = checkpoint.read_meta(ckpt)
    assert meta["method_args"]["total_step"] == 20 and meta["training"]["zero_stage"] == 2
    pattern = json.loads((ckpt / "adapter_config.json").read_text())["rank_pattern"]
    assert len(pattern) == L and sum(sum(v) for v in pattern.values()) == RT * L < R0 * L
    saved = load_file(ckpt / "adapter_model.safetensors")
    assert sorted(t.shape[0] for n, t in saved.items() if ".lora_E" in n) == sorted(sum(v) for v in pattern.values())
