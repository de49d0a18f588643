"""The public API: registry, wrap semantics, and every refusal with a message that says what to do."""

from __future__ import annotations

import gc
import tracemalloc
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tokcompress as tc
from tokcompress.engine import SESSION_ATTR, Session
from tokcompress.tokens import Compression, TokenSet, selection

from conftest import batch_inputs, tiny


def test_available_policies_lists_baselines():
    names = tc.available_policies()
    assert {"none", "uniform", "frames", "pool", "random"} <= set(names)
    assert names == sorted(names)


def test_unknown_policy_lists_known_ones():
    model, _ = tiny("llava_onevision")
    with pytest.raises(tc.UnknownPolicyError) as err:
        tc.wrap(model, "no-such-policy", retain=0.5)
    assert "no-such-policy" in str(err.value) and "uniform" in str(err.value)
    assert not tc.is_wrapped(model)


@pytest.mark.parametrize("retain", [0, 0.0, -0.1, 1.5, True, "0.5", float("nan")])
def test_retain_outside_unit_interval_is_refused(retain):
    model, _ = tiny("llava_onevision")
    with pytest.raises(ValueError, match=r"retain must be a fraction in \(0, 1\]"):
        tc.wrap(model, "uniform", retain=retain)
    assert not tc.is_wrapped(model)


def test_unsupported_model_names_supported_ones():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    model = LlamaForCausalLM(config)
    with pytest.raises(tc.UnsupportedModelError) as err:
        tc.wrap(model, "uniform", retain=0.5)
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg and "LlavaOnevisionForConditionalGeneration" in msg and "adapters/" in msg


def test_wrapping_twice_is_refused_and_chain_is_the_alternative():
    model, _ = tiny("llava_onevision")
    with tc.compressed(model, "uniform", retain=0.5):
        with pytest.raises(ValueError, match="already wrapped"):
            tc.wrap(model, "random", retain=0.5)
    tc.wrap(model, ["uniform", "random"])
    try:
        policy = tc.policy_of(model)
        assert isinstance(policy, tc.Sequential)
        assert policy.retain == pytest.approx(0.25 * 0.25)
    finally:
        tc.unwrap(model)


def test_wrap_returns_same_object_and_unwrap_of_plain_model_raises():
    model, _ = tiny("llava_onevision")
    assert tc.wrap(model, "none") is model
    assert tc.unwrap(model) is model
    with pytest.raises(ValueError, match="not wrapped"):
        tc.unwrap(model)
    with pytest.raises(ValueError, match="not wrapped"):
        tc.last_record(model)


def test_chain_with_shared_retain_is_refused():
    model, _ = tiny("llava_onevision")
    with pytest.raises(ValueError, match="chain takes no shared retain"):
        tc.wrap(model, ["uniform", "random"], retain=0.5)


def test_policy_object_and_chain_of_objects():
    model, _ = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", 1)
    chain = [tc.build_policy("uniform", retain=0.5), tc.build_policy("random", retain=0.5, seed=1)]
    with tc.compressed(model, chain), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        rec = tc.last_record(model)[0]
    n_grid = rec.videos[0].positions.numel()
    after_uniform = n_grid // 2  # 16 tokens per frame -> 8
    assert rec.video_tokens_after == round(after_uniform * 0.5) + 1


def test_static_cache_is_refused():
    model, _ = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", 1)
    with tc.compressed(model, "uniform", retain=0.5), pytest.raises(tc.UnsupportedUsageError, match="[Ss]tatic"):
        model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")


def test_chunked_prefill_is_refused():
    model, _ = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", 1)
    with tc.compressed(model, "uniform", retain=0.5), pytest.raises(tc.UnsupportedUsageError, match="chunk"):
        model.generate(**inputs, max_new_tokens=3, do_sample=False, prefill_chunk_size=16)


def test_reusing_a_compressed_cache_across_generate_calls_is_refused():
    model, processor = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", 1)
    with tc.compressed(model, "uniform", retain=0.5), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        more = processor.tokenizer(" And then?", return_tensors="pt").input_ids
        ids = torch.cat([out.sequences, more], dim=1)
        with pytest.raises(tc.UnsupportedUsageError, match="(one token at a time|across generate)"):
            model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), cache=out.cache, max_new_tokens=2, do_sample=False
            )


@dataclass
class NeedsDepth(tc.Policy):
    needs = frozenset({"depth"})

    def compress(self, tokens: TokenSet) -> Compression:
        return selection(tokens.available_index())


def test_missing_signal_is_refused():
    model, _ = tiny("llava_onevision")
    with pytest.raises(tc.MissingSignalError, match="depth"):
        tc.wrap(model, NeedsDepth())
    assert not tc.is_wrapped(model)


@dataclass
class KeepsNothing(tc.Policy):
    def compress(self, tokens: TokenSet) -> Compression:
        return Compression(keep=torch.zeros(0, dtype=torch.long))


def test_invalid_policy_output_is_refused():
    model, _ = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", 1)
    with tc.compressed(model, KeepsNothing()), pytest.raises(tc.PolicyOutputError, match="no tokens"):
        model.generate(**inputs, max_new_tokens=2)


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def test_wrap_unwrap_cycles_leave_nothing_behind():
    model, _ = tiny("qwen2_5_vl")
    inputs = batch_inputs("qwen2_5_vl", 1)
    before = _hooks(model)
    with torch.no_grad():
        with tc.compressed(model, "uniform", retain=0.5):
            model(**inputs)  # one real call, so the session held state at least once
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    for i in range(200):
        tc.wrap(model, "random", retain=0.5, seed=i)
        assert _hooks(model) > before
        tc.unwrap(model)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    assert _hooks(model) == before
    assert not hasattr(model, SESSION_ATTR)
    assert not any(isinstance(o, Session) for o in gc.get_objects())
    assert grown < 256 * 1024, f"memory grew by {grown} bytes over 200 cycles"
