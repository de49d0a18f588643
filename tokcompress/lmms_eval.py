"""The ``tokcompress`` model for lmms-eval: any supported Hugging Face video LLM, compressed by a policy.

Installed with ``pip install tokcompress[eval]`` and found through the ``lmms_eval.models`` entry
point, so lmms-eval's own tasks, prompts, answer parsing and metrics score it::

    lmms-eval eval --model tokcompress \\
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,policy=fastvid,retain=0.1 \\
        --tasks videomme --batch_size 1
    accelerate launch --num_processes 8 -m lmms_eval --model tokcompress --model_args ... --tasks mvbench

``model_args``: ``pretrained`` (hub id or ``save_pretrained`` folder), ``policy`` (a registered
name, default ``none``), ``retain``, ``max_frames_num`` (32), ``fps`` (a cap on the sampling rate,
default none: ``max_frames_num`` frames evenly spaced over the clip), ``dtype`` (``auto``),
``attn_implementation``, ``device_map``, ``max_new_tokens`` (default for tasks that set none);
every other key goes to the policy (e.g. ``seed=0`` for ``random``).

Per request the model reports, through lmms-eval's metric logging (``results["throughput"]``, as
``avg_<name>``): ``ttft_s`` (from the start of ``generate`` to the first generated token: vision
encoding, policy, prefill), ``policy_s`` (the policy itself), ``preprocess_s`` (decoding the video
with PyAV and the processor), ``video_tokens_before`` / ``video_tokens_after``, next to lmms-eval's
own latency (the whole ``generate``) and speed.

From Python, an already loaded (and possibly wrapped) model can be evaluated directly::

    lm = TokcompressChat(model=tokcompress.wrap(model, "fastvid", retain=0.1), processor=processor)
    lmms_eval.evaluator.simple_evaluate(model=lm, tasks=["videomme"])

A model object that is not wrapped yet is wrapped with ``policy``/``retain`` and stays wrapped
(``tokcompress.unwrap(model)`` afterwards); a wrapped one is used as it is.

Under ``accelerate launch`` lmms-eval shards the documents over the processes (each process holds a
whole model on its own device) and gathers the scores; the per-request metrics are gathered to
process 0 as well.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from transformers import StoppingCriteria

__all__ = ["TokcompressChat", "TokcompressSimple", "manifests"]

MODEL_ID = "tokcompress"


def manifests() -> list[ModelManifest]:
    """Entry point of the ``lmms_eval.models`` group (see setup.cfg)."""
    return [
        ModelManifest(
            model_id=MODEL_ID,
            chat_class_path="tokcompress.lmms_eval.TokcompressChat",
            simple_class_path="tokcompress.lmms_eval.TokcompressSimple",
        )
    ]


class _FirstToken(StoppingCriteria):
    """A stopping criterion that never stops; it notes when ``generate`` produced its first token."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        if self.at is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _Base(lmms):
    """Loading, wrapping, and the request loop shared by the chat and simple classes."""

    def __init__(
        self,
        pretrained: str | None = None,
        policy: str | None = "none",
        retain: float | None = None,
        *,
        model: Any = None,
        processor: Any = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_frames_num: int = 32,
        fps: float | None = None,
        attn_implementation: str | None = None,
        device_map: str | None = None,
        max_new_tokens: int = 128,
        trust_remote_code: bool = False,
        revision: str | None = None,
        max_batch_size: int | None = None,
        **policy_params: Any,
    ) -> None:
        super().__init__()
        import tokcompress as tc
        from accelerate import Accelerator

        if str(batch_size) not in ("1", "auto"):
            raise ValueError(
                f"the tokcompress lmms-eval model runs one request at a time; got batch_size={batch_size!r}"
            )
        self.batch_size_per_gpu = 1
        self.max_frames_num = int(max_frames_num) if max_frames_num else None
        self.fps = float(fps) if fps else None
        self.max_new_tokens = int(max_new_tokens)
        # cpu=True makes a multi-process launch without GPUs a gloo (MULTI_CPU) run instead of N copies
        on_cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=on_cpu)
        self._rank, self._world_size = _process()
        if self._world_size > 1 and device_map is None:
            local = int(os.environ.get("LOCAL_RANK", self._rank))
            self._device = torch.device("cpu") if on_cpu else torch.device(f"cuda:{local}")
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        if model is None:
            if pretrained is None:
                raise ValueError("give pretrained=<hub id or folder> (or, from Python, model=... and processor=...)")
            from .hf import load_pretrained

            model, processor = load_pretrained(
                str(pretrained),
                device=None if device_map else self._device,
                dtype=dtype,
                device_map=device_map,
                attn_implementation=attn_implementation,
                revision=revision,
                trust_remote_code=trust_remote_code,
            )
            self.pretrained = str(pretrained)
        else:
            if processor is None:
                raise ValueError("a model object needs its processor: TokcompressChat(model=..., processor=...)")
            self.pretrained = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
        if device_map is not None or pretrained is None:  # inputs go where the model's first weights are
            self._device = next(model.parameters()).device
        if tc.is_wrapped(model):
            if retain is not None or policy_params or policy not in (None, "none"):
                raise ValueError(
                    f"the model is already wrapped with {tc.policy_of(model).label}; pass policy options only for an "
                    "unwrapped model"
                )
        else:
            tc.wrap(model, policy or "none", retain, **policy_params)
        self._model = model
        self.processor = processor
        self.policy_label = tc.policy_of(model).label

    # -- the attributes lmms-eval reads --------------------------------------------------------------
    @property
    def model(self) -> Any:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # -- one request -----------------------------------------------------------------------------------
    def _respond(
        self, conversation: list[dict], videos: Sequence[str], gen_kwargs: dict
    ) -> tuple[GenerationResult, dict]:
        """Answer one conversation; returns the result and its per-request metrics."""
        import tokcompress as tc

        from .hf import chat_inputs, read_clip

        begin = time.perf_counter()
        clips = [read_clip(path, max_frames=self.max_frames_num, fps=self.fps) for path in videos]
        batch = chat_inputs(self.processor, [conversation], [clips])
        preprocess = time.perf_counter() - begin
        dtype = self.model.dtype
        inputs = {
            k: (
                (v.to(self.device, dtype) if torch.is_floating_point(v) else v.to(self.device))
                if torch.is_tensor(v)
                else v
            )
            for k, v in batch.items()
        }
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = temperature > 0  # lmms-eval tasks ask for greedy decoding with temperature 0
        generate_kwargs: dict[str, Any] = dict(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            do_sample=do_sample,
            num_beams=int(gen_kwargs.get("num_beams") or 1),
        )
        if do_sample:
            generate_kwargs.update(temperature=temperature, top_p=gen_kwargs.get("top_p") or 1.0)
        tokenizer = self.processor.tokenizer
        if getattr(self.model.generation_config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            generate_kwargs["pad_token_id"] = tokenizer.pad_token_id

        clock = _FirstToken(self.device)
        previous = tc.last_record(self.model)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(**inputs, stopping_criteria=[clock], **generate_kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        prompt_length = inputs["input_ids"].shape[1]
        new_tokens = out[0, prompt_length:]
        text = self.processor.batch_decode(new_tokens[None], skip_special_tokens=True)[0]
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        record = tc.last_record(self.model)
        fresh = record is not None and record is not previous
        metrics = {
            "total_elapsed_time": elapsed,
            "total_gen_tokens": int(new_tokens.numel()),
            "ttft_s": (clock.at - start) if clock.at is not None else elapsed,
            "policy_s": sum(r.seconds for r in record) if fresh else 0.0,
            "preprocess_s": preprocess,
        }
        if fresh:
            metrics["video_tokens_before"] = sum(r.video_tokens_before for r in record)
            metrics["video_tokens_after"] = sum(r.video_tokens_after for r in record)
        counts = TokenCounts(input_tokens=int(prompt_length), output_tokens=int(new_tokens.numel()))
        return GenerationResult(text=text, token_counts=counts), metrics

    def _run(self, requests: list[Instance], prepare) -> list[GenerationResult]:
        from tqdm import tqdm

        rank, world = _process()
        if world > 1:
            print(
                f"tokcompress: process {rank} of {world} answers {len(requests)} requests", file=sys.stderr, flush=True
            )
        results, metrics = [], []
        for request in tqdm(requests, disable=self.rank != 0, desc=f"tokcompress {self.policy_label}"):
            conversation, videos, gen_kwargs = prepare(request)
            result, stats = self._respond(conversation, videos, gen_kwargs)
            results.append(result)
            if not (request.metadata or {}).get("__padding_only__"):
                metrics.append(stats)
        self._log(metrics)
        return results

    def _log(self, metrics: list[dict]) -> None:
        """Hand per-request metrics to lmms-eval's logger (on process 0, gathered from all processes)."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        rank, world = _process()
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, metrics)
            if rank != 0:
                return
            metrics = [m for part in gathered for m in part]
        for m in metrics:
            extra = {k: v for k, v in m.items() if k not in ("total_elapsed_time", "total_gen_tokens")}
            extra["total_requests"] = 1
            elapsed, tokens = m["total_elapsed_time"], m["total_gen_tokens"]
            log_metrics(
                total_elapsed_time=elapsed,
                total_gen_tokens=tokens,
                avg_speed=tokens / elapsed if elapsed > 0 else 0.0,
                additional_metrics=extra,
            )

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the tokcompress lmms-eval model generates answers; use the generate_until variant of the task "
            "(e.g. perceptiontest_val_mc instead of perceptiontest_val_mcppl)"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by the tokcompress lmms-eval model")


def _process() -> tuple[int, int]:
    """``(rank, world size)`` of this process in the torch.distributed group lmms-eval runs in."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _paths(visuals: Any) -> list[str]:
    """Video file paths of a request; anything else is refused with a reason."""
    out = []
    for item in visuals or []:
        if isinstance(item, dict):  # some tasks wrap paths, a few add a time window
            if any(key in item for key in ("video_start", "video_end", "start_time", "end_time")):
                raise NotImplementedError(
                    "the tokcompress lmms-eval model reads whole videos; this task asks for a time window of one"
                )
            item = item.get("video") or item.get("url") or item.get("path")
        if not isinstance(item, str):
            raise NotImplementedError(
                f"the tokcompress lmms-eval model takes videos given as file paths; this task gives a "
                f"{type(item).__name__} (images and audio are not supported)"
            )
        out.append(item)
    return out


class TokcompressChat(_Base):
    """Chat model: reads the task's messages (``doc_to_messages``), renders them with the chat template."""

    is_simple = False

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        from lmms_eval.protocol import ChatMessages

        def prepare(request: Instance) -> tuple[list[dict], list[str], dict]:
            _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
            messages = ChatMessages(messages=doc_to_messages(self._doc(task, split, doc_id)))
            conversation, videos = [], []
            for message in messages.messages:
                content = []
                for item in message.content:
                    if item.type == "text":
                        content.append({"type": "text", "text": item.text})
                    elif item.type == "video":
                        if item.start_time is not None or item.end_time is not None:
                            _paths([{"url": item.url, "start_time": item.start_time}])  # raises with the reason
                        videos += _paths([item.url])
                        content.append({"type": "video"})
                    else:
                        _paths([item.url])  # raises with the reason
                conversation.append({"role": message.role, "content": content})
            return conversation, videos, gen_kwargs

        return self._run(requests, prepare)


class TokcompressSimple(_Base):
    """Simple ("legacy") model: ``doc_to_visual`` videos first, then the task's context as the user turn."""

    is_simple = True

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        def prepare(request: Instance) -> tuple[list[dict], list[str], dict]:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            videos = _paths(doc_to_visual(self._doc(task, split, doc_id)))
            content = [{"type": "video"} for _ in videos] + [{"type": "text", "text": context}]
            return [{"role": "user", "content": content}], videos, gen_kwargs

        return self._run(requests, prepare)
