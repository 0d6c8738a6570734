"""Invariants of the model on a tiny config: masks/positions, attention paths, dtypes, checkpointing, the cache."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SPECIAL, prompt, tiny_config, tiny_model

from chatglm.modeling_chatglm import build_attention_mask, build_position_ids

S = TINY_SPECIAL


def reference_positions_and_mask(ids: list[int]):
    """The spec's rules written as the obvious per-sequence loops."""
    n = len(ids)
    ctx = ids.index(S["bos_token_id"])
    mask_tok = S["gmask_token_id"] if S["gmask_token_id"] in ids else S["mask_token_id"]
    mpos = ids.index(mask_tok)
    pos = [i if i < ctx else mpos for i in range(n)]
    block = [0 if i < ctx else i - ctx + 1 for i in range(n)]
    allowed = [[j <= i or j < ctx for j in range(n)] for i in range(n)]
    return pos, block, allowed


def test_spec_reference_example():
    # "你好" -> [5, 74874, [gMASK], <sop>]: positions [[0,1,2,2],[0,0,0,1]], only (rows 0..2, col 3) masked.
    config = tiny_config()
    ids = torch.tensor([[5, 74, S["gmask_token_id"], S["bos_token_id"]]])
    assert build_position_ids(ids, config).tolist() == [[[0, 1, 2, 2], [0, 0, 0, 1]]]
    allowed = build_attention_mask(ids, config, 0, None)[0, 0]
    assert (~allowed).nonzero().tolist() == [[0, 3], [1, 3], [2, 3]]


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_positions_and_masks_equal_the_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    config = tiny_config()
    rows = []
    for _ in range(4):
        text = torch.randint(6, 80, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        answer = torch.randint(6, 80, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
        if torch.rand(1, generator=g) < 0.5:  # [MASK] inside the context instead of a trailing [gMASK]
            cut = int(torch.randint(0, len(text) + 1, (1,), generator=g))
            row = text[:cut] + [S["mask_token_id"]] + text[cut:] + [S["bos_token_id"]] + answer
        else:
            row = prompt(text, answer, eop=True)
        rows.append(row)
    width = max(map(len, rows))
    ids = torch.tensor([r + [S["pad_token_id"]] * (width - len(r)) for r in rows])  # right padded
    positions = build_position_ids(ids, config)
    allowed = build_attention_mask(ids, config, 0, None)
    for b, row in enumerate(rows):
        pos, block, ref_allowed = reference_positions_and_mask(row)
        n = len(row)
        assert positions[b, 0, :n].tolist() == pos and positions[b, 1, :n].tolist() == block
        assert allowed[b, 0, :n, :n].tolist() == ref_allowed


def test_left_padding_shifts_positions_and_hides_pads():
    config = tiny_config()
    row = prompt([10, 11, 12], [13])
    ids = torch.tensor([[S["pad_token_id"]] * 2 + row])
    pad_mask = torch.tensor([[0, 0] + [1] * len(row)])
    positions = build_position_ids(ids, config, pad_mask)
    assert positions[0].tolist() == [[0, 0, 0, 1, 2, 3, 3, 3], [0, 0, 0, 0, 0, 0, 1, 2]]
    allowed = build_attention_mask(ids, config, 0, pad_mask)[0, 0]
    assert not allowed[2:, :2].any()  # real tokens never see pads
    assert allowed[0, 0] and allowed[1, 1]  # a pad sees itself only, so no row is empty


def test_missing_sop_is_a_clear_error(model):
    with pytest.raises(ValueError, match="<sop>"):
        model(torch.tensor([[10, 11, S["gmask_token_id"]]]))


def sharpen(model, factor: float = 40.0):
    """Scale q/k weights so attention is far from uniform: then masks and rotary really matter."""
    with torch.no_grad():
        for layer in model.transformer.layers:
            layer.attention.query_key_value.weight.mul_(factor)
    return model


def test_sdpa_equals_eager_on_sharp_attention_with_prefix_and_padding():
    sdpa = sharpen(tiny_model(pre_seq_len=3))
    eager = sharpen(tiny_model(pre_seq_len=3, attn_implementation="eager"))
    ids = torch.tensor([prompt([10, 11, 12, 13], [20, 21], eop=True), [3, 3, 3] + prompt([30, 31], [40, 41])])
    mask = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6])
    with torch.no_grad():
        a, b = sdpa(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_positions_and_mask_really_shape_the_output():
    """Guards the invariants above: with sharp attention, positions and masks are not numerically invisible."""
    model = sharpen(tiny_model())
    ids = torch.tensor([prompt([10, 11, 12, 13], [20, 21])])  # context = 6 tokens, answer from index 6
    positions = build_position_ids(ids, model.config)
    flat_blocks = positions.clone()
    flat_blocks[:, 1] = 0  # rotary is shift-invariant, so change the relative block positions instead
    later_context, later_answer = ids.clone(), ids.clone()
    later_context[0, 3] = 50  # a context token after position 0
    later_answer[0, 7] = 50  # an answer token
    with torch.no_grad():
        base = model(ids).logits
        assert (base - model(ids, position_ids=flat_blocks).logits).abs().max() > 1e-3
        # The context is bidirectional: position 0 sees a later context token ...
        assert (base[:, 0] - model(later_context).logits[:, 0]).abs().max() > 1e-3
        # ... while the answer is causal: nothing before index 7 sees index 7.
        torch.testing.assert_close(base[:, :7], model(later_answer).logits[:, :7], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_run_and_stay_close_to_fp32(dtype):
    model = tiny_model()
    ids = torch.tensor([prompt([10, 11, 12], [20, 21], eop=True)])
    with torch.no_grad():
        ref = model(ids, labels=ids).loss
        low = model.to(dtype)(ids, labels=ids)
    assert low.logits.dtype == dtype and torch.isfinite(low.logits).all()
    assert abs(low.loss.item() - ref.item()) < 0.05


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_gives_the_same_gradients_with_a_frozen_base_and_trainable_prefix(reentrant):
    ids = torch.tensor([prompt([10, 11, 12], [20, 21], eop=True)] * 2)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(pre_seq_len=3, prefix_projection=True).train()
        model.config.prefix_dropout = 0.0
        model.transformer.prefix_dropout.p = 0.0
        for name, p in model.named_parameters():
            p.requires_grad = ".prefix_encoder." in name or "dense_4h_to_h" in name  # prefix + a LoRA-like inner
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 + 5  # 2 layers x (w, b) + prefix
    for name in grads[0]:
        assert grads[1][name].abs().sum() > 0, f"no gradient reached {name}"
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_cached_decoding_equals_the_full_forward():
    model = sharpen(tiny_model(pre_seq_len=2))
    ids = torch.tensor([prompt([10, 11, 12], [20, 21, 22, 23])])
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        n = ids.shape[1] - 4
        out = model(ids[:, :n], use_cache=True)
        cache, steps = out.cache, [out.logits[:, -1]]
        positions = build_position_ids(ids, model.config)
        for t in range(n, ids.shape[1]):
            step = model(ids[:, t : t + 1], position_ids=positions[..., t : t + 1], cache=cache, use_cache=True)
            cache = step.cache
            steps.append(step.logits[:, -1])
    assert cache.get_seq_length() == ids.shape[1]  # the prefix is not counted as cached text
    torch.testing.assert_close(torch.stack(steps, 1), full[:, n - 1 :], rtol=0, atol=1e-5)


def test_one_dimensional_positions_variant_runs():
    model = tiny_model(position_encoding_2d=False)
    ids = torch.tensor([prompt([10, 11], [20], eop=True)])
    assert build_position_ids(ids, model.config).shape == (1, 1, ids.shape[1])
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_loss_ignores_minus_100_and_logits_to_keep_does_not_change_it(model):
    ids = torch.tensor([prompt([10, 11, 12], [20, 21], eop=True)])
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        full = model(ids, labels=labels)
        last = model(ids, labels=labels, logits_to_keep=1)
        manual = torch.nn.functional.cross_entropy(full.logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    assert last.logits.shape[1] == 1
    torch.testing.assert_close(full.loss, manual)
    torch.testing.assert_close(last.loss, full.loss)


def test_layout_checks_never_stall_an_accelerator_training_forward():
    """A missing <sop>/[gMASK] is caught on the CPU and at inference; a training forward on an accelerator (where
    reading the flag back would stall the device every micro-batch) trusts glmft.data's layout instead."""
    from chatglm.modeling_chatglm import build_position_ids, context_lengths

    config = tiny_config()
    no_sop = torch.tensor([[5, 6, 7, config.gmask_token_id]])
    with pytest.raises(ValueError, match="<sop>"):
        context_lengths(no_sop, config.bos_token_id)
    no_mask = torch.tensor([[5, 6, 7, config.bos_token_id]])
    with pytest.raises(ValueError, match=r"\[gMASK\]"):
        build_position_ids(no_mask, config)
    on_device = torch.tensor([prompt([5, 6], [7])], device="meta")  # stands in for a CUDA tensor: no host reads
    assert context_lengths(on_device, config.bos_token_id).shape == (1,)
    assert build_position_ids(on_device, config).shape == (1, 2, on_device.shape[1])
    with torch.no_grad(), pytest.raises(RuntimeError, match="meta"):  # inference reads the flag on the host
        context_lengths(on_device, config.bos_token_id)
