"""tokcompress.scorers: QuoTA's VLM yes-probability and Free Video-LLM's CLIP scores, each against a
manual forward of the same tiny random model; and the engine-side inputs (question text, frames).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from tokcompress.scorers import (
    DECOUPLE_PROMPT,
    OBJECT_PROMPT,
    CLIPScorer,
    QuoTAScorer,
    frames_from_pixels,
    parse_objects,
    question_text,
    scoring_prompt,
)
from tokcompress.tiny import build, build_clip, make_inputs

from conftest import QUESTIONS, tiny

#: Token id of "A" in the tiny byte-level tokenizers (id == byte value).
A = ord("A")


@functools.lru_cache(maxsize=None)
def clip():
    return build_clip()


@functools.lru_cache(maxsize=None)
def sensitive_vlm(family: str = "qwen2_vl"):
    """A tiny VLM whose weights are redrawn with std 0.2 (instead of 0.02), so that its yes-probability
    changes visibly from frame to frame and question to question (shared with test_quota_freevideo)."""
    model, processor = build(family, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.2)
    return model, processor


def frames(count: int = 5, size: int = 40, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), generator=gen, dtype=torch.uint8)


# ------------------------------------------------------------------------------- query decoupling


@pytest.mark.parametrize(
    "text, objects",
    [
        ("step 1: yes\nstep 2: ['a', 'b']\nstep 3: ['red car', 'dog']", ["red car", "dog"]),
        ('Step 1: Yes\nstep 3: ["ball"]', ["ball"]),
        ("step 1: no\nstep 3: ['ball']", []),  # no objects needed
        ("step 1: yes\nstep 3: [unparsable", []),
        ("step 1: yes\nstep 3: [car, dog]", []),  # not a Python list of strings
        ("random words", []),
    ],
)
def test_parse_objects(text, objects):
    assert parse_objects(text) == objects


def test_scoring_prompt_names_the_objects_or_asks_the_question():
    assert scoring_prompt("Why?", ["dog", "ball"]) == (
        "Does the image contain any object of dog, ball? A. yes, B. no\nAnswer with the option's letter directly."
    )
    assert scoring_prompt("Why?", []).startswith("Why?\nDoes the image contain sufficient information")


# ------------------------------------------------------------------------------------ QuoTAScorer


def manual_yes_probability(model, processor, frame: torch.Tensor, prompt: str) -> float:
    """One frame, one sequence: softmax of the last logits at "A"."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[frame], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    return float(torch.softmax(logits.float(), -1)[A])


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_quota_scorer_equals_a_manual_forward_per_frame(family):
    model, processor = tiny(family)
    video = frames()
    question = "Where does the ball go?"
    got = QuoTAScorer(model=model, processor=processor, batch_size=2)(video, question)["frame_scores"]
    prompt = scoring_prompt(question, [])
    want = torch.tensor([manual_yes_probability(model, processor, f, prompt) for f in video])
    assert got.shape == (5,)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


class ScriptedDecoupler(torch.nn.Module):
    """Stands in for the target model's generate: appends a fixed answer to the prompt."""

    def __init__(self, processor, answer: str) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.answer = processor.tokenizer.encode(answer, add_special_tokens=False)
        self.prompts: list[str] = []
        self.tokenizer = processor.tokenizer

    def generate(self, input_ids, attention_mask=None, **kwargs):
        self.prompts.append(self.tokenizer.decode(input_ids[0]))
        return torch.cat([input_ids, torch.tensor([self.answer])], dim=1)


def test_quota_scorer_scores_the_decoupled_objects():
    model, processor = sensitive_vlm()
    decoupler = ScriptedDecoupler(processor, "step 1: yes\nstep 2: ['ball', 'joy']\nstep 3: ['ball', 'table']")
    scorer = QuoTAScorer(model=model, processor=processor, decoupler=decoupler)
    video = frames(3)
    got = scorer(video, "Where does the ball go?")["frame_scores"]
    assert scorer.last_objects == ["ball", "table"]
    assert "Where does the ball go?" in decoupler.prompts[0] and "step 3" in decoupler.prompts[0]
    prompt = OBJECT_PROMPT.format(objects="ball, table")
    want = torch.tensor([manual_yes_probability(model, processor, f, prompt) for f in video])
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-4)
    plain = QuoTAScorer(model=model, processor=processor)(video, "Where does the ball go?")["frame_scores"]
    assert not torch.allclose(got, plain)  # the object prompt is what was scored


def test_quota_scorer_decouples_with_a_real_generate():
    """The decoupling step is a greedy generate of the decoupler on the instruction, text only."""
    model, processor = tiny("qwen2_vl")
    scorer = QuoTAScorer(model=model, processor=processor, decoupler=model, max_new_tokens=6)
    assert scorer.objects("Why?") == parse_objects(scorer.last_answer) == []  # random words: no objects
    content = [{"type": "text", "text": DECOUPLE_PROMPT.format(question="Why?")}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    ids = processor.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    want = processor.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert scorer.last_answer == want and len(want) > 0


def test_quota_scorer_refuses_bad_arguments():
    model, processor = tiny("qwen2_vl")
    with pytest.raises(ValueError, match="QuoTAScorer needs model="):
        QuoTAScorer(model=model)
    with pytest.raises(ValueError, match="answer 'yes please' must be one token"):
        QuoTAScorer(model=model, processor=processor, answer="yes please")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        QuoTAScorer(model=model, processor=processor, batch_size=0)


# ------------------------------------------------------------------------------------- CLIPScorer


def test_clip_scorer_equals_a_manual_clip_forward():
    model, processor = clip()
    video = frames(4, size=48)
    question = "Which color is the ball?"
    got = CLIPScorer(model, processor, batch_size=3)(video, question)
    inputs = processor(text=[question], images=list(video), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)  # CLIPModel.forward: normalised text and image embeddings
        want_frames = out.image_embeds @ out.text_embeds[0]
        hidden = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 1:]
        patches = model.visual_projection(hidden)  # (F, 64, D), no post-layernorm
        pooled = torch.nn.MaxPool1d(2, 2)(patches.transpose(1, 2)).transpose(1, 2)  # the reference's flat pairs
        want_patches = torch.nn.functional.normalize(pooled, dim=-1) @ out.text_embeds[0]
    torch.testing.assert_close(got["frame_scores"], want_frames, atol=1e-5, rtol=0)
    assert got["patch_scores"].shape == (4, 8, 4)  # 8x8 patches, pairs -> 8x4
    torch.testing.assert_close(got["patch_scores"].reshape(4, -1), want_patches, atol=1e-5, rtol=0)


def test_clip_scorer_refuses_a_model_that_is_not_clip():
    model, processor = tiny("qwen2_vl")
    with pytest.raises(TypeError, match="needs a transformers CLIPModel"):
        CLIPScorer(model, processor)


# ------------------------------------------------------------------------ inputs from the engine


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl", "video_llava", "smolvlm"])
def test_question_text_is_the_text_after_the_video(family):
    _, processor = tiny(family)
    video = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    inputs = make_inputs(processor, [video], [QUESTIONS[0]])
    ids = inputs["input_ids"][0]
    video_ids = {processor.tokenizer.convert_tokens_to_ids(t) for t in ("<video>", "<|video_pad|>", "<image>")}
    last = max(i for i, t in enumerate(ids.tolist()) if t in video_ids)
    text = question_text(ids[last + 1 :], processor)
    assert text.startswith(QUESTIONS[0])
    if family != "video_llava":  # Vicuna's template has no end-of-turn special token: "ASSISTANT:" follows
        assert text == QUESTIONS[0]


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_frames_from_pixels_undoes_the_processor_normalisation(family):
    _, processor = tiny(family)
    gen = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (4, 3, 28, 28), generator=gen, dtype=torch.uint8)
    stats = processor.video_processor
    mean = torch.tensor(stats.image_mean).reshape(1, 3, 1, 1)
    std = torch.tensor(stats.image_std).reshape(1, 3, 1, 1)
    pixels = (video.float() / 255 - mean) / std  # what the processor computes
    assert torch.equal(frames_from_pixels(pixels, processor), video)
