"""Scorers: models the user hands in to tell query-dependent policies how relevant each frame is.

A scorer maps a video's frames and the question's text to signals (tensors) that a policy reads from
``TokenSet.signals``; the policy itself stays a pure function of tensors. The engine runs the scorer
once per video during the compressed prefill (so its time is part of time-to-first-token, and the
record reports it as ``scorer_seconds``), with tokcompress's own hooks paused, so a scorer may be the
wrapped model itself.

Nothing is downloaded here: a scorer wraps model and processor objects the caller already loaded.

* :class:`QuoTAScorer` (QuoTA): a vision-language model's probability of answering "A" (yes) to
  "Does the image contain any object of ...?" per frame, optionally after asking a language model to
  turn the question into a list of objects (the reference's chain-of-thought query decoupling).
* :class:`CLIPScorer` (Free Video-LLM): cosine similarity of the question's CLIP text embedding with
  each frame's image embedding and with its projected patch features.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .policies.free_video_llm import pair_pool

#: Signals a scorer may provide; a policy that needs one of them needs a scorer.
SCORER_SIGNALS = frozenset({"frame_scores", "patch_scores"})


class Scorer:
    """Base class: ``scorer(frames, question) -> {signal name: tensor}``.

    ``frames`` is ``(F, C, H, W)`` uint8 RGB, the video's frames as the wrapped model's processor
    resized them; ``question`` is the prompt text that follows the video. Subclasses set ``provides``
    and may hold any model; they must not depend on tokcompress's hooks (the engine pauses them).
    """

    provides: ClassVar[frozenset[str]] = frozenset()
    model: Any = None
    processor: Any = None

    def __call__(self, frames: Tensor, question: str) -> dict[str, Tensor]:
        raise NotImplementedError


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


# ----------------------------------------------------------------------------------------- QuoTA

#: The scoring prompts of QuoTA's ``frame_retrieve`` (objects known, or the question itself).
OBJECT_PROMPT = (
    "Does the image contain any object of {objects}? A. yes, B. no\nAnswer with the option's letter directly."
)
QUESTION_PROMPT = (
    "{question}\nDoes the image contain sufficient information to answer the given question? A. yes, B. no\n"
    "Answer with the option's letter directly."
)

#: Query-decoupling instruction (this library's wording of the reference's three steps).
DECOUPLE_PROMPT = """Question: {question}
Work in three steps to find what to look for in the video frames.
step 1: would spotting particular objects help to answer the question? Write yes or no.
step 2: if yes, list the objects the question mentions or implies, as a Python list.
step 3: keep only physical things that can be seen in a frame, as a Python list.
Reply in this form:
step 1: yes
step 2: ["red car", "road", "speed"]
step 3: ["red car", "road"]"""


def parse_objects(text: str) -> list[str]:
    """Objects from a decoupling answer: the list after ``step 3:`` when ``step 1`` says yes, else ``[]``.

    Anything that does not parse (a random model's output, a missing step) gives ``[]``, and the
    scorer then asks the question itself, as the reference does when there are no objects.
    """
    first = re.search(r"step\s*1\s*:\s*(yes|no)", text, flags=re.IGNORECASE)
    if first is None or first.group(1).lower() != "yes":
        return []
    third = re.search(r"step\s*3\s*:\s*(\[[^\]]*\])", text, flags=re.IGNORECASE)
    if third is None:
        return []
    try:
        value = ast.literal_eval(third.group(1))
    except (ValueError, SyntaxError):
        return []
    if not isinstance(value, (list, tuple)):
        return []
    return [str(v).strip() for v in value if str(v).strip()]


def scoring_prompt(question: str, objects: list[str]) -> str:
    """The per-frame yes/no prompt: about the objects when there are any, else about the question."""
    if objects:
        return OBJECT_PROMPT.format(objects=", ".join(objects))
    return QUESTION_PROMPT.format(question=question)


@dataclass
class QuoTAScorer(Scorer):
    """QuoTA's frame relevance: ``P("A")`` of a VLM asked a yes/no question about each frame.

    Args:
        model: a Hugging Face image-text-to-text model (e.g. ``Qwen2VLForConditionalGeneration``; the
            reference uses Qwen2-VL-2B-Instruct), possibly the wrapped model itself.
        processor: its processor (chat template, image processor, tokenizer).
        decoupler: a model whose ``generate`` rewrites the question into an object list first (the
            reference asks the target video LLM: pass the wrapped model), or ``None`` to skip the step.
        decoupler_processor: the decoupler's processor (default: ``processor``).
        max_new_tokens: generation limit of the decoupling step.
        batch_size: frames per scorer forward (64, as the reference).
        answer: the token whose probability is the score (``"A"``).

    Returns ``{"frame_scores": (F,) float32}`` yes-probabilities; the decoupler's last answer and the
    objects parsed from it are kept in ``last_answer`` and ``last_objects`` for inspection.
    """

    model: Any = field(default=None, repr=False)
    processor: Any = field(default=None, repr=False)
    decoupler: Any = field(default=None, repr=False)
    decoupler_processor: Any = field(default=None, repr=False)
    max_new_tokens: int = 128
    batch_size: int = 64
    answer: str = "A"

    provides: ClassVar[frozenset[str]] = frozenset({"frame_scores"})

    def __post_init__(self) -> None:
        if self.model is None or self.processor is None:
            raise ValueError("QuoTAScorer needs model= (a Hugging Face VLM) and processor= (its processor)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {self.batch_size!r}")
        ids = _tokenizer(self.processor).encode(self.answer, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"answer {self.answer!r} must be one token of the scorer's tokenizer; got ids {ids}")
        self.answer_id = int(ids[0])
        self.last_objects: list[str] = []
        self.last_answer = ""  # the decoupler's last raw answer

    def objects(self, question: str) -> list[str]:
        """The decoupling step: ``[]`` without a decoupler."""
        if self.decoupler is None:
            return []
        processor = self.decoupler_processor or self.processor
        tokenizer = _tokenizer(processor)
        conversation = [
            {"role": "user", "content": [{"type": "text", "text": DECOUPLE_PROMPT.format(question=question)}]}
        ]
        text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer([text], return_tensors="pt").to(_device(self.decoupler))
        with torch.no_grad():
            out = self.decoupler.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        self.last_answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return parse_objects(self.last_answer)

    def prompt_inputs(self, frames: Tensor, prompt: str) -> dict[str, Any]:
        """Processor inputs for ``frames`` ``(k, C, H, W)``, one frame per sequence, same prompt."""
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return self.processor(
            text=[text] * frames.shape[0], images=list(frames), return_tensors="pt", padding=True, padding_side="left"
        )

    @torch.no_grad()
    def __call__(self, frames: Tensor, question: str) -> dict[str, Tensor]:
        objects = self.objects(question)
        self.last_objects = objects
        prompt = scoring_prompt(question, objects)
        device = _device(self.model)
        scores = []
        for start in range(0, frames.shape[0], self.batch_size):
            inputs = self.prompt_inputs(frames[start : start + self.batch_size].cpu(), prompt).to(device)
            logits = self.model(**inputs).logits[:, -1].float()
            scores.append(torch.softmax(logits, dim=-1)[:, self.answer_id])
        return {"frame_scores": torch.cat(scores).cpu()}


# ------------------------------------------------------------------------------------------ CLIP


@dataclass
class CLIPScorer(Scorer):
    """Free Video-LLM's question scores from a ``transformers.CLIPModel`` and its ``CLIPProcessor``.

    ``frame_scores`` ``(F,)``: cosine of the question's text embedding with each frame's image
    embedding. ``patch_scores`` ``(F, gh, ceil(gw / 2))``: cosine of the text embedding with the
    frame's patch features after the visual projection (no post-layernorm, as the reference) and a
    maximum over horizontal patch pairs (the reference's ``MaxPool1d(2, 2)``). Questions longer than
    the text tower's positions are truncated (the reference does not truncate).
    """

    model: Any = field(default=None, repr=False)
    processor: Any = field(default=None, repr=False)
    batch_size: int = 64

    provides: ClassVar[frozenset[str]] = frozenset({"frame_scores", "patch_scores"})

    def __post_init__(self) -> None:
        if self.model is None or self.processor is None:
            raise ValueError("CLIPScorer needs model= (a transformers CLIPModel) and processor= (its CLIPProcessor)")
        if not all(hasattr(self.model, name) for name in ("vision_model", "text_model", "visual_projection")):
            raise TypeError(f"CLIPScorer needs a transformers CLIPModel; got {type(self.model).__name__}")

    def text_embedding(self, question: str) -> Tensor:
        """``(D,)`` projected text embedding of ``question``."""
        limit = self.model.config.text_config.max_position_embeddings
        text = self.processor(text=[question], return_tensors="pt", padding=True, truncation=True, max_length=limit)
        text = {k: v.to(_device(self.model)) for k, v in text.items() if k in ("input_ids", "attention_mask")}
        pooled = self.model.text_model(**text).pooler_output
        return self.model.text_projection(pooled)[0].float()

    @torch.no_grad()
    def __call__(self, frames: Tensor, question: str) -> dict[str, Tensor]:
        text = torch.nn.functional.normalize(self.text_embedding(question), dim=-1)
        device = _device(self.model)
        frame_scores, patch_scores = [], []
        for start in range(0, frames.shape[0], self.batch_size):
            chunk = list(frames[start : start + self.batch_size].cpu())
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(device, self.model.dtype)
            out = self.model.vision_model(pixel_values=pixels)
            image = self.model.visual_projection(out.pooler_output).float()
            frame_scores.append(torch.nn.functional.normalize(image, dim=-1) @ text)
            patches = self.model.visual_projection(out.last_hidden_state[:, 1:]).float()  # (k, P, D)
            side = int(round(patches.shape[1] ** 0.5))
            if side * side != patches.shape[1]:
                raise RuntimeError(f"CLIP returned {patches.shape[1]} patches per frame, not a square grid")
            pooled = pair_pool(patches.reshape(patches.shape[0], side, side, -1))
            patch_scores.append(torch.nn.functional.normalize(pooled, dim=-1) @ text)
        return {"frame_scores": torch.cat(frame_scores).cpu(), "patch_scores": torch.cat(patch_scores).cpu()}


# ------------------------------------------------------------------------- inputs from the engine


def _video_stats(processor: Any) -> tuple[Any, Any, bool, float]:
    """``(mean, std, normalised, rescale)`` the wrapped model's processor applied to video frames."""
    for name in ("video_processor", "image_processor"):
        sub = getattr(processor, name, None)
        if sub is not None and getattr(sub, "image_mean", None) is not None:
            return (
                sub.image_mean,
                sub.image_std,
                bool(getattr(sub, "do_normalize", True)),
                float(getattr(sub, "rescale_factor", 1 / 255) if getattr(sub, "do_rescale", True) else 1.0),
            )
    raise ValueError(
        f"cannot undo the normalisation of {type(processor).__name__}: it has no video_processor or image_processor "
        "with image_mean/image_std; pass the wrapped model's processor"
    )


def frames_from_pixels(pixels: Tensor, processor: Any) -> Tensor:
    """``(F, C, H, W)`` normalised frames (the ``"pixels"`` signal) -> uint8 RGB, undoing the processor."""
    mean, std, normalised, rescale = _video_stats(processor)
    x = pixels.float()
    if normalised:
        shape = (1, -1, 1, 1)
        x = x * torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
        x = x + torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    return (x / rescale).round().clamp(0, 255).to(torch.uint8)


def question_text(input_ids: Tensor, processor: Any) -> str:
    """The question: text of ``input_ids`` (the row's tokens after the video), from the first ordinary token
    to the next special token.

    Chat templates end the user's turn with a special token (``<|im_end|>``, ``<end_of_utterance>``);
    templates without one leave their trailing words (``ASSISTANT:``) in the text.
    """
    tokenizer = _tokenizer(processor)
    ids = input_ids.tolist()
    specials = set(getattr(tokenizer, "all_special_ids", []))
    start = 0
    while start < len(ids) and ids[start] in specials:  # markers closing the video (<|vision_end|>)
        start += 1
    end = next((i for i in range(start, len(ids)) if ids[i] in specials), len(ids))
    ids = ids[start:end]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


__all__ = [
    "CLIPScorer",
    "QuoTAScorer",
    "SCORER_SIGNALS",
    "Scorer",
    "frames_from_pixels",
    "parse_objects",
    "question_text",
    "scoring_prompt",
]
