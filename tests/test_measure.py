"""Measurement helpers: analytic FLOPs (against torch's FLOP counter), the TTFT split, memory, KV bytes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import tokcompress as tc
from tokcompress.flops import LMShape, layer_flops, layer_lengths, prefill_flops
from tokcompress.policy import Policy
from tokcompress.timing import PARTS, cache_bytes, peak_memory, split_from_record, ttft_split
from tokcompress.tokens import Compression, TokenSet, selection

from conftest import batch_inputs, tiny


def _qwen2(layers=2, hidden=64, heads=4, kv=2, inter=96, vocab=100):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM._from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("n", [1, 7, 40])
def test_dense_flops_equal_torch_flop_counter(n):
    """Eager attention multiplies the full n x n score matrix: the causal=False count must match exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _qwen2()
    ids = torch.randint(0, 100, (1, n))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
    shape = LMShape.from_config(model.config)
    assert prefill_flops(shape, [n] * shape.num_layers, causal=False)["total"] == counter.get_total_flops()


def test_causal_count_and_parts_by_hand():
    shape = LMShape(
        hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16, vocab_size=10
    )
    n = 3
    # q 2*3*8*8, k and v 2*3*8*4 each, o 2*3*8*8; scores and AV: 2 * 2 * heads 2 * hd 4 * pairs 6 (causal)
    attention = 2 * 3 * 8 * 8 + 2 * (2 * 3 * 8 * 4) + 2 * 3 * 8 * 8 + 2 * 2 * 2 * 4 * 6
    assert layer_flops(shape, n) == {"attention": attention, "mlp": 3 * 2 * 3 * 8 * 16}
    total = prefill_flops(shape, [n])
    assert total["head"] == 2 * 8 * 10
    assert total["total"] == attention + 3 * 2 * 3 * 8 * 16 + 2 * 8 * 10
    with pytest.raises(ValueError, match="one length per layer"):
        prefill_flops(shape, [3, 3])


def test_layer_lengths_from_records():
    assert layer_lengths(None, 100, 4) == [100] * 4
    plain = SimpleNamespace(video_tokens_before=80, video_tokens_after=20, stages={})
    assert layer_lengths(plain, 100, 4) == [40] * 4
    staged = SimpleNamespace(
        video_tokens_before=80,
        video_tokens_after=80,
        stages={
            "fastv": {"layer": 2, "visual_before": 80, "visual_after": 30},
            "dycoke_kv": {"layer": 1, "steps": []},  # decode-time: the prefill is untouched
        },
    )
    assert layer_lengths(staged, 100, 4) == [100, 100, 50, 50]


@dataclass
class _Sleepy(Policy):
    """Keeps everything after sleeping: its time must land in the ``policy`` part only."""

    retain: float = 1.0
    nap: float = 0.05

    def compress(self, tokens: TokenSet) -> Compression:
        time.sleep(self.nap)
        return selection(tokens.available_index())


def test_ttft_split_puts_policy_time_in_the_policy_part():
    model, _ = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", batch=1)
    total, parts = ttft_split(model, inputs, repeats=2, warmup=0)
    assert len(total.seconds) == 2 and parts == {}  # unwrapped: no stamps, total only
    with tc.compressed(model, _Sleepy()):
        total, parts = ttft_split(model, inputs, repeats=2, warmup=1)
        record = tc.last_record(model)
    assert list(parts) == list(PARTS)
    for i in range(2):
        assert min(parts[name].seconds[i] for name in PARTS) >= 0
        assert sum(parts[name].seconds[i] for name in PARTS) == pytest.approx(total.seconds[i], rel=1e-6)
        assert parts["policy"].seconds[i] >= 0.05
        assert parts["engine"].seconds[i] < 0.05 and parts["prefill"].seconds[i] < total.seconds[i] - 0.05
    clock = record[0].clock
    assert clock["inner_start"] <= clock["lm_hook_start"] <= clock["lm_start"]


def test_split_refuses_a_stale_record():
    model, _ = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", batch=1)
    with tc.compressed(model, "uniform", retain=0.5):
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        record = tc.last_record(model)
        later = time.perf_counter()
        with pytest.raises(RuntimeError, match="not from this call"):
            split_from_record(record, later, later + 1.0)
    with pytest.raises(RuntimeError, match="no prefill stamps"):
        split_from_record([], 0.0, 1.0)


def test_kv_cache_bytes_follow_the_compact_prompt():
    model, _ = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", batch=1)
    text = model.config.text_config
    per_token = (
        text.num_hidden_layers * 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4
    )
    with tc.compressed(model, "uniform", retain=0.25):
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        record = tc.last_record(model)[0]
    compact = inputs["input_ids"].shape[1] - (record.video_tokens_before - record.video_tokens_after)
    assert cache_bytes(out.cache) == compact * per_token


def test_peak_memory_sees_a_temporary_tensor():
    def work():
        x = torch.ones(10 * 2**20 // 4)  # 10 MiB, freed before returning
        return float(x.sum())

    peak, value = peak_memory(work, "cpu")
    assert value == 10 * 2**20 // 4
    assert 10 * 2**20 <= peak < 12 * 2**20
