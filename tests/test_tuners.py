"""Every tuner, the same checks (parametrised over the tuner table): what trains, how much, and that it learns."""

from __future__ import annotations

import pytest
import torch

import chatglm
from glmft import checkpoint
from glmft.data import SupervisedDataset, collate
from glmft.model import count_parameters
from glmft.tuners import TUNERS, base

H, L, INNER, R, P, A = 64, 2, 256, 4, 3, 8
LAYER = 4 * H + (3 * H * H + 3 * H) + (H * H + H) + (INNER * H + INNER) + (H * INNER + H)

CASES = {
    "freeze": (dict(num_trainable_layers=1), lambda v: LAYER),
    "freeze_mlp_of_layer0": (dict(trainable_layers="0", trainable_part="mlp"), lambda v: 2 * H * INNER + INNER + H),
    "embedding": ({}, lambda v: v * H),
    "pt": (dict(pre_seq_len=P), lambda v: P * 2 * L * H),
    "pt_projection": (dict(pre_seq_len=P, prefix_projection=True),
                      lambda v: P * H + H * H + H + H * 2 * L * H + 2 * L * H),
    "lora": (dict(lora_r=R), lambda v: L * R * (H + 3 * H)),
    # every bias: layernorms (2H), query_key_value (3H), dense (H), dense_h_to_4h (INNER), dense_4h_to_h (H); final LN
    "bitfit": ({}, lambda v: L * (7 * H + INNER) + H),
    "ia3": ({}, lambda v: L * (3 * H + INNER)),  # query_key_value's output, dense_4h_to_h's input
    "adapter": (dict(adapter_size=A), lambda v: L * 2 * (H * A + A + A * H + H)),  # two bottlenecks per layer
    "adalora": (dict(init_r=R + 2, target_r=R), lambda v: L * (R + 2) * (H + 3 * H + 1)),  # P, Q and E per layer
    "prompt_tuning": (dict(num_virtual_tokens=P), lambda v: P * H),
    "p_tuning": (dict(num_virtual_tokens=P), lambda v: P * H + 3 * (H * H + H)),  # embedding, then an MLP of three
}


def method_of(case: str):
    return TUNERS[case if case in TUNERS else case.split("_")[0]]


def prepared(case: str, seed: int = 0):
    tuner = method_of(case)
    args = tuner.Args(**CASES[case][0])
    overrides = tuner.model_overrides(args)
    torch.manual_seed(seed)
    model = chatglm.ChatGLMForConditionalGeneration.from_pretrained(chatglm.TINY_DIR, **overrides)
    return tuner, args, tuner.apply(model, args)


@pytest.fixture(scope="module")
def batch():
    tok = chatglm.ChatGLMTokenizer.from_pretrained(chatglm.TINY_DIR)
    data = SupervisedDataset("data/sample_train.jsonl", tok, max_len=96, max_src_len=60)
    return collate([data[i] for i in range(4)], tok.pad_token_id)


def expected_names(case: str, names: list[str]) -> set[str]:
    if case == "freeze":
        return {n for n in names if n.startswith("transformer.layers.1.")}
    if case == "freeze_mlp_of_layer0":
        return {n for n in names if n.startswith("transformer.layers.0.mlp.")}
    if case == "embedding":
        return {"transformer.word_embeddings.weight"}
    if case in ("prompt_tuning", "p_tuning"):
        return {n for n in names if n.startswith("prompt_encoder.")}
    if case.startswith("pt"):
        return {n for n in names if n.startswith("transformer.prefix_encoder.")}
    if case == "bitfit":
        return {n for n in names if n.endswith(".bias")}
    if case == "ia3":
        return {f"base_model.model.transformer.layers.{i}.{m}.ia3_l.default" for i in range(L)
                for m in ("attention.query_key_value", "mlp.dense_4h_to_h")}
    if case == "adapter":
        return {f"transformer.layers.{i}.{site}.adapter.{part}.{w}" for i in range(L) for w in ("weight", "bias")
                for site in ("attention.dense", "mlp.dense_4h_to_h") for part in ("down", "up")}
    if case == "adalora":  # the singular vectors (lora_A, lora_B) and values (lora_E), not PEFT's rank count
        return {n for n in names if ".lora_" in n}
    return {n for n in names if ".lora_A." in n or ".lora_B." in n}


@pytest.mark.parametrize("case", CASES)
def test_trainable_names_count_and_dtype(case):
    _, _, model = prepared(case)
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_names(case, names)
    assert count_parameters(model)[0] == CASES[case][1](model.config.vocab_size)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("case", CASES)
def test_only_trainable_parameters_get_gradients(case, batch):
    _, _, model = prepared(case)
    model.train()
    model(**batch).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    # (LoRA's A matrices start with a zero gradient because B starts at zero; something must still learn.)
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("case", CASES)
def test_loss_falls_when_overfitting_four_examples(case, batch):
    _, _, model = prepared(case)
    model.train()
    # In the random tiny model attention adds little next to the sqrt(56)-scaled residual, so a prefix (N(0, 1)
    # keys/values, as the original initialises them) needs larger steps to show an effect within 30 steps.
    # (IA)^3 and the adapters act inside those same weak sublayers (rescaling vectors starting at one, bottlenecks
    # starting at zero), so they too need larger steps here than on a pretrained model.
    lr = {"pt": 1.0, "pt_projection": 5e-2, "ia3": 3.0, "adapter": 5e-2, "prompt_tuning": 0.3}.get(case, 1e-2)
    if case in ("prompt_tuning", "p_tuning"):
        # Input-level virtual tokens reach the output only through the model: the random tiny model, whose outputs
        # are nearly uniform whatever the input (loss ~ log(vocab) +- 1e-4), is given weights of gain 1.5 first.
        torch.manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2 and not name.startswith("prompt_encoder."):
                    p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0], losses


@pytest.mark.parametrize("case", CASES)
def test_save_load_gives_identical_logits(case, batch, tmp_path):
    tuner, args, model = prepared(case)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # as if trained
    model.eval()
    checkpoint.save(model, tmp_path / "ckpt", {"method": tuner.NAME}, tuner)
    _, _, fresh = prepared(case, seed=1)
    checkpoint.load_weights(fresh, tmp_path / "ckpt", tuner)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)


def test_lora_merged_equals_unmerged(batch):
    tuner, _, model = prepared("lora")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        merged = tuner.merge(model)
        torch.testing.assert_close(merged(**batch).logits, before, rtol=0, atol=1e-5)
    assert not any(".lora_" in n for n, _ in merged.named_parameters())


def test_checkpoint_with_wrong_tensors_is_rejected(batch, tmp_path):
    tuner, _, model = prepared("pt")
    checkpoint.save(model, tmp_path / "ckpt", {"method": "pt"}, tuner)
    other = TUNERS["freeze"]
    fresh = other.apply(chatglm.ChatGLMForConditionalGeneration.from_pretrained(chatglm.TINY_DIR),
                        other.Args(num_trainable_layers=1))
    with pytest.raises(ValueError, match="missing .*transformer.layers.1"):
        checkpoint.load_weights(fresh, tmp_path / "ckpt", other)


def test_freeze_all_leaves_nothing_trainable():
    model, _ = chatglm.tiny()
    base.freeze_all(model)
    assert count_parameters(model)[0] == 0


@pytest.mark.parametrize("bad", [{"trainable_part": "ffn"}, {"trainable_layers": "1,x"}, {"num_trainable_layers": 0}])
def test_freeze_args_reject_nonsense(bad):
    with pytest.raises(ValueError):
        TUNERS["freeze"].Args(**bad)


@pytest.mark.parametrize("case", ["lora", "pt", "freeze", "bitfit", "ia3", "adapter", "prompt_tuning", "p_tuning"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients_with_a_frozen_base(case, reentrant, batch):
    """The input-requires-grad trap: with re-entrant checkpointing and a frozen embedding, nothing inside a
    checkpointed layer would get a gradient unless the model makes the layer input require grad."""
    grads = []
    for checkpointing in (False, True):
        _, _, model = prepared(case)
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # the same masks with and without recomputation
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grads[1][name] is not None, f"no gradient reached {name} under checkpointing"
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)
